"""A tensor's histogram on the CPU in one call of two parallel reads: its finite range, then
its bins, each chunk into a row of its own (no shared counter), summed at the end.

One compiled call does it all, the reductions and the range's widening included: the
histogram probe measures every tensor of a model each frame, so the Python around each call
(time the probe thread holds the GIL a training loop may want) is kept to a few operations."""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from probescope.kernels._numba import FASTMATH, threads_aware

CHUNK = 16384


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def histogram_kernel(x, out):
    """``out`` (``bins + 3``): lo, hi, the non-finite count and the bins' counts of ``x``."""
    n, bins = x.shape[0], out.shape[0] - 3
    chunks = max(1, (n + CHUNK - 1) // CHUNK)
    ends = np.empty((chunks, 3))
    for c in numba.prange(chunks):  # per chunk: its least and greatest finite entry, its non-finite count
        lo, hi, bad = math.inf, -math.inf, 0.0
        for i in range(c * CHUNK, min((c + 1) * CHUNK, n)):
            v = np.float64(x[i])
            if math.isfinite(v):
                lo = min(lo, v)
                hi = max(hi, v)
            else:
                bad += 1.0
        ends[c, 0], ends[c, 1], ends[c, 2] = lo, hi, bad
    lo, hi = ends[:, 0].min(), ends[:, 1].max()
    out[:] = 0.0
    out[2] = ends[:, 2].sum()
    if lo > hi:  # no finite entry
        out[0] = out[1] = math.nan
        return
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    scale = bins / (hi - lo)
    out[0], out[1] = lo, hi
    counts = np.empty((chunks, bins), np.int64)
    for c in numba.prange(chunks):  # per chunk: its finite entries' counts in floor((v - lo) * scale)
        row = counts[c]
        row[:] = 0
        for i in range(c * CHUNK, min((c + 1) * CHUNK, n)):
            v = np.float64(x[i])
            if math.isfinite(v):
                at = min(max(math.floor((v - lo) * scale), 0.0), bins - 1.0)
                row[int(at)] += 1
    for c in range(chunks):
        for b in range(bins):
            out[3 + b] += counts[c, b]


histogram_kernel = threads_aware(histogram_kernel)


def tensor_histogram_numba(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``kernels.histogram.tensor_histogram`` for a CPU tensor: float64 ``(bins + 3,)``."""
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)  # half and bfloat16 entries are exact in float32
    out = np.empty(bins + 3)
    histogram_kernel(flat.contiguous().numpy(), out)
    return torch.from_numpy(out)
