"""Temporal EMA of successive frames on the CPU: each element walks time in float64."""

from __future__ import annotations

import numba
import numpy as np
import torch

from probescope.kernels._numba import FASTMATH, threads_aware


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def ema_frames_kernel(frames, state, out, alpha):
    steps, n = frames.shape
    for i in numba.prange(n):
        s = np.float64(state[i])
        for t in range(steps):
            s += alpha * (frames[t, i] - s)
            out[t, i] = s
        state[i] = s


ema_frames_kernel = threads_aware(ema_frames_kernel)


def ema_frames_numba(frames: torch.Tensor, alpha: float, state: torch.Tensor | None) -> torch.Tensor:
    """Smoothed ``frames`` (T, ...); ``state`` (...) seeds the average and is updated in place."""
    flat = frames.detach().reshape(frames.shape[0], -1).to(torch.float32).contiguous()
    seed = flat[0].clone() if state is None else state.detach().reshape(-1).to(torch.float32).clone()
    out = torch.empty_like(flat)
    if flat.shape[0]:
        ema_frames_kernel(flat.numpy(), seed.numpy(), out.numpy(), float(alpha))
    if state is not None:
        state.copy_(seed.reshape(state.shape))
    return out.reshape(frames.shape).to(frames.dtype)
