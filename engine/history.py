"""Scalar history of a run: the loss of every training batch and every logged value.

The training thread appends (cheap: a detached tensor or a float, no device sync); probes
read it from the worker thread up to a length fixed when their job was submitted, so every
frame sees the history exactly as it was at its step.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Series:
    """One scalar series: values at steps (and the epoch of each)."""

    steps: np.ndarray
    epochs: np.ndarray
    values: np.ndarray


_IN_BLOCK = object()  # an entry of ``_Column.raw`` whose value is in one of its blocks


def _deferred(value: torch.Tensor) -> bool:
    """Whether a tensor appended to the history is kept as it is, to be read later (a CUDA
    tensor: reading it now would wait for the GPU); any other tensor is read at once."""
    return value.is_cuda


class _Column:
    """One series as the training thread appends it (Python lists: an append is cheap) and as
    readers see it (float arrays, converted once per entry: a read costs the new entries only)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.raw: list[object] = []  # numbers, tensors with one element, or _IN_BLOCK
        # (index of its first entry, the values): each run of ``loose`` device scalars stacked
        # into one tensor; appended by the training thread, dropped by readers once converted
        self.blocks: deque[tuple[int, torch.Tensor]] = deque()
        self._done = 0  # entries converted into the arrays below
        self.loose = 0  # device scalars at the end of raw, each its own allocation
        self.last_device = -1  # index of the last device scalar in raw (before it is appended)
        self._steps = np.empty(0, np.int64)
        self._epochs = np.empty(0, np.int64)
        self._values = np.empty(0, np.float64)
        self.nonfinite: tuple[int, float] | None = None  # (step, value) of the first NaN or inf

    def compact(self) -> None:
        """On the training thread: the loose device scalars at the end of ``raw`` become one
        stacked tensor, a block (one kernel on the training stream, no sync), and their entries
        ``_IN_BLOCK``: a long run that no probe reads holds one allocation per block, and a
        read copies each block whole."""
        n, self.loose = self.loose, 0
        start = len(self.raw) - n
        tail = self.raw[start:]
        if not all(isinstance(t, torch.Tensor) for t in tail) or len({t.shape for t in tail}) != 1:
            return  # a reader converted some of them meanwhile, or shapes differ: leave them
        self.blocks.append((start, torch.stack(tail).reshape(-1)))  # before a reader can miss it
        self.raw[start:] = [_IN_BLOCK] * n  # entries a reader converted meanwhile are never read

    def series(self, length: int) -> Series:
        start = self._done
        if length > start:
            self._convert(start, length)
        return Series(*(_read_only(a[:length]) for a in (self._steps, self._epochs, self._values)))

    def _convert(self, start: int, length: int) -> None:
        pending = self.raw[start:length]  # before the blocks: an _IN_BLOCK in it has its block
        if self.last_device < start:  # floats only (the usual CPU run): converted in C
            self._store(start, length, np.array(pending, dtype=np.float64))
            return
        values = np.array(
            [math.nan if v is _IN_BLOCK or isinstance(v, torch.Tensor) else v for v in pending],
            dtype=np.float64,
        )
        pieces, slots = [], []  # tensors to read and where their values go in ``values``
        covered = np.zeros(len(pending), dtype=bool)
        for first, block in list(self.blocks):
            lo, hi = max(start, first), min(length, first + len(block))
            if lo < hi:
                pieces.append(block[lo - first : hi - first])
                slots.append(slice(lo - start, hi - start))
                covered[lo - start : hi - start] = True
        loose = [i for i, v in enumerate(pending) if isinstance(v, torch.Tensor) and not covered[i]]
        if loose:
            pieces.append(torch.stack([pending[i].reshape(()) for i in loose]))
            slots.append(np.array(loose))
        for on_gpu in (False, True):
            chosen = [(p, s) for p, s in zip(pieces, slots, strict=True) if p.is_cuda == on_gpu]
            if not chosen:
                continue
            flat = torch.cat([p.reshape(-1).double() for p, _ in chosen])
            if on_gpu:  # one pinned copy and an event wait: no stream synchronisation
                from probescope.streams import to_host

                (flat,) = to_host([flat])
            host, offset = flat.numpy(), 0
            for piece, slot in chosen:
                values[slot] = host[offset : offset + piece.numel()]
                offset += piece.numel()
        self._store(start, length, values)

    def _store(self, start: int, length: int, values: np.ndarray) -> None:
        """Entries ``start:length``, their values read, into the arrays readers see."""
        if length > len(self._values):  # grow by doubling: amortised O(1) per entry
            size = max(length, 2 * len(self._values), 64)
            self._steps, self._epochs, self._values = (
                np.resize(a, size) for a in (self._steps, self._epochs, self._values)
            )
        self._steps[start:length] = self.steps[start:length]
        self._epochs[start:length] = self.epochs[start:length]
        self._values[start:length] = values
        self.raw[start:length] = [None] * (length - start)  # let the tensors go
        while self.blocks and self.blocks[0][0] + len(self.blocks[0][1]) <= length:
            self.blocks.popleft()  # wholly converted
        self._done = length
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad) and self.nonfinite is None:
            self.nonfinite = (int(self._steps[start + bad[0]]), float(values[bad[0]]))


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


