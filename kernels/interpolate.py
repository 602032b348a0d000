"""Frames in between two recorded frames, so that sparse probing still animates smoothly.

``linear`` and ``smoothstep`` blend a + (b - a) w, with w evenly spaced in time or eased in
and out; ``geometric`` (train-viz's ``np.geomspace`` per element) takes a^(1 - w) b^w, evenly
spaced in log space: for probabilities, that is a straight line in log-probability, so a
class that is unlikely in both frames stays unlikely in between instead of passing through
the arithmetic mean. It needs non-negative frames: an element that is 0 in either frame is
0 in between, and a negative one gives NaN.
"""

from __future__ import annotations

import functools

import torch

from probescope.kernels.backend import choose_impl

METHODS = ("linear", "smoothstep", "geometric")


def interpolation_weights(k: int, method: str) -> torch.Tensor:
    """The k blend weights in (0, 1), evenly spaced in time, eased by ``method``.

    The same tensor for the same arguments (shared: read it, do not write it), so the GPU
    path copies it to the device once, not at every call."""
    if method not in METHODS:
        raise ValueError(f"interpolation method must be one of {METHODS}, got {method!r}")
    return _weights(k, method)


@functools.lru_cache(maxsize=64)
def _weights(k: int, method: str) -> torch.Tensor:
    t = torch.arange(1, k + 1, dtype=torch.float64) / (k + 1)
    if method == "smoothstep":
        t = t * t * (3.0 - 2.0 * t)
    return t


def interpolate_frames_reference(
    first: torch.Tensor, second: torch.Tensor, k: int, method: str = "linear"
) -> torch.Tensor:
    """The k frames strictly between ``first`` and ``second``: shape ``(k, *first.shape)``."""
    t = interpolation_weights(k, method).to(first.device)
    t = t.reshape(-1, *([1] * first.dim()))
    a, b = first.to(torch.float64), second.to(torch.float64)
    if method == "geometric":
        blended = torch.exp((1.0 - t) * torch.log(a) + t * torch.log(b))
    else:
        blended = a + (b - a) * t
    return blended.to(first.dtype)


def interpolate_frames(
    first: torch.Tensor, second: torch.Tensor, k: int, method: str = "linear", *, impl: str = "auto"
) -> torch.Tensor:
    """k frames between two frames of the same shape: ``method`` is one of ``METHODS`` (see
    the module's text)."""
    if first.shape != second.shape or first.dtype != second.dtype:
        raise ValueError(
            "frames differ in shape or dtype: "
            f"{first.dtype} {tuple(first.shape)} vs {second.dtype} {tuple(second.shape)}"
        )
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    weights = interpolation_weights(k, method)
    which = choose_impl("interpolate_frames", first.device, impl)
    if k == 0 or first.numel() == 0 or not first.is_floating_point():
        which = "torch"
    if which == "triton":
        from probescope.kernels._triton.interpolate import interpolate_frames_triton

        return interpolate_frames_triton(first, second, weights, geometric=method == "geometric")
    if which == "numba":
        from probescope.kernels._numba.interpolate import interpolate_frames_numba

        return interpolate_frames_numba(first, second, weights, geometric=method == "geometric")
    return interpolate_frames_reference(first, second, k, method)
