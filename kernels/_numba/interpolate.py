"""In-between frames on the CPU."""

from __future__ import annotations

import numba
import torch

from probescope.kernels._numba import FASTMATH, threads_aware


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def interpolate_frames_kernel(first, second, weights, out):
    n = first.shape[0]
    for i in numba.prange(n):
        a = first[i]
        delta = second[i] - a
        for j in range(weights.shape[0]):
            out[j, i] = a + delta * weights[j]


interpolate_frames_kernel = threads_aware(interpolate_frames_kernel)


def interpolate_frames_numba(
    first: torch.Tensor, second: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``(k, *first.shape)`` frames blended with the k ``weights``."""
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    a = first.detach().reshape(-1).to(compute).contiguous()
    b = second.detach().reshape(-1).to(compute).contiguous()
    out = torch.empty((weights.numel(), a.numel()), dtype=compute)
    interpolate_frames_kernel(a.numpy(), b.numpy(), weights.to(compute).numpy(), out.numpy())
    return out.reshape(weights.numel(), *first.shape).to(first.dtype)
