"""1-D smoothing on the CPU."""

from __future__ import annotations

import numba
import torch

from probescope.kernels._numba import FASTMATH, threads_aware


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def smooth_1d_kernel(values, window, out):
    n, width = values.shape[0], window.shape[0]
    half = width // 2
    for i in numba.prange(n):
        acc = 0.0
        for t in range(max(0, half - i), min(width, n + half - i)):
            acc += window[t] * values[i + t - half]
        out[i] = acc


smooth_1d_kernel = threads_aware(smooth_1d_kernel)


def smooth_1d_numba(values: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``values`` convolved with the symmetric ``window``, zeros outside (numpy 'same')."""
    x = values.detach().to(torch.float64).contiguous()
    out = torch.empty_like(x)
    smooth_1d_kernel(x.numpy(), window.to(torch.float64).numpy(), out.numpy())
    return out.to(values.dtype)
