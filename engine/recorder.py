"""The Monitor's recorder: a thread that takes every frame from the probes' rings to the run
directory and the sinks, and the run's scalar series to the sinks and to the run's journal.

It wakes when a ring commits a frame (and every quarter second): the series first (a sink that
takes them writes them whole, and a LossProbe frame's copy, cut to its ``max_points``, adds
nothing to them), then each probe's new frames in order. A frame the run directory cannot
store, or a sink that raises, costs one warning; the recorder goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence

import torch

from probescope.history import History, Series
from probescope.run import RunWriter
from probescope.sinks import Sink
from probescope.worker import start_thread

log = logging.getLogger("probescope")


class Recorder:
    """Records the frames of ``states`` (the Monitor's probe states: probe, ring and the
    sequence numbers recorded and written) and the series of ``history``.

    ``wake`` is the event the rings set as they commit a frame. ``training_stream``: the CUDA
    stream training runs on (device losses are read on it, after the work that made them), or
    None."""

    def __init__(
        self,
        states: Sequence,
        history: History,
        sinks: Iterable[Sink],
        wake: threading.Event,
        training_stream: torch.cuda.Stream | None = None,
    ):
        self.states = states
        self.history = history
        self.sinks: list[Sink] = list(sinks)
        self.wake = wake
        self.training_stream = training_stream
        self.writer: RunWriter | None = None
        self.journal_seconds = math.inf  # (start() gives the Monitor's JOURNAL_SECONDS)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._journaled_at = 0.0  # when the series were last appended to the journal
        self._unread = False  # the history could not be read (warned once)

    def start(self, writer: RunWriter | None, threads: int, journal_seconds: float) -> None:
        """Start the thread, writing to ``writer`` (None: to the sinks only), the series into
        its journal every ``journal_seconds``."""
        self.writer, self.journal_seconds = writer, journal_seconds
        self._thread = start_thread(self._loop, "probescope-recorder", threads)

    def stop(self) -> None:
        """Record what the rings hold still, then end the thread (idempotent)."""
        self._stopping = True
        self.wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def to_sinks(self, method: str, *args, wanted: str | None = None) -> None:
        """Call ``method`` of every sink (that has ``wanted`` set); a sink that raises is
        dropped with one warning, and the others go on."""
        for sink in list(self.sinks):
            if wanted is not None and not getattr(sink, wanted, False):
                continue
            call = getattr(sink, method, None)
            if call is None:
                continue
            try:
                call(*args)
            except Exception as err:
                self.sinks.remove(sink)
                log.warning(
                    "Monitor: sink %s failed in %s (%s: %s); it gets nothing more, training and the "
                    "run directory go on",
                    type(sink).__name__,
                    method,
                    type(err).__name__,
                    err,
                )

    def _loop(self) -> None:
        while True:
            self.wake.wait(0.25)
            self.wake.clear()
            stopping = self._stopping
            self._record_series(journal=not stopping)  # (at close the Monitor writes them whole)
            for st in self.states:
                self._record_frames(st)
            if stopping:
                return

    def _record_series(self, journal: bool) -> None:
        """The series to the sinks that take them, and every ``journal_seconds`` into the run's
        journal (what a run whose process was killed keeps of them)."""
        to_sinks = any(getattr(sink, "wants_scalars", False) for sink in self.sinks)
        journal = (
            journal
            and self.writer is not None
            and time.monotonic() - self._journaled_at >= self.journal_seconds
        )
        if not (to_sinks or journal):
            return
        series = self._read_history()
        if series is None:
            return
        if to_sinks:
            self.to_sinks("scalars", series, wanted="wants_scalars")
        if journal:
            self.writer.journal_history(series)
            self._journaled_at = time.monotonic()

    def _record_frames(self, st) -> None:
        """The probe's frames committed since the last call, to the run directory and the sinks."""
        for frame in st.ring.read_since(st.recorded_seq):
            st.recorded_seq = frame.seq
            try:
                if self.writer is not None:
                    self.writer.write_frame(frame)  # a full disk: the writer's own warning
            except Exception as err:  # this frame only: the recorder goes on
                st.probe.warn_once(
                    "unwritable",
                    f"a frame could not be written ({type(err).__name__}: {err}); such frames "
                    "are left out of the run directory, the others are written",
                )
            self.to_sinks("write", frame)
            st.written_seq = frame.seq  # its budget stops counting steps against it
        if st.ring.dropped:
            st.probe.warn_once(
                "dropped",
                "the recorder fell behind and lost frames; raise ring_capacity or probe less often",
            )

    def _read_history(self) -> dict[str, Series] | None:
        """Every series so far (None, warned once, if they cannot be read)."""
        stream = self.training_stream
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                return self.history.read()
        except Exception as err:  # once: the recorder asks again at every wake
            if not self._unread:
                log.warning(
                    "Monitor: the sinks and the run's journal get no series (%s: %s)", type(err).__name__, err
                )
            self._unread = True
            return None
