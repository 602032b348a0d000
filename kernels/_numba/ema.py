"""Temporal EMA of successive frames on the CPU: each element walks time in float64."""

from __future__ import annotations

import numba
import numpy as np
import torch

from probescope.kernels._numba import FASTMATH, threads_aware

BLOCK = 4096  # elements per parallel iteration


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def ema_frames_kernel(frames, state, out, alpha):
    """A block of elements at a time: their running averages in a float64 row, updated by one
    contiguous, vectorised sweep per frame."""
    steps, n = frames.shape
    for blk in numba.prange((n + BLOCK - 1) // BLOCK):
        lo, hi = blk * BLOCK, min((blk + 1) * BLOCK, n)
        s = state[lo:hi].astype(np.float64)  # sweeps index slices from 0, which LLVM vectorises
        for t in range(steps):
            x, y = frames[t, lo:hi], out[t, lo:hi]
            for i in range(hi - lo):
                s[i] = s[i] + alpha * (x[i] - s[i]) if np.isfinite(s[i]) else x[i]
                y[i] = s[i]
        state[lo:hi] = s


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
