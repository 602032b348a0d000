"""In-between frames on the GPU: each program loads two frames' elements once and writes k blends."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from probescope.kernels.backend import device_copy


@triton.jit
def _interpolate_frames_kernel(first_ptr, second_ptr, weights_ptr, out_ptr, n, k, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    a = tl.load(first_ptr + index, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(second_ptr + index, mask=mask, other=0.0).to(tl.float32)
    for j in range(0, k):
        w = tl.load(weights_ptr + j)
        tl.store(out_ptr + j * n + index, (a + (b - a) * w).to(out_ptr.dtype.element_ty), mask=mask)


def interpolate_frames_triton(
    first: torch.Tensor, second: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``(k, *first.shape)`` frames blended with the k ``weights``."""
    first, second = first.contiguous(), second.contiguous()
    k = weights.numel()
    out = torch.empty((k, *first.shape), dtype=first.dtype, device=first.device)
    n = first.numel()
    block = 1024
    _interpolate_frames_kernel[(triton.cdiv(max(n, 1), block),)](
        first, second, device_copy(weights, first.device, torch.float32), out, n, k, BLOCK=block
    )
    return out
