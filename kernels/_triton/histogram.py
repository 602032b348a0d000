"""A tensor's histogram on the GPU in two reads: its finite range, then its bins.

Each program strides over the tensor in blocks and keeps its own partial result (a minimum,
a maximum and a non-finite count; then a row of bin counts from ``tl.histogram``), which torch
reduces on the device: no atomics, no bin index in memory, the same counts at every launch.
Bin indices are computed in float64, as the reference does, so they agree exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from probescope.kernels.backend import next_power_of_2
from probescope.kernels.histogram import histogram_range

BLOCK = 2048
MAX_PROGRAMS = 1024


@triton.jit
def _load_finite(x_ptr, start, n, BLOCK: tl.constexpr):
    """A block of entries from ``start`` in float64, and which are inside and which finite."""
    index = start + tl.arange(0, BLOCK)
    inside = index < n
    x = tl.load(x_ptr + index, mask=inside, other=0.0).to(tl.float64)
    return x, inside, inside & (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _range_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lo = tl.full([BLOCK], float("inf"), tl.float64)
    hi = tl.full([BLOCK], -float("inf"), tl.float64)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        x, inside, finite = _load_finite(x_ptr, start, n, BLOCK)
        lo = tl.minimum(lo, tl.where(finite, x, float("inf")))
        hi = tl.maximum(hi, tl.where(finite, x, -float("inf")))
        bad += (inside & ~finite).to(tl.int32)
    row = partial_ptr + pid * 3
    tl.store(row + 0, tl.min(lo, axis=0))
    tl.store(row + 1, tl.max(hi, axis=0))
    tl.store(row + 2, tl.sum(bad, axis=0).to(tl.float64))


@triton.jit
def _bins_kernel(x_ptr, scale_ptr, partial_ptr, n, bins, BINS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lo = tl.load(scale_ptr)
    scale = tl.load(scale_ptr + 1)
    counts = tl.zeros([BINS], tl.int32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        x, _, finite = _load_finite(x_ptr, start, n, BLOCK)
        at = tl.floor((tl.where(finite, x, lo) - lo) * scale)
        at = tl.minimum(tl.maximum(at, 0.0), bins - 1.0).to(tl.int32)
        counts += tl.histogram(at, BINS, mask=finite)
    tl.store(partial_ptr + pid * BINS + tl.arange(0, BINS), counts)


def tensor_histogram_triton(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``kernels.histogram.tensor_histogram`` for a CUDA tensor: float64 ``(bins + 3,)``."""
    flat = x.detach().reshape(-1).contiguous()
    n = flat.numel()
    programs = min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)
    ends = torch.empty((programs, 3), dtype=torch.float64, device=x.device)
    _range_kernel[(programs,)](flat, ends, n, BLOCK=BLOCK)
    lo, hi = ends[:, 0].min(), ends[:, 1].max()
    none = lo > hi  # no finite entry: the range stays (inf, -inf)
    lo, hi, scale = histogram_range(lo, hi, bins)
    nan = torch.full_like(lo, float("nan"))
    lo, hi = torch.where(none, nan, lo), torch.where(none, nan, hi)
    wide = next_power_of_2(max(bins, 16))
    partial = torch.empty((programs, wide), dtype=torch.int32, device=x.device)
    _bins_kernel[(programs,)](flat, torch.stack([lo, scale]), partial, n, bins, BINS=wide, BLOCK=BLOCK)
    counts = partial[:, :bins].sum(0, dtype=torch.int64).to(torch.float64)
    return torch.cat([torch.stack([lo, hi, ends[:, 2].sum()]), counts])
