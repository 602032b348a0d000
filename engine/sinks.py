"""Sinks: where a Monitor's frames go besides its run directory, on the recorder thread.

``Monitor(..., sinks=[TensorBoardSink("runs/tb")])`` hands every frame of every probe to each
sink, in order, on the recorder thread (never the training thread), and, every time the
recorder wakes, the new points of every scalar series of the run (each batch's loss, every
``monitor.log`` value). A sink that raises is dropped with one warning; training, the run
directory and the other sinks go on. ``export_tensorboard(run, log_dir)`` (``probescope export
RUN --format tensorboard``) writes a recorded run through the same sink.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from probescope.history import Series, display_name
from probescope.probes.loss import frame_series, own_series
from probescope.probes.views import frame_layout, is_own_kind, picture_rgba

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

    def resume(self, step: int) -> None:
        """The run is resumed after ``step`` (``Monitor(resume=...)``): what the sink holds of
        later steps belongs to a timeline the run went back on."""

    def scalars(self, series: Mapping[str, Series]) -> None:
        """Every scalar series of the run so far (``train_loss``, logged values)."""

    def close(self) -> None:
        """The run ended: flush and release."""


_FILES = itertools.count()  # event files this process opened: each name is its own


def _masked_crc(data: bytes) -> int:
    """The masked CRC-32C a TFRecord carries (google-crc32c's C implementation)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class EventFile:
    """A TensorBoard event file: TFRecords of serialised ``Event`` protos, written on the
    caller's thread. (tensorboard's own writer checksums every record in pure Python, holding
    the lock a CPU training loop needs: ``python -m benchmarks.sinks`` times both.)"""

    def __init__(self, log_dir: str | os.PathLike, flush_secs: float = 10.0):
        from tensorboard.compat.proto.event_pb2 import Event

        self._event = Event
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a directory's files in name order: the counter is padded so that a
        # process's tenth file of a second does not sort before its ninth (a resumed run's
        # purge of the steps it goes back on would come before the points it drops).
        stamp = f"{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_FILES):06d}"
        name = f"events.out.tfevents.{stamp}"
        self.path = folder / name
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._flush_secs, self._flushed = flush_secs, time.monotonic()
        self._add(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, step: int, summary) -> None:
        """One ``Summary`` proto at ``step``."""
        self._add(self._event(wall_time=time.time(), step=step, summary=summary))

    def add_event(self, step: int, **fields) -> None:
        """An ``Event`` with other ``fields`` (a ``session_log``) at ``step``."""
        self._add(self._event(wall_time=time.time(), step=step, **fields))

    def _add(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(b"".join((header, struct.pack("<I", _masked_crc(header)), data,
                                   struct.pack("<I", _masked_crc(data)))))  # fmt: skip
        if time.monotonic() - self._flushed > self._flush_secs:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink(Sink):
    """Frames to TensorBoard event files in ``log_dir`` (``tensorboard --logdir DIR``).

    Scalars: every point of the run's series (``loss/train_loss``, ``loss/<logged name>``),
    once each, in step order; a LossProbe's own series (``train_loss_epoch``, its valid loss
    and metrics); every number a frame holds (``<probe>/accuracy``, ``<probe>/total_loss``,
    ``<probe>/best``, ...) and each column of a StatsProbe (``<probe>/<column>``).
    Images (``images``): each frame's RGBA map (GridProbe, NeuronProbe) as ``<probe>/map``,
    at most ``max_image_side`` pixels on a side (larger maps are strided down).
    Histograms (``histograms``): a PredictionProbe's per-sample values (the probability of
    the true class or of each label's true state, or the prediction) as ``<probe>/<key>``.
    A HistogramProbe's tensors (``histograms``) as TensorBoard histograms ``<probe>/<tensor>``
    (its own bins; the sums TensorBoard keeps beside them are taken at the bins' centres).
    A probe of the user's own kind: its pictures as the viewer draws them
    (probescope.probes.views): images, heat maps and mosaics of maps as the images
    ``<probe>/<key>``, histograms' values as histograms.
    Needs the ``tensorboard`` and ``google-crc32c`` packages (``pip install
    probescope[tensorboard]``); the event files are flushed every ``flush_secs`` and at the end."""

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
            import google_crc32c  # noqa: F401
            from tensorboard.compat.proto.summary_pb2 import Summary
        except ImportError as err:
            raise ImportError(
                "TensorBoardSink needs the tensorboard and google-crc32c packages: "
                "pip install probescope[tensorboard]"
            ) from err
        if max_image_side < 1:
            raise ValueError(f"TensorBoardSink: max_image_side must be at least 1, got {max_image_side}")
        self.log_dir = Path(log_dir)
        self.images, self.histograms, self.max_image_side = images, histograms, max_image_side
        self._summary = Summary
        self._had_files = any(self.log_dir.glob("*tfevents*"))
        self._floor = -1  # steps up to this one are in the log directory already (resume)
        self._flush_secs = flush_secs
        self._file: EventFile | None = None  # made at the first event: a sink that a rank which
        # does not probe was given (every rank runs the script) leaves no file behind
        self._columns: dict[str, list[str]] = {}
        self._last: dict[str, int] = {}  # the step of the last point written, per scalar tag
        self._own: dict[str, set[str]] = {}  # per LossProbe, the series it makes itself
        self._given_series = False  # whether the run's series come whole (scalars)
        self._own_kinds: dict[str, dict] = {}  # probes of the user's own kind: their views
        self._tensors: dict[str, list[str]] = {}  # HistogramProbes: their tensors' names

    def resume(self, step: int) -> None:
        """Into a log directory that held event files already (the run's, written before):
        TensorBoard is told to drop what they hold after ``step`` (a session start there, as
        torch's ``SummaryWriter(purge_step=...)`` writes), and the series up to ``step`` are
        not written again. Into a new one, everything the run gives from now on is written."""
        if not self._had_files:
            return
        from tensorboard.compat.proto.event_pb2 import SessionLog

        self._events().add_event(step + 1, session_log=SessionLog(status=SessionLog.START))
        self._floor = step

    def add_probe(self, name: str, kind: str, config: Mapping, static: Mapping[str, np.ndarray]) -> None:
        if "columns" in static:
            self._columns[name] = [str(c) for c in static["columns"]]
        if kind == "loss":
            self._own[name] = own_series(config)
        if is_own_kind(kind):
            self._own_kinds[name] = dict(config.get("views") or {})
        if kind == "histograms":
            self._tensors[name] = [str(n) for n in static["names"]]

    def write(self, frame: Frame) -> None:
        data, step = frame.data, frame.step
        series = frame_series(data)
        own = self._own.get(frame.probe)
        for name, (steps, values) in series.items():  # a LossProbe frame: its newer points
            if self._given_series and own is not None and name not in own:
                continue  # the run's series: whole from scalars() (a frame's may be cut to max_points)
            self._series(f"loss/{name}", steps, values)
        if "values" in data and frame.probe in self._columns:  # a StatsProbe's table row
            for column, value in zip(self._columns[frame.probe], data["values"].tolist(), strict=True):
                self._scalar(f"{frame.probe}/{column}", step, value)
        for key, value in data.items():
            value = np.asarray(value)
            if value.ndim == 0 and value.dtype.kind in "fiub":
                self._scalar(f"{frame.probe}/{key}", step, float(value))
            elif self.histograms and key in self.HISTOGRAMS and value.ndim in (1, 2) and value.size:
                self._histogram(f"{frame.probe}/{key}", step, value)  # a row per sample: all of it
        if frame.probe in self._tensors and self.histograms:
            self._tensor_histograms(frame.probe, step, data)
        views = self._own_kinds.get(frame.probe)
        if views is not None:
            self._own_picture(frame.probe, step, data, views)
            return
        rgba = data.get("rgba")
        if self.images and rgba is not None and rgba.ndim == 3 and rgba.shape[2] == 4:
            self._image(f"{frame.probe}/map", step, rgba)

    def _own_picture(self, probe: str, step: int, data: Mapping, views: Mapping) -> None:
        """A probe of the user's own kind: each of its pictures as the viewer draws them (images,
        heat maps and mosaics of maps as ``<probe>/<key>`` images, a histogram's values as a
        histogram; a line has no TensorBoard picture)."""
        for key, view in frame_layout(data, views).pictures:
            value = np.asarray(data[key])
            if view in ("image", "heatmap", "maps") and self.images:
                self._image(f"{probe}/{key}", step, picture_rgba(key, view, value, views)[0])
            elif view == "histogram" and self.histograms:
                self._histogram(f"{probe}/{key}", step, value)

    def _tensor_histograms(self, probe: str, step: int, data: Mapping) -> None:
        """A HistogramProbe frame: each tensor with a finite entry, as the histogram it made."""
        from torch.utils.tensorboard.summary import histogram_raw

        for name, counts, (lo, hi) in zip(self._tensors[probe], data["counts"], data["range"], strict=True):
            if np.isnan(lo):
                continue
            edges = np.linspace(lo, hi, len(counts) + 1)
            centres = (edges[:-1] + edges[1:]) / 2
            histogram = histogram_raw(
                f"{probe}/{name}", min=float(lo), max=float(hi), num=int(counts.sum()),
                sum=float(counts @ centres), sum_squares=float(counts @ centres**2),
                bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),
            )  # fmt: skip
            self._events().add(step, histogram)

    def _histogram(self, tag: str, step: int, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        if finite.size:
            from torch.utils.tensorboard.summary import histogram

            self._events().add(step, histogram(tag, finite, "auto"))

    def _image(self, tag: str, step: int, rgba: np.ndarray) -> None:
        """An (H, W, 4) uint8 picture, row 0 on top, at most ``max_image_side`` on a side
        (strided down)."""
        from PIL import Image

        stride = -(-max(rgba.shape[:2]) // self.max_image_side)
        rgba = rgba[::stride, ::stride]
        png = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgba)).save(png, format="PNG", compress_level=1)  # RGBA: 4 bytes
        height, width = rgba.shape[:2]
        image = self._summary.Image(
            height=height, width=width, colorspace=4, encoded_image_string=png.getvalue()
        )
        self._events().add(step, self._summary(value=[self._summary.Value(tag=tag, image=image)]))

    def _add_scalar(self, tag: str, step: int, value: float) -> None:
        self._events().add(step, self._summary(value=[self._summary.Value(tag=tag, simple_value=value)]))

    def scalars(self, series: Mapping[str, Series]) -> None:
        self._given_series = True
        for name, s in series.items():
            self._series(f"loss/{display_name(name)}", s.steps, s.values)

    def _series(self, tag: str, steps: np.ndarray, values: np.ndarray) -> None:
        last = max(self._last.get(tag, -1), self._floor)
        start = int(np.searchsorted(steps, last, side="right"))
        for step, value in zip(steps[start:].tolist(), values[start:].tolist(), strict=True):
            self._add_scalar(tag, step, value)
        if len(steps) > start:
            self._last[tag] = int(steps[-1])

    def _scalar(self, tag: str, step: int, value: float) -> None:
        if step > max(self._last.get(tag, -1), self._floor):  # once per step (a final frame repeats)
            self._add_scalar(tag, step, value)
            self._last[tag] = step

    def _events(self) -> EventFile:
        if self._file is None:
            self._file = EventFile(self.log_dir, self._flush_secs)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def export_tensorboard(run: Run, log_dir: str | os.PathLike, probes=None, progress: bool = True) -> Path:
    """Write a recorded run's frames (``probes``: names, default all) as TensorBoard event
    files in ``log_dir``, as a live ``TensorBoardSink`` would have: the run's series whole
    from its history (a run not closed: as its journal last had them, then as its newest
    LossProbe frame holds them), with
    every probe or a LossProbe among ``probes``. Returns ``log_dir``."""
    from tqdm.auto import tqdm

    sink = TensorBoardSink(log_dir)
    names = list(run.probes) if probes is None else list(probes)
    try:
        history = run.history()  # (a run not closed: its journal, then its newest LossProbe frame)
        if history and (probes is None or any(run.probe(name).kind == "loss" for name in names)):
            sink.scalars(history)
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
