"""Label-distribution smoothing on the GPU: a histogram kernel and a gather kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bin_index(x, lo, scale, n_bins):
    b = tl.floor((x - lo) * scale).to(tl.int32)
    return tl.minimum(tl.maximum(b, 0), n_bins - 1)


@triton.jit
def _histogram_kernel(labels_ptr, counts_ptr, n, lo, scale, n_bins, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    x = tl.load(labels_ptr + index, mask=mask, other=0.0)
    tl.atomic_add(counts_ptr + _bin_index(x, lo, scale, n_bins), 1, mask=mask)


@triton.jit
def _gather_kernel(labels_ptr, bin_weights_ptr, out_ptr, n, lo, scale, n_bins, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    x = tl.load(labels_ptr + index, mask=mask, other=0.0)
    w = tl.load(bin_weights_ptr + _bin_index(x, lo, scale, n_bins), mask=mask, other=0.0)
    tl.store(out_ptr + index, w, mask=mask)


BLOCK = 1024


def histogram_triton(labels: torch.Tensor, lo: float, scale: float, n_bins: int) -> torch.Tensor:
    counts = torch.zeros(n_bins, dtype=torch.int32, device=labels.device)
    n = labels.numel()
    _histogram_kernel[(triton.cdiv(max(n, 1), BLOCK),)](labels, counts, n, lo, scale, n_bins, BLOCK=BLOCK)
    return counts


def gather_triton(labels: torch.Tensor, bin_weights: torch.Tensor, lo: float, scale: float) -> torch.Tensor:
    out = torch.empty_like(labels)
    n = labels.numel()
    _gather_kernel[(triton.cdiv(max(n, 1), BLOCK),)](
        labels, bin_weights, out, n, lo, scale, bin_weights.numel(), BLOCK=BLOCK
    )
    return out
