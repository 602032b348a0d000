"""One-pass tensor statistics and power-iteration spectral norm on the CPU."""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from probescope.kernels._numba import FASTMATH, threads_aware

CHUNK = 16384


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def tensor_stats_partials_kernel(x, near_zero, partials):
    """Per chunk, in float64: the sums in a first pass, max|x| in a second, M2 around the
    chunk's mean in a third. Each pass is branch-free (a non-finite entry adds zeros and counts
    as non-finite) and indexed from 0, so LLVM vectorises it; a max reduction in the same loop
    as the sums, or one that has to skip non-finite entries, keeps it scalar (8x slower), so
    only a chunk holding a non-finite entry takes the careful max."""
    n = x.shape[0]
    for c in numba.prange(partials.shape[0]):
        chunk = x[c * CHUNK : min((c + 1) * CHUNK, n)]
        count = total = l1 = sumsq = small = 0.0
        for i in range(chunk.shape[0]):
            v = np.float64(chunk[i])
            finite = math.isfinite(v)
            v = v if finite else 0.0
            a = abs(v)
            count += finite
            total += v
            l1 += a
            sumsq += v * v
            small += 1.0 if finite and a <= near_zero else 0.0
        biggest = 0.0
        if count == chunk.shape[0]:
            for i in range(chunk.shape[0]):
                a = abs(chunk[i])
                biggest = a if a > biggest else biggest
        else:
            for i in range(chunk.shape[0]):
                a = abs(chunk[i])
                if math.isfinite(a) and a > biggest:
                    biggest = a
        mean = total / max(count, 1.0)
        m2 = 0.0
        for i in range(chunk.shape[0]):
            v = np.float64(chunk[i])
            d = v - mean if math.isfinite(v) else 0.0
            m2 += d * d
        partials[c, 0], partials[c, 1], partials[c, 2], partials[c, 3] = count, total, m2, l1
        partials[c, 4], partials[c, 5], partials[c, 6] = sumsq, biggest, small
        partials[c, 7] = chunk.shape[0] - count


tensor_stats_partials_kernel = threads_aware(tensor_stats_partials_kernel)


@numba.njit(cache=True, nogil=True)
def combine_partials_kernel(partials, numel, out):
    """``kernels.stats.combine_partials`` for the CPU: the same formula (Chan et al.) without
    the dozen torch calls, which cost more than the kernel itself on a small tensor."""
    n = total = l1 = sumsq = small = bad = 0.0
    biggest = -math.inf
    for c in range(partials.shape[0]):
        n += partials[c, 0]
        total += partials[c, 1]
        l1 += partials[c, 3]
        sumsq += partials[c, 4]
        biggest = max(biggest, partials[c, 5])
        small += partials[c, 6]
        bad += partials[c, 7]
    mean = total / n if n > 0 else math.nan
    var = 0.0
    for c in range(partials.shape[0]):
        count = partials[c, 0]
        block_mean = partials[c, 1] / max(count, 1.0)
        var += partials[c, 2] + count * (block_mean - mean) ** 2
    scale = 1.0 / max(numel, 1)
    out[0], out[1], out[2], out[3] = mean, var / n if n > 0 else math.nan, l1, math.sqrt(sumsq)
    out[4], out[5], out[6] = biggest if n > 0 else math.nan, small * scale, bad * scale


def tensor_stats_partials_numba(x: torch.Tensor, near_zero: float) -> torch.Tensor:
    """``(chunks, 8)`` float64 partials: count, sum, M2, L1, sum of squares, max|x|, near-zero, non-finite."""
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)
    flat = flat.contiguous()
    partials = torch.empty((max(1, -(-flat.numel() // CHUNK)), 8), dtype=torch.float64)
    tensor_stats_partials_kernel(flat.numpy(), float(near_zero), partials.numpy())
    return partials


def tensor_stats_numba(x: torch.Tensor, near_zero: float) -> torch.Tensor:
    """``STAT_NAMES`` of ``x`` (a CPU tensor), float64."""
    out = np.empty(7, np.float64)
    combine_partials_kernel(tensor_stats_partials_numba(x, near_zero).numpy(), x.numel(), out)
    return torch.from_numpy(out)


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def power_iteration_kernel(matrix, v, iterations):
    """``iterations`` steps of u = W v / |W v|, v = W^T u / |W^T u| in float64 on the matrix as
    stored (float32 or float64). Both products sweep contiguous rows, which LLVM vectorises:
    W v as one dot product per row, W^T u as one scaled row added into v per row."""
    rows, cols = matrix.shape
    u = np.zeros(rows)
    sigma = 0.0
    for _ in range(iterations):
        for i in range(rows):
            row = matrix[i]
            acc = 0.0
            for j in range(cols):
                acc += row[j] * v[j]
            u[i] = acc
        sigma = math.sqrt((u * u).sum())
        if sigma == 0.0:
            return 0.0
        u /= sigma
        v[:] = 0.0
        for i in range(rows):
            row, weight = matrix[i], u[i]
            for j in range(cols):
                v[j] += row[j] * weight
        norm = math.sqrt((v * v).sum())
        if norm == 0.0:
            return 0.0
        v /= norm
        sigma = norm
    return sigma


def spectral_norm_numba(
    matrix: torch.Tensor, v: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = matrix.dtype in (torch.float32, torch.float64)  # no float64 copy of a float32 matrix
    m = matrix.detach().to(matrix.dtype if keep else torch.float32).contiguous().numpy()
    vec = v.detach().to(torch.float64).clone().numpy()
    sigma = power_iteration_kernel(m, vec, iterations)
    return torch.tensor(sigma, dtype=torch.float64), torch.from_numpy(vec)
