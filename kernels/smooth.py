"""1-D smoothing of a per-point series (the curve probe's loss band)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from probescope.kernels.backend import choose_impl


def smoothing_window(width: int, kind: str = "box", sigma: float | None = None) -> torch.Tensor:
    """Normalised float64 window of odd ``width``: ``box`` (moving average) or ``gaussian``.

    The same tensor for the same arguments (shared: read it, do not write it), so the GPU
    path copies it to the device once, not at every frame."""
    if width < 1 or width % 2 == 0:
        raise ValueError(f"smoothing width must be a positive odd integer, got {width!r}")
    if kind == "gaussian":
        sigma = width / 4.0 if sigma is None else float(sigma)
        if not sigma > 0 or not math.isfinite(sigma):
            raise ValueError(f"gaussian smoothing needs a positive sigma, got {sigma!r}")
    elif kind != "box":
        raise ValueError(f"smoothing kind must be 'box' or 'gaussian', got {kind!r}")
    return _window(width, kind, sigma if kind == "gaussian" else None)


@functools.lru_cache(maxsize=64)
def _window(width: int, kind: str, sigma: float | None) -> torch.Tensor:
    if kind == "box":
        return torch.full((width,), 1.0 / width, dtype=torch.float64)
    offsets = torch.arange(width, dtype=torch.float64) - width // 2
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def smooth_1d_reference(
    values: torch.Tensor, width: int, kind: str = "box", sigma: float | None = None
) -> torch.Tensor:
    """Smoothed copy of ``values`` with numpy.convolve(mode='same') edges (zeros outside)."""
    window = smoothing_window(width, kind, sigma).to(values.device, torch.float64)
    padded = F.pad(values.to(torch.float64)[None, None], (width // 2, width // 2))
    # conv1d is a correlation; the windows are symmetric, so it equals the convolution.
    return F.conv1d(padded, window[None, None])[0, 0].to(values.dtype)


def smooth_1d(
    values: torch.Tensor, width: int, kind: str = "box", sigma: float | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """Moving-average or Gaussian smoothing of a 1-D series; same length as the input."""
    if values.dim() != 1:
        raise ValueError(f"smooth_1d takes a 1-D series, got shape {tuple(values.shape)}")
    window = smoothing_window(width, kind, sigma)
    if width == 1:
        return values.clone()
    which = choose_impl("smooth_1d", values.device, impl)
    if which == "triton":
        from probescope.kernels._triton.smooth import smooth_1d_triton

        return smooth_1d_triton(values, window)
    if which == "numba":
        from probescope.kernels._numba.smooth import smooth_1d_numba

        return smooth_1d_numba(values, window)
    return smooth_1d_reference(values, width, kind, sigma)
