"""FrameRing: a fixed set of preallocated frame slots that the probe writes and readers poll.

The writer never waits for a reader: it always takes the slot after the newest one and
overwrites whatever was there. Readers never wait for the writer: ``latest()`` copies the
newest completed slot and checks (seqlock-style) that it was not rewritten meanwhile.
A reader that falls more than ``capacity`` frames behind loses the overwritten frames;
they are counted in ``dropped``.

Frames made of CUDA tensors also keep a device copy: ``capacity`` device slots, each with
an event recorded after its copy, so ``latest_device()`` hands a GPU reader (the viewer's
CUDA-OpenGL upload) the newest completed slot without any synchronisation. The host copy
goes through pinned buffers owned by the slot (non-blocking copies and an event wait on
the writer's thread, never a stream synchronisation).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from probescope.units import bytes_text


@dataclass
class Frame:
    """One probe output: arrays plus the step, epoch and wall time they belong to."""

    probe: str
    seq: int
    step: int
    epoch: int
    time: float
    data: dict[str, np.ndarray] = field(repr=False)


@dataclass
class DeviceFrame:
    """The device copy of one frame: tensors that stay valid until the ring laps the slot."""

    probe: str
    seq: int
    step: int
    epoch: int
    tensors: dict[str, torch.Tensor] = field(repr=False)


class _Slot:
    __slots__ = ("arrays", "device", "epoch", "event", "pinned", "seq", "step", "time", "version")

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.device: dict[str, torch.Tensor] = {}  # CUDA frames: the device copy
        self.pinned: dict[str, torch.Tensor] = {}  # CUDA frames: the pinned host copy
        self.event = None  # recorded after the device copy
        self.version = 0  # odd while being written
        self.seq = -1
        self.step = 0
        self.epoch = 0
        self.time = 0.0


#: The torch dtypes a CPU slot's NumPy arrays can hold (a claimed tensor is a view of one).
_NUMPY_DTYPES = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
}


#: The share of free memory the rings of large frames may take together, host and device
#: apart (the snapshot's copies may take half).
RING_SHARE = 0.25


def fit_capacities(
    frame_bytes: Mapping[str, int | None], capacity: int, host_free: int | None, device_free: int | None
) -> tuple[dict[str, int], str | None]:
    """Each ring's slots: ``capacity``, or for rings of large frames (``frame_bytes``, known
    where a probe says) fewer, as many as fit together in ``RING_SHARE`` of the host's free
    memory (every frame has a host copy) and of the device's (``device_free``: CUDA frames,
    which keep a device copy too; None: no limit known), and why; at least 2 a ring (ValueError
    past that: lower the resolution)."""
    large = {name: b for name, b in frame_bytes.items() if b}
    total = sum(large.values())
    fits = capacity
    for free in (host_free, device_free):
        if free is not None and total:
            fits = min(fits, int(free * RING_SHARE) // total)
    capacities = {name: capacity for name in frame_bytes}
    if fits >= capacity:
        return capacities, None
    sizes = ", ".join(f"{name!r} {bytes_text(b)}" for name, b in large.items())
    room = f"a frame of {sizes} in {capacity} slots would take over {RING_SHARE:.0%} of the free memory"
    if fits < 2:
        raise ValueError(f"Monitor: {room}, and two slots do not fit either; lower the probes' resolution")
    capacities.update(dict.fromkeys(large, fits))
    return (
        capacities,
        f"{room}; their rings keep {fits} slots (a viewer or recorder that falls behind loses frames sooner)",
    )


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays of one shape and dtype are the same memory, element for element."""
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.strides == b.strides


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.stride() == b.stride()
        and a.device == b.device
    )


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):  # (CUDA ones go through _write_device)
        value = value.detach()
        return (value if value.device.type == "cpu" else value.cpu()).numpy()
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
    def nbytes(self) -> dict[str, int]:
        """The memory the ring's slots hold now (they grow to ``capacity`` frames as frames
        come): ``host`` (arrays, pinned buffers among them) and ``device`` (CUDA slots)."""
        host, device, seen = 0, 0, set()
        for slot in self._slots:
            for a in [*list(slot.arrays.values()), *(t.numpy() for t in list(slot.pinned.values()))]:
                key = (a.__array_interface__["data"][0], a.nbytes)
                if key not in seen:  # a CUDA frame's arrays are its pinned buffers
                    seen.add(key)
                    host += a.nbytes
            device += sum(t.numel() * t.element_size() for t in list(slot.device.values()))
        return {"host": host, "device": device}

    @property
    def newest_seq(self) -> int:
        """Sequence number of the newest completed frame, -1 when empty."""
        return self._next_seq - 1

    def claim(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Storage for ``key`` in the slot the next ``write`` fills, for a probe's kernels to
        write the frame straight into; ``write`` copies nothing for a value that is this tensor.

        The slot's old frame is given up at once (a reader finds it gone and counts it
        dropped), so while a frame is being made the ring holds ``capacity - 1`` others. On the
        CPU the storage is the slot's own array; a dtype NumPy lacks (bfloat16) gets a tensor
        of its own, which ``write`` copies as any other value."""
        slot = self._slots[self._next_seq % self.capacity]
        self._open(slot)
        shape = tuple(shape)
        if device.type == "cuda":
            if device.index is None:  # "cuda": the current device, as a tensor's device names it
                device = torch.device("cuda", torch.cuda.current_device())
            dst = slot.device.get(key)
            if dst is None or tuple(dst.shape) != shape or dst.dtype != dtype or dst.device != device:
                dst = slot.device[key] = torch.empty(shape, dtype=dtype, device=device)
            return dst
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if device.type != "cpu" or np_dtype is None:
            return torch.empty(shape, dtype=dtype, device=device)
        dst = slot.arrays.get(key)
        if dst is None or dst.shape != shape or dst.dtype != np_dtype:
            dst = slot.arrays[key] = np.empty(shape, np_dtype)
        return torch.from_numpy(dst)

    @staticmethod
    def _open(slot: _Slot) -> None:
        if slot.version % 2 == 0:
            slot.version += 1  # odd: readers of the old content will notice
            slot.seq = -1

    def write(self, data: Mapping[str, object], step: int, epoch: int) -> int:
        """Copy ``data`` into the next slot, reusing its arrays when shapes match (a value that
        is the slot's own storage, from ``claim``, is not copied); returns seq."""
        seq = self._next_seq
        slot = self._slots[seq % self.capacity]
        self._open(slot)
        arrays = slot.arrays
        for key in list(arrays):
            if key not in data:
                del arrays[key]
        cuda = {k: v for k, v in data.items() if isinstance(v, torch.Tensor) and v.is_cuda}
        if cuda:
            self._write_device(slot, cuda)
        for key, value in data.items():
            if key in cuda:
                arrays[key] = slot.pinned[key].numpy()
                continue
            src = _as_numpy(value)
            dst = arrays.get(key)
            if dst is not None and dst.shape == src.shape and dst.dtype == src.dtype:
                if not _same_array(dst, src):  # else written in place (claim)
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

    def _write_device(self, slot: _Slot, tensors: dict[str, torch.Tensor]) -> None:
        from probescope.streams import to_host

        slot.seq = -1  # not a completed device frame until the new event is recorded
        for key, t in tensors.items():
            dst = slot.device.get(key)
            if dst is None or dst.shape != t.shape or dst.dtype != t.dtype or dst.device != t.device:
                slot.device[key] = torch.empty_like(t, memory_format=torch.contiguous_format)
        # One multi-tensor copy: each call from the probe thread is a moment it takes Python's
        # lock from the training thread, so a frame makes as few as it can. A tensor that is
        # the slot's own (claim) is already there.
        copies = [k for k, t in tensors.items() if not _same_tensor(slot.device[k], t)]
        if copies:
            torch._foreach_copy_([slot.device[k] for k in copies], [tensors[k].detach() for k in copies])
        for key in [k for k in slot.device if k not in tensors]:
            del slot.device[key]
        slot.event = torch.cuda.Event()
        slot.event.record()
        keys = list(tensors)
        pinned = to_host([slot.device[k] for k in keys], [slot.pinned.get(k) for k in keys])
        slot.pinned = dict(zip(keys, pinned, strict=True))

    def latest_device(self) -> DeviceFrame | None:
        """The newest frame whose device copy has completed (CUDA frames only); never syncs."""
        for seq in range(self.newest_seq, max(-1, self.newest_seq - self.capacity), -1):
            slot = self._slots[seq % self.capacity]
            if slot.seq == seq and slot.device and slot.event is not None and slot.event.query():
                return DeviceFrame(self.name, seq, slot.step, slot.epoch, dict(slot.device))
        return None

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
