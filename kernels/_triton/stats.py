"""One-pass tensor statistics on the GPU: per-program partial moments, combined by the caller."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tensor_stats_kernel(x_ptr, partial_ptr, n, near_zero, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    index = pid * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    x = tl.load(x_ptr + index, mask=inside, other=0.0).to(tl.float32)
    finite = inside & (x == x) & (tl.abs(x) != float("inf"))
    x = tl.where(finite, x, 0.0)
    count = tl.sum(finite.to(tl.float32), axis=0)
    total = tl.sum(x, axis=0)
    mean = total / tl.maximum(count, 1.0)
    centred = tl.where(finite, x - mean, 0.0)
    row = partial_ptr + pid * 8
    tl.store(row + 0, count)
    tl.store(row + 1, total)
    tl.store(row + 2, tl.sum(centred * centred, axis=0))
    tl.store(row + 3, tl.sum(tl.abs(x), axis=0))
    tl.store(row + 4, tl.sum(x * x, axis=0))
    tl.store(row + 5, tl.max(tl.abs(x), axis=0))
    tl.store(row + 6, tl.sum((finite & (tl.abs(x) <= near_zero)).to(tl.float32), axis=0))
    tl.store(row + 7, tl.sum((inside & ~finite).to(tl.float32), axis=0))


def tensor_stats_partials_triton(x: torch.Tensor, near_zero: float) -> torch.Tensor:
    """``(programs, 8)`` float32 partials: count, sum, M2, L1, sum of squares, max|x|,
    near-zero count, non-finite count."""
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    block = 4096
    programs = triton.cdiv(max(n, 1), block)
    partials = torch.empty((programs, 8), dtype=torch.float32, device=x.device)
    _tensor_stats_kernel[(programs,)](flat, partials, n, float(near_zero), BLOCK=block)
    return partials
