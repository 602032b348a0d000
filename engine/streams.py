"""CUDA streams and events that keep probes off the training stream.

The training thread never waits on the host for a probe. At a step boundary it records an
event on its stream; the probe stream waits for it (on the GPU) and copies the weights into
a shadow model; the probe stream records ``copied``; the training stream waits for
``copied`` (on the GPU) before the weights change again: before the next optimizer step when
the Monitor knows the optimizer (so the next forward and backward overlap the copy), else
right away. Probes then run on the probe stream and their results come back through pinned
host buffers and event waits on the worker thread, never through a stream synchronisation.

PyTorch's default stream already has the lowest priority, so probes cannot be made to yield
to it; ``ProbeStreams(high_priority_training=True)`` gives training a stream of the highest
priority to run on (``Monitor.training_stream()``), and the probe stream keeps the lowest.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator

import torch


class ProbeStreams:
    """The probe stream of one CUDA device and the events that order it against training."""

    def __init__(self, device: torch.device, high_priority_training: bool = False):
        self.device = device
        priority_range = getattr(torch.cuda.Stream, "priority_range", None)
        low, high = priority_range() if priority_range else (0, -1)  # lower number: higher priority
        self.probe = torch.cuda.Stream(device, priority=low)
        self.training = torch.cuda.Stream(device, priority=high) if high_priority_training else None
        self._pending: torch.cuda.Event | None = None
        self._lock = threading.Lock()

    def start_snapshot(self) -> None:
        """On the training thread: make the probe stream wait for everything enqueued so far."""
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self.probe.wait_event(ready)

    def end_snapshot(self, wait_now: bool) -> None:
        """On the training thread, after the copy was enqueued on the probe stream: the
        training stream waits for it now, or at the next optimizer step (``wait_now=False``)."""
        copied = torch.cuda.Event()
        copied.record(self.probe)
        if wait_now:
            torch.cuda.current_stream(self.device).wait_event(copied)
        else:
            with self._lock:
                self._pending = copied

    def before_weights_change(self) -> None:
        """On the training thread (an optimizer step pre-hook): wait, on the GPU, for the copy."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            torch.cuda.current_stream(self.device).wait_event(pending)

    @contextlib.contextmanager
    def probe_context(self) -> Iterator[None]:
        """Run the enclosed probe work on the probe stream."""
        with torch.cuda.stream(self.probe):
            yield

    @contextlib.contextmanager
    def training_context(self) -> Iterator[None]:
        """Run the enclosed training on the high-priority training stream (if there is one)."""
        if self.training is None:
            yield
            return
        self.training.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.training):
            yield
        torch.cuda.current_stream(self.device).wait_stream(self.training)


class StepClock:
    """Training step durations from CUDA events on the training stream, read without a sync.

    ``mark(tag)`` records an event at a step boundary and returns ``(seconds, tag)`` for every
    step whose closing event has completed since the last call (the tag is the one given with
    that closing event). Steps are timed on the GPU's own timeline, so asynchronous launches
    do not hide their cost; nothing waits for the GPU.
    """

    def __init__(self, device: torch.device | None = None, event_factory=None):
        self.device = device
        self._new_event = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self._pending: deque = deque()
        self._spare: list = []  # finished events, recorded again: no event creation per step

    def mark(self, tag=None) -> list[tuple[float, object]]:
        event = self._spare.pop() if self._spare else self._new_event()
        event.record(torch.cuda.current_stream(self.device) if self.device is not None else None)
        self._pending.append((event, tag))
        done = []
        while len(self._pending) >= 2 and self._pending[1][0].query():
            start, _ = self._pending.popleft()
            end, end_tag = self._pending[0]
            done.append((start.elapsed_time(end) / 1000.0, end_tag))
            self._spare.append(start)
        return done


def to_host(tensors: list[torch.Tensor], buffers: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Copy CUDA tensors into pinned host buffers (reused when they fit) without a stream
    synchronisation: non-blocking copies on the current stream, then one event wait."""
    if buffers is None or len(buffers) != len(tensors):
        buffers = [None] * len(tensors)
    out = [
        buf
        if buf is not None and buf.shape == t.shape and buf.dtype == t.dtype
        else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        for t, buf in zip(tensors, buffers, strict=True)
    ]
    torch._foreach_copy_(out, tensors, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()  # waits for this event only; the training stream is not involved
    return out
