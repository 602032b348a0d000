"""In-between frames on the CPU."""

from __future__ import annotations

import math

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


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def interpolate_frames_geometric_kernel(first, second, weights, out):
    """out[j] = exp((1 - w) log(first) + w log(second)), w = weights[j]: the logs are taken
    once per element, not once per frame (log 0 = -inf gives 0, a negative value NaN)."""
    n = first.shape[0]
    for blk in numba.prange((n + BLOCK - 1) // BLOCK):
        lo, hi = blk * BLOCK, min((blk + 1) * BLOCK, n)
        size = hi - lo
        log_a, log_b = first[lo:hi].copy(), second[lo:hi].copy()
        for i in range(size):
            log_a[i] = math.log(log_a[i]) if log_a[i] > 0 else (-math.inf if log_a[i] == 0 else math.nan)
            log_b[i] = math.log(log_b[i]) if log_b[i] > 0 else (-math.inf if log_b[i] == 0 else math.nan)
        for j in range(weights.shape[0]):
            w, row = weights[j], out[j, lo:hi]
            for i in range(size):
                row[i] = math.exp((1.0 - w) * log_a[i] + w * log_b[i])  # -inf - -inf would be NaN


interpolate_frames_kernel = threads_aware(interpolate_frames_kernel)
interpolate_frames_geometric_kernel = threads_aware(interpolate_frames_geometric_kernel)


def interpolate_frames_numba(
    first: torch.Tensor, second: torch.Tensor, weights: torch.Tensor, geometric: bool = False
) -> torch.Tensor:
    """``(k, *first.shape)`` frames blended with the k ``weights`` (geometrically: see
    probescope.kernels.interpolate)."""
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    a = first.detach().reshape(-1).to(compute).contiguous()
    b = second.detach().reshape(-1).to(compute).contiguous()
    out = torch.empty((weights.numel(), a.numel()), dtype=compute)
    kernel = interpolate_frames_geometric_kernel if geometric else interpolate_frames_kernel
    kernel(a.numpy(), b.numpy(), weights.to(compute).numpy(), out.numpy())
    return out.reshape(weights.numel(), *first.shape).to(first.dtype)
