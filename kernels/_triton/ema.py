"""Temporal EMA of successive frames on the GPU: each program walks time for BLOCK elements."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ema_frames_kernel(
    frames_ptr, state_ptr, out_ptr, n, steps, alpha, HAS_STATE: tl.constexpr, BLOCK: tl.constexpr
):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    if HAS_STATE:
        s = tl.load(state_ptr + index, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.load(frames_ptr + index, mask=mask, other=0.0).to(tl.float32)
    for t in range(0, steps):
        x = tl.load(frames_ptr + t * n + index, mask=mask, other=0.0).to(tl.float32)
        finite = (s - s) == 0.0  # false for NaN and for an infinity (inf - inf is NaN)
        s = tl.where(finite, s + alpha * (x - s), x)
        tl.store(out_ptr + t * n + index, s.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_STATE:
        tl.store(state_ptr + index, s.to(state_ptr.dtype.element_ty), mask=mask)


def ema_frames_triton(frames: torch.Tensor, alpha: float, state: torch.Tensor | None) -> torch.Tensor:
    """Smoothed ``frames`` (T, ...); ``state`` (...) seeds the average and is updated in place."""
    frames = frames.contiguous()
    work = state.contiguous() if state is not None else None
    out = torch.empty_like(frames)
    n = frames[0].numel() if frames.shape[0] else 0
    block = 1024
    _ema_frames_kernel[(triton.cdiv(max(n, 1), block),)](
        frames, work if work is not None else frames, out, n, frames.shape[0], float(alpha),
        HAS_STATE=work is not None, BLOCK=block,
    )  # fmt: skip
    if work is not None and work is not state:
        state.copy_(work)
    return out
