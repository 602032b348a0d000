"""1-D smoothing on the GPU: each program computes BLOCK outputs as a dot with the window."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from probescope.kernels.backend import device_copy


@triton.jit
def _smooth_1d_kernel(values_ptr, window_ptr, out_ptr, n, width, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    half = width // 2
    acc = tl.zeros((BLOCK,), tl.float32)
    for t in range(0, width):
        source = index + t - half
        x = tl.load(values_ptr + source, mask=(source >= 0) & (source < n), other=0.0).to(tl.float32)
        acc += tl.load(window_ptr + t) * x
    tl.store(out_ptr + index, acc.to(out_ptr.dtype.element_ty), mask=index < n)


def smooth_1d_triton(values: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``values`` convolved with the symmetric ``window``, zeros outside (numpy 'same')."""
    values = values.contiguous()
    out = torch.empty_like(values)
    n = values.numel()
    block = 256
    _smooth_1d_kernel[(triton.cdiv(max(n, 1), block),)](
        values, device_copy(window, values.device, torch.float32), out, n, window.numel(), BLOCK=block
    )
    return out
