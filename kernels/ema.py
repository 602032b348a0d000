"""Temporal exponential smoothing of successive frames, so a live map does not flicker.

``s_t = s_{t-1} + alpha * (x_t - s_{t-1})``, seeded by ``state`` when given, else by the first
frame (so ``s_0 = x_0``). A NaN or infinite frame makes the average NaN or infinite there,
which the colour map then shows, and an average that is not finite starts again from the
next frame (``s_t = x_t``): a model that recovers (a loop that reloads its last good weights)
gets its map back at once instead of a NaN held forever.
"""

from __future__ import annotations

import torch

from probescope.kernels.backend import choose_impl


def _check(frames: torch.Tensor, alpha: float, state: torch.Tensor | None) -> None:
    if frames.dim() < 1:
        raise ValueError("ema_frames takes a (T, ...) stack of frames, got a scalar")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if state is not None and tuple(state.shape) != tuple(frames.shape[1:]):
        raise ValueError(f"state has shape {tuple(state.shape)}, frames are {tuple(frames.shape[1:])}")


def ema_frames_reference(
    frames: torch.Tensor, alpha: float, state: torch.Tensor | None = None
) -> torch.Tensor:
    """The smoothed stack, computed in float64; ``state`` is updated to the last average."""
    _check(frames, alpha, state)
    x = frames.to(torch.float64)
    s = state.to(torch.float64) if state is not None else (x[0] if len(x) else None)
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        s = torch.where(torch.isfinite(s), s + alpha * (x[t] - s), x[t])
        out[t] = s
    if state is not None and s is not None:
        state.copy_(s)
    return out.to(frames.dtype)


def ema_frames(
    frames: torch.Tensor, alpha: float, state: torch.Tensor | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """EMA over the first axis of ``frames`` (T, ...); pass ``state`` to chain calls (updated in place)."""
    _check(frames, alpha, state)
    which = choose_impl("ema_frames", frames.device, impl)
    if not frames.is_floating_point() or frames.shape[0] == 0:
        which = "torch"
    if which == "triton":
        from probescope.kernels._triton.ema import ema_frames_triton

        return ema_frames_triton(frames, alpha, state)
    if which == "numba":
        from probescope.kernels._numba.ema import ema_frames_numba

        return ema_frames_numba(frames, alpha, state)
    return ema_frames_reference(frames, alpha, state)
