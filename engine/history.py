"""Scalar history of a run: the loss of every training batch and every logged value.

The training thread appends (cheap: a detached tensor or a float, no device sync); probes
read it from the worker thread up to a length fixed when their job was submitted, so every
frame sees the history exactly as it was at its step.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Series:
    """One scalar series: values at steps (and the epoch of each)."""

    steps: np.ndarray
    epochs: np.ndarray
    values: np.ndarray


class _Column:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.raw: list[object] = []  # floats or detached 0-d tensors
        self.floats: list[float] = []  # raw converted so far (worker side)

    def series(self, length: int) -> Series:
        start = len(self.floats)
        pending = self.raw[start:length]
        on_gpu = [i for i, v in enumerate(pending) if isinstance(v, torch.Tensor) and v.is_cuda]
        if on_gpu:  # one pinned copy and an event wait: no stream synchronisation
            from probescope.streams import to_host

            (host,) = to_host([torch.stack([pending[i].reshape(()).float() for i in on_gpu])])
            for i, value in zip(on_gpu, host.tolist(), strict=True):
                pending[i] = value
        for i, value in enumerate(pending):
            value = float(value.item()) if isinstance(value, torch.Tensor) else value
            self.floats.append(value)
            self.raw[start + i] = value  # let the tensor go
        return Series(
            np.asarray(self.steps[:length], dtype=np.int64),
            np.asarray(self.epochs[:length], dtype=np.int64),
            np.asarray(self.floats[:length], dtype=np.float64),
        )


class History:
    """Append-only scalar series by name; ``batch_loss`` holds the training batch losses."""

    BATCH_LOSS = "batch_loss"

    def __init__(self) -> None:
        self._columns: dict[str, _Column] = {}
        self._read_lock = threading.Lock()

    def append(self, name: str, step: int, epoch: int, value) -> None:
        """Record ``value`` (a float or a tensor with one element) for ``name`` at ``step``."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
            value = value.detach().reshape(())
        else:
            value = float(value)
        column = self._columns.get(name)
        if column is None:
            column = self._columns.setdefault(name, _Column())
        column.steps.append(step)
        column.epochs.append(epoch)
        column.raw.append(value)

    def lengths(self) -> dict[str, int]:
        """The current length of every series: a consistent cut to read up to later."""
        return {name: len(col.raw) for name, col in list(self._columns.items())}

    def read(self, cut: dict[str, int] | None = None) -> dict[str, Series]:
        """Every series, each up to its length in ``cut`` (default: everything so far)."""
        cut = self.lengths() if cut is None else cut
        with self._read_lock:
            return {name: self._columns[name].series(n) for name, n in cut.items()}


def epoch_means(series: Series) -> Series:
    """Mean value per epoch; the step of each mean is the epoch's last step."""
    if len(series.values) == 0:
        return series
    epochs = np.unique(series.epochs)
    steps = np.array([series.steps[series.epochs == e].max() for e in epochs], dtype=np.int64)
    finite = np.isfinite(series.values)
    means = np.array(
        [
            series.values[(series.epochs == e) & finite].mean()
            if ((series.epochs == e) & finite).any()
            else math.nan
            for e in epochs
        ]
    )
    return Series(steps, epochs.astype(np.int64), means)
