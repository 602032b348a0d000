"""Label-distribution smoothing on the CPU: a histogram pass and a gather pass."""

from __future__ import annotations

import numba
import numpy as np
import torch

from probescope.kernels._numba import threads, threads_aware

HIST_BLOCK = 2048  # labels binned per vectorised pass


@numba.njit(inline="always")
def _bin_index(x, lo, scale, n_bins):
    # clamp(floor(t), 0, n - 1) == trunc(clamp(t, 0, n - 1)): truncation only differs from floor
    # below 0, which the clamp removes first. The float form is what LLVM vectorises.
    t = (x - lo) * scale
    return int(min(max(t, np.float32(0.0)), np.float32(n_bins - 1)))


@numba.njit(parallel=True, cache=True, nogil=True)
def histogram_kernel(labels, partial, lo, scale):
    """``partial`` (parts, lanes, bins): part p counts the p-th slice of the labels, a block at
    a time: the block's bin indices in one vectorised pass, then the increments, consecutive
    labels spread over ``lanes`` count rows so that runs of one bin do not wait on each other
    (a chain of dependent read-modify-writes through memory)."""
    parts, lanes, n_bins = partial.shape
    n = labels.shape[0]
    step = (n + parts - 1) // parts
    for p in numba.prange(parts):
        chunk, counts = labels[p * step : min((p + 1) * step, n)], partial[p]
        index = np.empty(HIST_BLOCK, np.int64)
        for start in range(0, chunk.shape[0], HIST_BLOCK):
            block = chunk[start : start + HIST_BLOCK]
            m = block.shape[0]
            for i in range(m):
                index[i] = _bin_index(block[i], lo, scale, n_bins)
            whole = m - m % lanes
            for i in range(0, whole, lanes):
                for lane in range(lanes):
                    counts[lane, index[i + lane]] += 1
            for i in range(whole, m):
                counts[0, index[i]] += 1


histogram_kernel = threads_aware(histogram_kernel)


@numba.njit(parallel=True, cache=True, nogil=True)
def gather_kernel(labels, bin_weights, out, lo, scale):
    n_bins = bin_weights.shape[0]
    for i in numba.prange(labels.shape[0]):
        out[i] = bin_weights[_bin_index(labels[i], lo, scale, n_bins)]


gather_kernel = threads_aware(gather_kernel)


def histogram_numba(labels: torch.Tensor, lo: float, scale: float, n_bins: int) -> torch.Tensor:
    parts, lanes = threads(), 4
    if parts * lanes * n_bins > (1 << 22):  # very many bins: a single row of counts
        parts = lanes = 1
    partial = np.zeros((parts, lanes, n_bins), np.int64)
    histogram_kernel(labels.numpy(), partial, np.float32(lo), np.float32(scale))
    return torch.from_numpy(partial.sum(axis=(0, 1)))


def gather_numba(labels: torch.Tensor, bin_weights: torch.Tensor, lo: float, scale: float) -> torch.Tensor:
    out = torch.empty(labels.numel(), dtype=torch.float32)
    gather_kernel(labels.numpy(), bin_weights.numpy(), out.numpy(), np.float32(lo), np.float32(scale))
    return out
