"""1-D smoothing on the CPU."""

from __future__ import annotations

import numba
import torch

from probescope.kernels._numba import FASTMATH, threads_aware

BLOCK = 4096  # outputs per parallel iteration


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def smooth_1d_kernel(values, window, out):
    """``values`` convolved with the odd, symmetric ``window``, zeros outside, a block of outputs
    at a time: the block's interior (every output whose window lies inside the series) as one
    vectorised sweep per tap, the outputs within ``width // 2`` of an end one by one."""
    n, width = values.shape[0], window.shape[0]
    half = width // 2
    for blk in numba.prange((n + BLOCK - 1) // BLOCK):
        lo, hi = blk * BLOCK, min((blk + 1) * BLOCK, n)
        inner_lo = min(max(lo, half), hi)
        inner_hi = max(min(hi, n - half), inner_lo)
        inner = out[inner_lo:inner_hi]  # sweeps index slices from 0, which LLVM vectorises
        inner[:] = 0.0
        for t in range(width):
            w, x = window[t], values[inner_lo + t - half : inner_hi + t - half]
            for i in range(inner_hi - inner_lo):
                inner[i] += w * x[i]
        _near_the_ends(values, window, out, lo, inner_lo)
        _near_the_ends(values, window, out, inner_hi, hi)


@numba.njit(inline="always", fastmath=FASTMATH, nogil=True)
def _near_the_ends(values, window, out, start, stop):
    """Outputs start..stop-1, whose windows reach past an end of the series, one by one."""
    n, width = values.shape[0], window.shape[0]
    half = width // 2
    for i in range(start, stop):
        acc = 0.0
        for t in range(max(0, half - i), min(width, n + half - i)):
            acc += window[t] * values[i + t - half]
        out[i] = acc


smooth_1d_kernel = threads_aware(smooth_1d_kernel)


def smooth_1d_numba(values: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``values`` convolved with the symmetric ``window``, zeros outside (numpy 'same')."""
    compute = torch.float64 if values.dtype == torch.float64 else torch.float32
    x = values.detach().to(compute).contiguous()
    out = torch.empty_like(x)
    smooth_1d_kernel(x.numpy(), window.to(compute).numpy(), out.numpy())
    return out.to(values.dtype)
