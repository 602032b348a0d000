"""The histogram of a tensor's finite entries over their own range, without leaving the device.

``tensor_histogram(x, bins)`` returns one float64 tensor on ``x``'s device, ``bins + 3``
long: the range's two ends ``lo`` and ``hi``, the count of non-finite entries, then the
counts of ``bins`` equal bins over ``[lo, hi]`` (``HISTOGRAM_HEAD`` names the first three).
The range is the finite entries' minimum and maximum, widened to ``(v - 0.5, v + 0.5)`` when
they are one value ``v`` (as numpy.histogram does); with no finite entry both ends are NaN
and every bin 0. An entry ``v`` falls in bin ``floor((v - lo) * (bins / (hi - lo)))``,
computed in float64 by every implementation (so all three count exactly alike), the maximum
in the last bin. These are numpy.histogram's bins but for an entry within rounding of an
edge, which numpy moves by comparing against its edges.

Nothing goes to the host and no bin index is written to memory: the histogram probe measures
a 100-million-entry embedding on the probe stream with two reads of it. Counts are exact to
2**53.
"""

from __future__ import annotations

import torch

from probescope.kernels.backend import choose_impl

HISTOGRAM_HEAD = ("lo", "hi", "nonfinite")
MAX_BINS = 1024


def histogram_range(
    lo: torch.Tensor, hi: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The range's ends, widened when the finite entries are one value, and the scale that
    maps it onto the bins: float64 tensors, no host sync."""
    lo, hi = lo.to(torch.float64), hi.to(torch.float64)
    same = lo == hi
    lo, hi = torch.where(same, lo - 0.5, lo), torch.where(same, hi + 0.5, hi)
    return lo, hi, bins / (hi - lo)


def tensor_histogram_reference(x: torch.Tensor, bins: int = 40) -> torch.Tensor:
    """The definition, in float64 torch ops."""
    v = x.detach().reshape(-1).to(torch.float64)
    finite = torch.isfinite(v)
    f = v[finite]
    out = torch.zeros(bins + 3, dtype=torch.float64, device=x.device)
    out[2] = (~finite).sum()
    if f.numel() == 0:
        out[:2] = float("nan")
        return out
    lo, hi, scale = histogram_range(f.min(), f.max(), bins)
    index = ((f - lo) * scale).floor().clamp(0, bins - 1).long()
    out[0], out[1] = lo, hi
    out[3:] = torch.bincount(index, minlength=bins).to(torch.float64)
    return out


def tensor_histogram(x: torch.Tensor, bins: int = 40, *, impl: str = "auto") -> torch.Tensor:
    """``lo, hi, non-finite count, counts of bins`` of ``x``'s entries (float64, on its device)."""
    if not x.is_floating_point():
        raise TypeError(f"tensor_histogram takes a floating-point tensor, got {x.dtype}")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be an int from 1 to {MAX_BINS}, got {bins!r}")
    which = choose_impl("tensor_histogram", x.device, impl)
    if x.numel() == 0 or which == "torch":
        return tensor_histogram_reference(x, bins)
    if which == "numba":
        from probescope.kernels._numba.histogram import tensor_histogram_numba

        return tensor_histogram_numba(x, bins)
    from probescope.kernels._triton.histogram import tensor_histogram_triton

    return tensor_histogram_triton(x, bins)
