"""Label-distribution smoothing (LDS): per-sample weights for imbalanced regression targets.

The labels are binned, the histogram is smoothed with a kernel window (``gaussian``,
``triang`` or ``laplace``), and each sample is weighted by the inverse (``inv``) or inverse
square root (``sqrt_inv``) of its bin's smoothed count (Yang et al., "Delving into Deep
Imbalanced Regression", 2021; the same parameters as tsai's ``prepare_LDS_weights``).
Weights are clipped at ``max_rel_weight`` times the smallest weight, then scaled to mean 1.

Binning: ``bin = clamp(floor((x - lo) * n_bins / (hi - lo)), 0, n_bins - 1)`` in float32, so
the top edge belongs to the last bin (like numpy.histogram) and labels outside ``label_range``
count in the edge bins. With ``bins=None`` there is one bin per unit of label range.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from probescope.kernels.backend import choose_impl

KERNELS = ("gaussian", "triang", "laplace")
REWEIGHTS = ("inv", "sqrt_inv")


def lds_kernel_window(kernel: str = "gaussian", size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """The float64 window, peak 1: a unit impulse through scipy's gaussian_filter1d (reflecting
    edges), scipy's ``triang(size)``, or ``exp(-|x| / sigma)``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size!r}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be positive and finite, got {sigma!r}")
    half = size // 2
    offsets = np.arange(-half, half + 1)
    if kernel == "gaussian":
        # gaussian_filter1d of an impulse at the centre: the truncated Gaussian (radius
        # int(4 sigma + 0.5), normalised to sum 1), with taps beyond the edges reflected back.
        radius = int(4.0 * sigma + 0.5)
        taps = np.arange(-radius, radius + 1)
        g = np.exp(-0.5 * (taps / sigma) ** 2)
        g /= g.sum()
        window = np.zeros(size)
        for i in range(size):
            for tap, weight in zip(taps, g, strict=True):
                j = i + tap
                while j < 0 or j >= size:  # scipy 'reflect': d c b a | a b c d | d c b a
                    j = -j - 1 if j < 0 else 2 * size - j - 1
                if j == half:
                    window[i] += weight
    elif kernel == "triang":
        window = 1.0 - np.abs(offsets) / ((size + 1) / 2)
    else:
        window = np.exp(-np.abs(offsets) / sigma)
    return torch.from_numpy(window / window.max())


def _bins(labels: torch.Tensor, bins: int | None, label_range) -> tuple[float, float, int]:
    if label_range is None:
        lo, hi = float(labels.min()), float(labels.max())
    else:
        lo, hi = (float(v) for v in label_range)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"label range ({lo}, {hi}) is not finite; are there NaN labels?")
    if bins is None:
        bins = max(1, math.ceil(hi - lo))
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi, bins


def _bin_weights(counts: torch.Tensor, window: torch.Tensor, reweight: str, max_rel_weight) -> torch.Tensor:
    """Per-bin weight, clipped and scaled so that the per-sample weights average 1."""
    density = counts.to(torch.float64)
    if reweight == "sqrt_inv":
        density = density.sqrt()
    half = window.numel() // 2
    smoothed = F.conv1d(density[None, None], window.to(density)[None, None], padding=half)[0, 0]
    weights = torch.where(smoothed > 0, 1.0 / smoothed.clamp_min(1e-300), torch.zeros_like(smoothed))
    occupied = counts > 0
    if max_rel_weight is not None:
        weights = weights.clamp(max=float(weights[occupied].min()) * float(max_rel_weight))
    total = (weights * counts.to(torch.float64)).sum()
    return (weights * counts.sum().to(torch.float64) / total).to(torch.float32)


def _validate(labels, reweight, max_rel_weight) -> torch.Tensor:
    if reweight not in REWEIGHTS:
        raise ValueError(f"reweight must be one of {REWEIGHTS}, got {reweight!r}")
    if max_rel_weight is not None and not max_rel_weight >= 1:
        raise ValueError(f"max_rel_weight must be >= 1 (or None), got {max_rel_weight!r}")
    y = torch.as_tensor(labels)
    if y.numel() == 0:
        raise ValueError("lds_weights needs at least one label")
    return y.reshape(-1).to(torch.float32).contiguous()


def lds_weights_reference(labels, bins=None, label_range=None, reweight="inv", kernel="gaussian",
                          kernel_size=9, sigma=1.0, max_rel_weight=None) -> torch.Tensor:  # fmt: skip
    """The definition, in torch: histogram, smoothing, per-sample gather."""
    y = _validate(labels, reweight, max_rel_weight)
    lo, hi, n_bins = _bins(y, bins, label_range)
    scale = torch.tensor(n_bins / (hi - lo), dtype=torch.float32)
    index = torch.floor((y - torch.tensor(lo, dtype=torch.float32)) * scale).long().clamp(0, n_bins - 1)
    counts = torch.bincount(index.cpu(), minlength=n_bins)
    bin_w = _bin_weights(counts, lds_kernel_window(kernel, kernel_size, sigma), reweight, max_rel_weight)
    return bin_w.to(y.device)[index].reshape(torch.as_tensor(labels).shape)


def lds_weights(labels, bins: int | None = None, label_range: tuple[float, float] | None = None,
                reweight: str = "inv", kernel: str = "gaussian", kernel_size: int = 9, sigma: float = 1.0,
                max_rel_weight: float | None = None, *, impl: str = "auto") -> torch.Tensor:  # fmt: skip
    """Per-sample float32 LDS weights (mean 1), shaped like ``labels``."""
    y = _validate(labels, reweight, max_rel_weight)
    which = choose_impl("lds_weights", y.device, impl)
    if which == "torch":
        return lds_weights_reference(
            labels, bins, label_range, reweight, kernel, kernel_size, sigma, max_rel_weight
        )
    if which == "triton":
        from probescope.kernels._triton.lds import gather_triton as gather
        from probescope.kernels._triton.lds import histogram_triton as histogram
    else:
        from probescope.kernels._numba.lds import gather_numba as gather
        from probescope.kernels._numba.lds import histogram_numba as histogram
    lo, hi, n_bins = _bins(y, bins, label_range)
    lo32 = float(np.float32(lo))
    scale = float(np.float32(n_bins / (hi - lo)))
    counts = histogram(y, lo32, scale, n_bins)
    window = lds_kernel_window(kernel, kernel_size, sigma)
    bin_w = _bin_weights(counts.cpu(), window, reweight, max_rel_weight).to(y.device)
    return gather(y, bin_w, lo32, scale).reshape(torch.as_tensor(labels).shape)
