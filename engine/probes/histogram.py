"""HistogramProbe: the distribution of every weight, gradient and activation at hook points.

TensorBoard's histograms and fastai's "colorful dimension", measured where the tensors live:
each frame holds, per tensor, the kernels' ``tensor_histogram`` (``bins`` equal bins over the
range of its finite entries, and how many are not finite), computed on the snapshot's device
and copied to the host once. Drawn over training (``Distributions``), each tensor is a picture
whose column is a frame and whose rows slice its values: one sees a layer's weights spread,
its activations die at 0, a gradient's tails grow before a loss spike.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from probescope.kernels.histogram import MAX_BINS, tensor_histogram
from probescope.probes.base import Probe, ProbeContext
from probescope.probes.hooks import HookPoints
from probescope.probes.neurons import GAP
from probescope.probes.views import maps_rgba, mosaic_columns
from probescope.schedule import Schedule

#: The picture's rows per tensor (the values' axis) and most columns (frames) drawn.
ROWS = 48
MAX_COLUMNS = 240


class HistogramProbe(Probe):
    """Histograms of the tensors at hook points, every frame.

    ``hooks``, ``targets`` and ``batch`` choose the tensors as a StatsProbe's do: each module a
    pattern matches gives its parameters (``"weights"``; ``"grads"``: their gradients as of the
    step boundary) and, given a fixed ``batch``, its output on it (``"activations"``). Each
    tensor's finite entries fall in ``bins`` equal bins over their own range. A frame holds
    ``counts`` (tensors, bins), ``range`` (tensors, 2: each range's ends, NaN where a tensor had
    no finite entry) and ``nonfinite`` (tensors,); the tensors' names, ``weight/<parameter>``,
    ``grad/<parameter>``, ``act/<module>``, are the run's static ``names``.
    """

    kind = "histograms"
    default_schedule = Schedule.every(10)

    def __init__(
        self,
        hooks: str | Iterable[str] = "*",
        *,
        targets: Iterable[str] | None = None,
        batch=None,
        bins: int = 40,
        name: str | None = None,
        schedule: Schedule | None = None,
    ):
        super().__init__(name=name, schedule=schedule)
        owner = f"HistogramProbe {self.name!r}"
        self.points = HookPoints(owner, hooks, targets, batch)
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
            raise ValueError(f"{owner}: bins must be an int from 1 to {MAX_BINS}, got {bins!r}")
        self.bins = bins
        self.needs_grads = self.points.needs_grads
        self.names: list[str] = []

    def attach(self, model: nn.Module) -> None:
        self.points.attach(model)
        self.names = [name for _, _, name in self.points.tensors()]
        # Compile the kernel now, before training, not in the first frame.
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        tensor_histogram(torch.zeros(3, device=device), self.bins)

    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        none = torch.zeros(self.bins + 3, dtype=torch.float64, device=device)
        none[:2] = float("nan")  # a gradient not there yet: no range, nothing counted
        rows: list[torch.Tensor] = []  # on the model's device: one copy to the host at the end
        if "weights" in self.points.targets:
            rows += [tensor_histogram(w, self.bins) for _, w in self.points.weights(model)]
        if self.needs_grads:
            grads = self.points.grads(model, context, self.warn_once)
            rows += [none if g is None else tensor_histogram(g, self.bins) for _, g in grads]
        if self.points.modules:
            rows += self.points.activations(model, lambda out: tensor_histogram(out, self.bins), none)
        packed = torch.stack(rows).cpu().numpy()
        return {
            "counts": packed[:, 3:].astype(np.int64),
            "range": np.ascontiguousarray(packed[:, :2]),
            "nonfinite": packed[:, 2].astype(np.int64),
        }

    def static(self) -> dict[str, np.ndarray]:
        return {"names": np.asarray(self.names, dtype=str)}

    def config(self) -> dict[str, Any]:
        return {**self.points.config(), "bins": self.bins, "tensors": len(self.names)}


def rebin(counts: np.ndarray, ranges: np.ndarray, lo: float, hi: float, rows: int) -> np.ndarray:
    """Histograms over ranges of their own, ``counts`` (T, B) over ``ranges`` (T, 2), spread
    over ``rows`` equal rows of ``[lo, hi]``: each bin's count shared among the rows it
    overlaps in proportion (entries taken as even within a bin). (T, rows) float64; NaN in a
    column whose range is NaN (nothing finite)."""
    counts = np.asarray(counts, np.float64)
    bins = counts.shape[1]
    start, end = ranges[:, :1], ranges[:, 1:]
    edges = lo + (hi - lo) * np.arange(rows + 1) / rows
    position = np.clip((edges[None, :] - start) * (bins / (end - start)), 0.0, bins)  # in bins, (T, rows+1)
    position = np.nan_to_num(position)
    cumulative = np.concatenate([np.zeros((len(counts), 1)), np.cumsum(counts, axis=1)], axis=1)
    at = np.minimum(np.floor(position).astype(np.int64), bins - 1)
    below = np.take_along_axis(cumulative, at, 1) + (position - at) * np.take_along_axis(counts, at, 1)
    out = np.diff(below, axis=1)
    out[np.isnan(ranges).any(axis=1)] = np.nan
    return out


class DistributionPicture(NamedTuple):
    """What ``Distributions.picture`` draws: each tensor's counts (tensors, rows, columns), the
    highest values in row 0 (NaN in a column with no finite entry); the value range of each
    tensor's rows (tensors, 2); the steps of the columns; and the columns where a tensor was
    not measured at all (tensors, columns: a gradient before the first backward)."""

    cells: np.ndarray
    spans: np.ndarray
    steps: np.ndarray
    missing: np.ndarray


class Distributions:
    """The histogram frames drawn so far, as one picture per tensor: column ``t`` the frame
    ``t`` (at most ``max_columns``, evenly spread, the newest always), rows the tensor's values
    over the range of all its frames (the highest on top), each cell's count on a log scale
    against its column's fullest cell: white empty, red the mode; magenta a frame whose entries
    were all NaN or infinite, grey one where the tensor was not there. A step that goes back (a
    replay) starts the history again."""

    def __init__(self, rows: int = ROWS, max_columns: int = MAX_COLUMNS):
        self.rows, self.max_columns = rows, max_columns
        self.steps: list[float] = []
        self.frames: list[dict[str, np.ndarray]] = []

    def add(self, step: float, data: dict[str, np.ndarray]) -> None:
        if self.steps and step < self.steps[-1]:
            self.steps, self.frames = [], []
        if self.steps and step == self.steps[-1]:  # the same frame again: the newest copy
            self.steps.pop(), self.frames.pop()
        self.steps.append(float(step))
        self.frames.append({k: np.asarray(data[k], np.float64) for k in ("counts", "range", "nonfinite")})

    def __len__(self) -> int:
        return len(self.steps)

    def columns(self) -> np.ndarray:
        """The indices of the frames drawn."""
        n = len(self.steps)
        if n <= self.max_columns:
            return np.arange(n)
        return np.unique(np.linspace(0, n - 1, self.max_columns).round().astype(np.int64))

    def picture(self) -> DistributionPicture:
        chosen = self.columns()
        counts = np.stack([self.frames[i]["counts"] for i in chosen], axis=1)  # (tensors, T, bins)
        ranges = np.stack([self.frames[i]["range"] for i in chosen], axis=1)  # (tensors, T, 2)
        nonfinite = np.stack([self.frames[i]["nonfinite"] for i in chosen], axis=1)  # (tensors, T)
        tensors = counts.shape[0]
        cells = np.full((tensors, self.rows, len(chosen)), np.nan)
        spans = np.full((tensors, 2), np.nan)
        for n in range(tensors):
            if np.isnan(ranges[n]).all():
                continue
            lo, hi = np.nanmin(ranges[n, :, 0]), np.nanmax(ranges[n, :, 1])
            cells[n] = rebin(counts[n], ranges[n], lo, hi, self.rows).T[::-1]
            spans[n] = lo, hi
        missing = np.isnan(ranges[..., 0]) & (nonfinite == 0)
        return DistributionPicture(cells, spans, np.asarray(self.steps)[chosen], missing)


GREY = np.array([224, 224, 224, 255], np.uint8)


def distributions_rgba(picture: DistributionPicture) -> np.ndarray:
    """A ``DistributionPicture`` as one mosaic of its tensors (``mosaic_columns`` a row, white
    between them, as a mosaic of maps): (H, W, 4) uint8."""
    cells = picture.cells
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with nothing finite
        logged = np.log1p(np.maximum(cells, 0.0))
        shade = logged / np.nanmax(logged, axis=1, keepdims=True)
    shade = np.where(np.isnan(cells), np.nan, np.nan_to_num(shade, nan=0.0))
    tensors, rows, width = cells.shape
    rgba, _ = maps_rgba(shade, (-1.0, 1.0))  # 0 white, 1 red
    columns = mosaic_columns(tensors)
    for n, c in zip(*np.nonzero(picture.missing), strict=True):
        top, left = divmod(int(n), columns)
        top, left = top * (rows + GAP), left * (width + GAP)
        rgba[top : top + rows, left + c] = GREY
    return rgba


def distributions_readout(names: list[str], picture: DistributionPicture, x: float, y: float) -> str | None:
    """The tensor, step, value slice and share of entries under (x, y) of the mosaic (its
    pixel (r, c) at x = c + 0.5, y = height - r - 0.5), in words; None between tiles."""
    cells, spans, steps = picture.cells, picture.spans, picture.steps
    tensors, rows, width = cells.shape
    columns = mosaic_columns(tensors)
    height = -(-tensors // columns) * (rows + GAP) - GAP
    tile_row, r = divmod(int(np.floor(height - y)), rows + GAP)
    tile_col, c = divmod(int(np.floor(x)), width + GAP)
    index = tile_row * columns + tile_col
    if min(tile_row, tile_col) < 0 or r >= rows or c >= width or tile_col >= columns or index >= tensors:
        return None
    where = f"{names[index]} at step {steps[c]:.0f}"
    if picture.missing[index, c]:
        return f"{where}: not there"
    share = cells[index, r, c] / np.nansum(cells[index, :, c])
    if np.isnan(cells[index, r, c]) or not np.isfinite(share):
        return f"{where}: nothing finite"
    lo, hi = spans[index]
    top = hi - (hi - lo) * r / rows
    return f"{where}: [{top - (hi - lo) / rows:.4g}, {top:.4g}) holds {share:.1%}"
