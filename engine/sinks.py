"""Sinks: where a Monitor's frames go besides its run directory, on the recorder thread.

``Monitor(..., sinks=[TensorBoardSink("runs/tb")])`` hands every frame of every probe to each
sink, in order, on the recorder thread (never the training thread), and, every time the
recorder wakes, the new points of every scalar series of the run (each batch's loss, every
``monitor.log`` value). A sink that raises is dropped with one warning; training, the run
directory and the other sinks go on. ``export_tensorboard(run, log_dir)`` (``probescope export
RUN --format tensorboard``) writes a recorded run through the same sink.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from probescope.history import Series, display_name
from probescope.probes.loss import frame_series

if TYPE_CHECKING:
    from probescope.ring import Frame
    from probescope.run import Run

log = logging.getLogger("probescope")


class Sink:
    """What a Monitor gives a sink; every method is a no-op until overridden. All are called
    from the Monitor's recorder thread, one at a time."""

    #: Whether ``scalars`` is wanted (reading the run's series costs the recorder a little).
    wants_scalars = False

    def add_probe(self, name: str, kind: str, config: Mapping, static: Mapping[str, np.ndarray]) -> None:
        """A probe of the run, before its first frame (its ``static`` arrays, e.g. the columns
        of a StatsProbe)."""

    def write(self, frame: Frame) -> None:
        """One frame of a probe, in each probe's order."""

    def scalars(self, series: Mapping[str, Series]) -> None:
        """Every scalar series of the run so far (``train_loss``, logged values)."""

    def close(self) -> None:
        """The run ended: flush and release."""


class TensorBoardSink(Sink):
    """Frames to TensorBoard event files in ``log_dir`` (``tensorboard --logdir DIR``).

    Scalars: every point of the run's series (``loss/train_loss``, ``loss/<logged name>``),
    once each, in step order; a LossProbe's own series (``train_loss_epoch``, its valid loss
    and metrics); every number a frame holds (``<probe>/accuracy``, ``<probe>/total_loss``,
    ``<probe>/best``, ...) and each column of a StatsProbe (``<probe>/<column>``).
    Images (``images``): each frame's RGBA map (GridProbe, NeuronProbe) as ``<probe>/map``,
    at most ``max_image_side`` pixels on a side (larger maps are strided down).
    Histograms (``histograms``): a PredictionProbe's per-sample values (the probability of
    the true class, or the prediction) as ``<probe>/<key>``. Needs the ``tensorboard``
    package (``pip install probescope[tensorboard]``)."""

    wants_scalars = True

    #: PredictionProbe and CurveProbe arrays drawn as histograms over time.
    HISTOGRAMS = ("prob_true", "prob_pos", "y_pred")

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        images: bool = True,
        histograms: bool = True,
        max_image_side: int = 1024,
        flush_secs: float = 10.0,
    ):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's writer imports the tensorboard package
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: pip install probescope[tensorboard]"
            ) from err
        if max_image_side < 1:
            raise ValueError(f"TensorBoardSink: max_image_side must be at least 1, got {max_image_side}")
        self.log_dir = Path(log_dir)
        self.images, self.histograms, self.max_image_side = images, histograms, max_image_side
        self._writer = SummaryWriter(str(self.log_dir), flush_secs=flush_secs)
        self._columns: dict[str, list[str]] = {}
        self._last: dict[str, int] = {}  # the step of the last point written, per scalar tag

    def add_probe(self, name: str, kind: str, config: Mapping, static: Mapping[str, np.ndarray]) -> None:
        if "columns" in static:
            self._columns[name] = [str(c) for c in static["columns"]]

    def write(self, frame: Frame) -> None:
        data, step = frame.data, frame.step
        series = frame_series(data)
        if series:  # a LossProbe frame: its points newer than those written already
            for name, (steps, values) in series.items():
                self._series(f"loss/{name}", steps, values)
        if "values" in data and frame.probe in self._columns:  # a StatsProbe's table row
            for column, value in zip(self._columns[frame.probe], data["values"].tolist(), strict=True):
                self._scalar(f"{frame.probe}/{column}", step, value)
        for key, value in data.items():
            value = np.asarray(value)
            if value.ndim == 0 and value.dtype.kind in "fiub":
                self._scalar(f"{frame.probe}/{key}", step, float(value))
            elif self.histograms and key in self.HISTOGRAMS and value.ndim == 1 and value.size:
                finite = value[np.isfinite(value)]
                if finite.size:
                    self._writer.add_histogram(f"{frame.probe}/{key}", finite, step)
        rgba = data.get("rgba")
        if self.images and rgba is not None and rgba.ndim == 3 and rgba.shape[2] == 4:
            stride = -(-max(rgba.shape[:2]) // self.max_image_side)
            image = np.ascontiguousarray(rgba[::stride, ::stride])  # row 0 is the top, as drawn
            self._writer.add_image(f"{frame.probe}/map", image, step, dataformats="HWC")

    def scalars(self, series: Mapping[str, Series]) -> None:
        for name, s in series.items():
            self._series(f"loss/{display_name(name)}", s.steps, s.values)

    def _series(self, tag: str, steps: np.ndarray, values: np.ndarray) -> None:
        last = self._last.get(tag)
        start = 0 if last is None else int(np.searchsorted(steps, last, side="right"))
        for step, value in zip(steps[start:].tolist(), values[start:].tolist(), strict=True):
            self._writer.add_scalar(tag, value, step)
        if len(steps) > start:
            self._last[tag] = int(steps[-1])

    def _scalar(self, tag: str, step: int, value: float) -> None:
        if step > self._last.get(tag, -1):  # once per step (a final frame may repeat the last)
            self._writer.add_scalar(tag, value, step)
            self._last[tag] = step

    def close(self) -> None:
        self._writer.close()


def export_tensorboard(run: Run, log_dir: str | os.PathLike, probes=None, progress: bool = True) -> Path:
    """Write a recorded run's frames (``probes``: names, default all) as TensorBoard event
    files in ``log_dir``, as a live ``TensorBoardSink`` would have (the run's series as its
    LossProbe frames hold them). Returns ``log_dir``."""
    from tqdm.auto import tqdm

    sink = TensorBoardSink(log_dir)
    names = list(run.probes) if probes is None else list(probes)
    try:
        for name in names:
            record = run.probe(name)
            sink.add_probe(name, record.kind, record.config, record.static)
            for frame in tqdm(
                record.frames(), total=len(record), desc=f"tensorboard {name}", disable=not progress
            ):
                sink.write(frame)
    finally:
        sink.close()
    return Path(log_dir)
