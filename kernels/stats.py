"""Statistics of a tensor in one pass, and the spectral norm of a matrix by power iteration.

``tensor_stats`` returns a float64 tensor on the input's device, in the order of
``STAT_NAMES``: mean, population variance, L1 norm, L2 norm, max |x|, the fraction of entries
with |x| <= ``near_zero``, and the fraction of non-finite entries. The first six are over the
finite entries only, so one overflowing weight does not hide the rest of the picture. Nothing
is copied to the host: the stats probe reads the result later, off the training thread.
"""

from __future__ import annotations

import torch

from probescope.kernels.backend import choose_impl

STAT_NAMES = ("mean", "var", "l1", "l2", "max_abs", "near_zero", "nonfinite")


def tensor_stats_reference(x: torch.Tensor, near_zero: float = 1e-6) -> torch.Tensor:
    """The definition, in float64 torch ops."""
    v = x.detach().reshape(-1).to(torch.float64)
    finite = torch.isfinite(v)
    f = v[finite]
    n = max(v.numel(), 1)
    if f.numel() == 0:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=x.device)
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        return torch.stack([nan, nan, zero, zero, nan, zero, (~finite).sum() / n])
    return torch.stack([
        f.mean(), f.var(unbiased=False), f.abs().sum(), f.norm(), f.abs().max(),
        (f.abs() <= near_zero).sum() / n, (~finite).sum() / n,
    ])  # fmt: skip


def combine_partials(partials: torch.Tensor, numel: int) -> torch.Tensor:
    """Merge per-block rows (count, sum, M2, L1, sum sq, max|x|, near-zero, non-finite) exactly
    as the parallel-variance formula of Chan et al. does, in float64."""
    p = partials.to(torch.float64)
    count, total, m2 = p[:, 0], p[:, 1], p[:, 2]
    n = count.sum()
    mean = total.sum() / n
    block_mean = total / count.clamp_min(1.0)
    var = (m2 + count * (block_mean - mean) ** 2).sum() / n
    stats = torch.stack([
        mean, var, p[:, 3].sum(), p[:, 4].sum().sqrt(), p[:, 5].max(),
        p[:, 6].sum() / max(numel, 1), p[:, 7].sum() / max(numel, 1),
    ])  # fmt: skip
    empty = n == 0
    nan = torch.full_like(stats, float("nan"))
    return torch.where(
        empty & torch.tensor([True, True, False, False, True, False, False], device=stats.device), nan, stats
    )


def tensor_stats(x: torch.Tensor, near_zero: float = 1e-6, *, impl: str = "auto") -> torch.Tensor:
    """``STAT_NAMES`` of ``x`` as a float64 tensor on its device, in one pass over memory."""
    if not x.is_floating_point():
        raise TypeError(f"tensor_stats takes a floating-point tensor, got {x.dtype}")
    if not near_zero >= 0:
        raise ValueError(f"near_zero must be >= 0, got {near_zero!r}")
    which = choose_impl("tensor_stats", x.device, impl)
    if x.numel() == 0 or which == "torch":
        return tensor_stats_reference(x, near_zero)
    if which == "numba":
        from probescope.kernels._numba.stats import tensor_stats_numba

        return tensor_stats_numba(x, near_zero)
    from probescope.kernels._triton.stats import tensor_stats_partials_triton

    return combine_partials(tensor_stats_partials_triton(x, near_zero), x.numel())


def spectral_norm_reference(matrix: torch.Tensor) -> float:
    """The exact largest singular value (an SVD)."""
    return float(torch.linalg.matrix_norm(_as_matrix(matrix).to(torch.float64), ord=2))


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    if w.dim() < 2:
        raise ValueError(f"spectral_norm takes a matrix (or a conv kernel), got shape {tuple(w.shape)}")
    return w.detach().reshape(w.shape[0], -1)


def spectral_norm(
    matrix: torch.Tensor, iterations: int = 20, v: torch.Tensor | None = None, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest singular value (a 0-d tensor, no host sync) by power iteration, and the right
    singular vector estimate.

    Pass the returned vector back as ``v`` on the next call: a warm start converges in a few
    iterations as the weights drift. Conv kernels are flattened to (out, in * k * k). On CUDA
    the iteration is two matrix-vector products per step through cuBLAS, which is already
    memory-bound and optimal; a custom kernel would add nothing.
    """
    m = _as_matrix(matrix)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if v is None:
        generator = torch.Generator().manual_seed(0)
        v = torch.randn(m.shape[1], generator=generator, dtype=torch.float64)
    if v.shape != (m.shape[1],):
        raise ValueError(f"v must have shape ({m.shape[1]},), got {tuple(v.shape)}")
    which = choose_impl("spectral_norm", m.device, impl)
    if which == "numba":
        from probescope.kernels._numba.stats import spectral_norm_numba

        return spectral_norm_numba(m, v / v.norm(), iterations)
    w = m.to(torch.float32 if m.dtype in (torch.float16, torch.bfloat16) else m.dtype)
    vec = (v / v.norm()).to(w)
    sigma = torch.zeros((), dtype=w.dtype, device=w.device)
    for _ in range(iterations):
        u = w @ vec
        u = u / u.norm().clamp_min(1e-30)
        vec = w.T @ u
        sigma = vec.norm()
        vec = vec / sigma.clamp_min(1e-30)
    return sigma, vec
