"""A tensor's histogram on the CPU in two parallel reads: its finite range, then its bins,
each chunk into a row of its own (no shared counter), summed at the end."""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from probescope.kernels._numba import FASTMATH, threads_aware

CHUNK = 16384


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def range_partials_kernel(x, partials):
    """Per chunk: the least and greatest finite entry, and the count of non-finite ones."""
    n = x.shape[0]
    for c in numba.prange(partials.shape[0]):
        lo, hi, bad = math.inf, -math.inf, 0.0
        for i in range(c * CHUNK, min((c + 1) * CHUNK, n)):
            v = np.float64(x[i])
            if math.isfinite(v):
                lo = min(lo, v)
                hi = max(hi, v)
            else:
                bad += 1.0
        partials[c, 0], partials[c, 1], partials[c, 2] = lo, hi, bad


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def bin_partials_kernel(x, lo, scale, partials):
    """Per chunk: its finite entries' counts in the bins of ``floor((v - lo) * scale)``."""
    n, bins = x.shape[0], partials.shape[1]
    for c in numba.prange(partials.shape[0]):
        row = partials[c]
        row[:] = 0
        for i in range(c * CHUNK, min((c + 1) * CHUNK, n)):
            v = np.float64(x[i])
            if math.isfinite(v):
                at = min(max(math.floor((v - lo) * scale), 0.0), bins - 1.0)
                row[int(at)] += 1


range_partials_kernel = threads_aware(range_partials_kernel)
bin_partials_kernel = threads_aware(bin_partials_kernel)


def tensor_histogram_numba(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``kernels.histogram.tensor_histogram`` for a CPU tensor: float64 ``(bins + 3,)``."""
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)  # half and bfloat16 entries are exact in float32
    values = flat.contiguous().numpy()
    chunks = max(1, -(-values.shape[0] // CHUNK))
    ends = np.empty((chunks, 3))
    range_partials_kernel(values, ends)
    out = np.zeros(bins + 3)
    out[2] = ends[:, 2].sum()
    lo, hi = ends[:, 0].min(), ends[:, 1].max()
    if lo > hi:  # no finite entry
        out[:2] = math.nan
        return torch.from_numpy(out)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    scale = bins / (hi - lo)
    counts = np.empty((chunks, bins), np.int64)
    bin_partials_kernel(values, lo, scale, counts)
    out[0], out[1] = lo, hi
    out[3:] = counts.sum(0)
    return torch.from_numpy(out)