class History:
    """Append-only scalar series by name; ``batch_loss`` holds the training batch losses.

    The first value of a series that is not finite (a loss that went NaN) is kept, with its
    step, and given to ``on_nonfinite(name, step, value)`` once per series: at once for a host
    value, when it is read for a device one (reading it earlier would wait for the GPU)."""

    BATCH_LOSS = "batch_loss"

    def __init__(self, on_nonfinite: Callable[[str, int, float], None] | None = None) -> None:
        self._columns: dict[str, _Column] = {}
        self._read_lock = threading.Lock()
        self._on_nonfinite = on_nonfinite
        self._reported: set[str] = set()
        self._report_lock = threading.Lock()

    #: Loose device scalars a series holds before they are stacked into one tensor.
    COMPACT = 256

    def load(self, series: Mapping[str, Series], upto: int) -> None:
        """Append ``series`` (by their display names: the batch losses as ``train_loss``), each
        up to step ``upto``: a resumed run's series of its earlier steps."""
        for name, one in series.items():
            keep = one.steps <= upto
            target = self.BATCH_LOSS if name == "train_loss" else name
            columns = (one.steps[keep].tolist(), one.epochs[keep].tolist(), one.values[keep].tolist())
            for step, epoch, value in zip(*columns, strict=True):
                self.append(target, step, epoch, value)

    def append(self, name: str, step: int, epoch: int, value) -> None:
        """Record ``value`` (a float or a tensor with one element) for ``name`` at ``step``.

        A CPU tensor becomes a float at once (no sync involved); a CUDA one is kept as it is
        (reading it would wait for the GPU), and every ``COMPACT`` of them are stacked into
        one tensor, so a long run that no probe reads holds one small allocation per
        ``COMPACT`` steps, not one per step."""
        cuda = False
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
            cuda = _deferred(value)
            value = value.detach() if cuda else value.item()
        else:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"{name}: expected a number or a tensor with one element, got "
                    f"{type(value).__name__} {str(value)[:40]!r}"
                ) from None
        column = self._columns.get(name)
        if column is None:
            column = self._columns.setdefault(name, _Column())
        if cuda:  # (first: a reader that sees the entry knows it is one)
            column.last_device = len(column.raw)
        column.steps.append(step)
        column.epochs.append(epoch)
        column.raw.append(value)
        column.loose = column.loose + 1 if cuda else 0
        if column.loose >= self.COMPACT:
            column.compact()
        if not cuda and not math.isfinite(value) and column.nonfinite is None:
            column.nonfinite = (step, value)
            self._report(name)

    def lengths(self) -> dict[str, int]:
        """The current length of every series: a consistent cut to read up to later."""
        return {name: len(col.raw) for name, col in list(self._columns.items())}

    def read(self, cut: dict[str, int] | None = None) -> dict[str, Series]:
        """Every series, each up to its length in ``cut`` (default: everything so far)."""
        cut = self.lengths() if cut is None else cut
        with self._read_lock:
            out = {name: self._columns[name].series(n) for name, n in cut.items()}
        for name in cut:
            self._report(name)
        return out

    def nonfinite(self) -> dict[str, tuple[int, float]]:
        """Per series read or appended so far with a NaN or an infinity: the step and value of
        the first one."""
        return {name: col.nonfinite for name, col in list(self._columns.items()) if col.nonfinite}

    def _report(self, name: str) -> None:
        found = self._columns[name].nonfinite
        if found is None or self._on_nonfinite is None:
            return
        with self._report_lock:  # the training thread appends, a probe's thread reads
            if name in self._reported:
                return
            self._reported.add(name)
        self._on_nonfinite(name, *found)


def display_name(name: str) -> str:
    """A series as the probes and tables name it: the batch losses are ``train_loss``."""
    return "train_loss" if name == History.BATCH_LOSS else name


def epoch_means(series: Series) -> Series:
    """Mean of the finite values per epoch (NaN for an epoch without one); the step of each
    mean is the epoch's last step. One pass over runs of equal epochs (a history's epochs never
    decrease; others are sorted first): a loss frame of a long run computes it on the probe
    worker, beside a training loop."""
    if len(series.values) == 0:
        return series
    steps, epochs, values = series.steps, series.epochs, series.values
    if np.any(epochs[1:] < epochs[:-1]):
        order = np.argsort(epochs, kind="stable")
        steps, epochs, values = steps[order], epochs[order], values[order]
    starts = np.flatnonzero(np.concatenate([[True], epochs[1:] != epochs[:-1]]))
    finite = np.isfinite(values)
    sums = np.add.reduceat(np.where(finite, values, 0.0), starts)
    counts = np.add.reduceat(finite.astype(np.int64), starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / counts, math.nan)
    return Series(np.maximum.reduceat(steps, starts), epochs[starts].astype(np.int64), means)


MIN_POINTS = 8  # the fewest points ``envelope`` may be asked for (it keeps up to 5 per call)


def envelope(series: Series, max_points: int) -> Series:
    """``series`` cut to at most ``max_points`` of its own points that keep its shape (what a
    plot of a long series needs): consecutive buckets, each keeping its lowest and highest
    point and its first NaN, plus the first and the last point. A shorter series comes back
    as it is."""
    n = len(series.values)
    if n <= max_points:
        return series
    buckets = max(1, (max_points - 2) // 3)
    size = -(-n // buckets)
    values = np.full(buckets * size, np.nan)
    values[:n] = series.values
    rows = values.reshape(buckets, size)
    nan = np.isnan(rows)
    offsets = np.arange(buckets) * size
    lowest = np.argmin(np.where(nan, np.inf, rows), axis=1) + offsets
    highest = np.argmax(np.where(nan, -np.inf, rows), axis=1) + offsets
    first_nan = (np.argmax(nan, axis=1) + offsets)[nan.any(axis=1)]
    keep = np.unique(np.concatenate([[0], lowest, highest, first_nan, [n - 1]]))
    keep = keep[keep < n]
    return Series(series.steps[keep], series.epochs[keep], series.values[keep])
