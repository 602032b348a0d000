"""Label-distribution smoothing on the CPU: a histogram pass and a gather pass."""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from probescope.kernels._numba import threads_aware


@numba.njit(inline="always")
def _bin_index(x, lo, scale, n_bins):
    b = math.floor((x - lo) * scale)
    return min(max(b, 0), n_bins - 1)


@numba.njit(cache=True, nogil=True)
def histogram_kernel(labels, counts, lo, scale):
    n_bins = counts.shape[0]
    for x in labels:
        counts[_bin_index(x, lo, scale, n_bins)] += 1


@numba.njit(parallel=True, cache=True, nogil=True)
def gather_kernel(labels, bin_weights, out, lo, scale):
    n_bins = bin_weights.shape[0]
    for i in numba.prange(labels.shape[0]):
        out[i] = bin_weights[_bin_index(labels[i], lo, scale, n_bins)]


gather_kernel = threads_aware(gather_kernel)


def histogram_numba(labels: torch.Tensor, lo: float, scale: float, n_bins: int) -> torch.Tensor:
    counts = np.zeros(n_bins, np.int32)
    histogram_kernel(labels.numpy(), counts, np.float32(lo), np.float32(scale))
    return torch.from_numpy(counts)


def gather_numba(labels: torch.Tensor, bin_weights: torch.Tensor, lo: float, scale: float) -> torch.Tensor:
    out = torch.empty(labels.numel(), dtype=torch.float32)
    gather_kernel(labels.numpy(), bin_weights.numpy(), out.numpy(), np.float32(lo), np.float32(scale))
    return out
