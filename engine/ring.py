"""FrameRing: a fixed set of preallocated frame slots that the probe writes and readers poll.

The writer never waits for a reader: it always takes the slot after the newest one and
overwrites whatever was there. Readers never wait for the writer: ``latest()`` copies the
newest completed slot and checks (seqlock-style) that it was not rewritten meanwhile.
A reader that falls more than ``capacity`` frames behind loses the overwritten frames;
they are counted in ``dropped``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Frame:
    """One probe output: arrays plus the step, epoch and wall time they belong to."""

    probe: str
    seq: int
    step: int
    epoch: int
    time: float
    data: dict[str, np.ndarray] = field(repr=False)


class _Slot:
    __slots__ = ("arrays", "epoch", "seq", "step", "time", "version")

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.version = 0  # odd while being written
        self.seq = -1
        self.step = 0
        self.epoch = 0
        self.time = 0.0


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class FrameRing:
    """Ring of ``capacity`` frame slots for one probe, with sequence numbers."""

    def __init__(
        self,
        name: str,
        capacity: int = 8,
        on_commit: Callable[[], None] | None = None,
    ):
        if capacity < 2:
            raise ValueError(f"FrameRing capacity must be at least 2, got {capacity}")
        self.name = name
        self.capacity = capacity
        self._slots = [_Slot() for _ in range(capacity)]
        self._next_seq = 0
        self._on_commit = on_commit
        self.written = 0
        self.dropped = 0

    @property
    def newest_seq(self) -> int:
        """Sequence number of the newest completed frame, -1 when empty."""
        return self._next_seq - 1

    def write(self, data: Mapping[str, object], step: int, epoch: int) -> int:
        """Copy ``data`` into the next slot, reusing its arrays when shapes match; returns seq."""
        seq = self._next_seq
        slot = self._slots[seq % self.capacity]
        slot.version += 1  # odd: readers of the old content will notice
        arrays = slot.arrays
        for key in list(arrays):
            if key not in data:
                del arrays[key]
        for key, value in data.items():
            src = _as_numpy(value)
            dst = arrays.get(key)
            if dst is not None and dst.shape == src.shape and dst.dtype == src.dtype:
                np.copyto(dst, src)
            else:
                arrays[key] = np.array(src, copy=True)
        slot.seq, slot.step, slot.epoch, slot.time = seq, step, epoch, time.time()
        slot.version += 1
        self._next_seq = seq + 1
        self.written += 1
        if self._on_commit is not None:
            self._on_commit()
        return seq

    def _read(self, seq: int) -> Frame | None:
        """A consistent copy of frame ``seq``, or None if it is gone or being overwritten."""
        slot = self._slots[seq % self.capacity]
        before = slot.version
        if before % 2 or slot.seq != seq:
            return None
        frame = Frame(
            probe=self.name,
            seq=slot.seq,
            step=slot.step,
            epoch=slot.epoch,
            time=slot.time,
            data={k: v.copy() for k, v in slot.arrays.items()},
        )
        return frame if slot.version == before else None

    def latest(self) -> Frame | None:
        """The newest completed frame (a copy), or None before the first; never blocks."""
        while True:
            seq = self.newest_seq
            if seq < 0:
                return None
            frame = self._read(seq)
            if frame is not None:
                return frame
            # The writer lapped us mid-copy: the newest frame is newer now, try that one.

    def read_since(self, seq: int) -> list[Frame]:
        """Every frame newer than ``seq`` still in the ring, oldest first; counts lost ones."""
        frames = []
        newest = self.newest_seq
        oldest_kept = max(0, newest - self.capacity + 1)
        if seq + 1 < oldest_kept:
            self.dropped += oldest_kept - (seq + 1)
            seq = oldest_kept - 1
        for s in range(seq + 1, newest + 1):
            frame = self._read(s)
            if frame is None:
                self.dropped += 1
            else:
                frames.append(frame)
        return frames
