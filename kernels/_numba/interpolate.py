"""In-between frames on the CPU."""

from __future__ import annotations

import numba
import torch

from probescope.kernels._numba import FASTMATH, threads_aware

BLOCK = 4096  # elements per parallel iteration


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def interpolate_frames_kernel(first, second, weights, out):
    """out[j] = first + (second - first) * weights[j], a block of elements at a time: each
    in-between frame's row is one contiguous, vectorised sweep over the block. (The sweeps
    index slices from 0: an index Numba cannot prove non-negative keeps LLVM from vectorising,
    which made this kernel 10x slower.)"""
    n = first.shape[0]
    for blk in numba.prange((n + BLOCK - 1) // BLOCK):
        lo, hi = blk * BLOCK, min((blk + 1) * BLOCK, n)
        a, b = first[lo:hi], second[lo:hi]
        for j in range(weights.shape[0]):
            w, row = weights[j], out[j, lo:hi]
            for i in range(hi - lo):
                row[i] = a[i] + (b[i] - a[i]) * w


interpolate_frames_kernel = threads_aware(interpolate_frames_kernel)


def interpolate_frames_numba(
    first: torch.Tensor, second: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``(k, *first.shape)`` frames blended with the k ``weights``."""
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    a = first.detach().reshape(-1).to(compute).contiguous()
    b = second.detach().reshape(-1).to(compute).contiguous()
    out = torch.empty((weights.numel(), a.numel()), dtype=compute)
    interpolate_frames_kernel(a.numpy(), b.numpy(), weights.to(compute).numpy(), out.numpy())
    return out.reshape(weights.numel(), *first.shape).to(first.dtype)
