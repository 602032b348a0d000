"""In-between frames on the GPU: each program loads two frames' elements once and writes k blends."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from probescope.kernels.backend import device_copy


@triton.jit
def _interpolate_frames_kernel(
    first_ptr, second_ptr, weights_ptr, out_ptr, n, k, BLOCK: tl.constexpr, GEOMETRIC: tl.constexpr
):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    a = tl.load(first_ptr + index, mask=mask, other=1.0).to(tl.float32)
    b = tl.load(second_ptr + index, mask=mask, other=1.0).to(tl.float32)
    if GEOMETRIC:  # blend the logs (taken once per element), then exp: a^(1-w) b^w
        a = tl.log(a)  # log 0 = -inf gives 0; a negative value, NaN
        b = tl.log(b)
    for j in range(0, k):
        w = tl.load(weights_ptr + j)
        # geometric: (1 - w) a + w b, since with a log of 0, a + (b - a) w would be -inf - -inf = NaN
        if GEOMETRIC:  # noqa: SIM108  (a constexpr branch, resolved at compile time)
            blended = tl.exp((1.0 - w) * a + w * b)
        else:
            blended = a + (b - a) * w
        tl.store(out_ptr + j * n + index, blended.to(out_ptr.dtype.element_ty), mask=mask)


def interpolate_frames_triton(
    first: torch.Tensor, second: torch.Tensor, weights: torch.Tensor, geometric: bool = False
) -> torch.Tensor:
    """``(k, *first.shape)`` frames blended with the k ``weights`` (geometrically: see
    probescope.kernels.interpolate)."""
    first, second = first.contiguous(), second.contiguous()
    k = weights.numel()
    out = torch.empty((k, *first.shape), dtype=first.dtype, device=first.device)
    n = first.numel()
    block = 1024
    _interpolate_frames_kernel[(triton.cdiv(max(n, 1), block),)](
        first, second, device_copy(weights, first.device, torch.float32), out, n, k, BLOCK=block,
        GEOMETRIC=geometric,
    )  # fmt: skip
    return out
