"""FrameRing: preallocated slots, sequence numbers, latest() without waiting, drops counted."""

import threading

import numpy as np
import pytest
import torch

from probescope import FrameRing


def test_latest_is_none_before_the_first_frame_then_the_newest():
    ring = FrameRing("p", capacity=3)
    assert ring.latest() is None
    for step in range(5):
        ring.write({"v": np.full(4, step)}, step=step, epoch=0)
    frame = ring.latest()
    assert (frame.seq, frame.step) == (4, 4) and frame.data["v"].tolist() == [4] * 4


def test_slots_are_reused_when_shapes_match():
    ring = FrameRing("p", capacity=2)
    ring.write({"v": np.zeros((8, 8))}, 0, 0)
    buffer = ring._slots[0].arrays["v"]
    ring.write({"v": np.ones((8, 8))}, 1, 0)
    ring.write({"v": np.full((8, 8), 2.0)}, 2, 0)
    assert ring._slots[0].arrays["v"] is buffer and buffer[0, 0] == 2.0


def test_a_slow_reader_loses_overwritten_frames_and_they_are_counted():
    ring = FrameRing("p", capacity=4)
    for step in range(10):
        ring.write({"v": np.int64(step)}, step, 0)
    frames = ring.read_since(-1)
    assert [f.step for f in frames] == [6, 7, 8, 9]
    assert ring.dropped == 6
    assert ring.read_since(9) == []


def _claimed_frame(ring, step, value, key="v", shape=(6, 5)):
    """A frame written the way a probe's kernels write one: into the claimed slot storage."""
    out = ring.claim(key, shape, torch.float32, torch.device("cpu"))
    out.fill_(value)  # the kernel
    return ring.write({key: out}, step, 0)


def test_a_claimed_slot_is_written_in_place_and_read_like_any_frame():
    ring = FrameRing("p", capacity=3)
    for step in range(7):  # two laps: every slot claimed again, its array reused
        seq = _claimed_frame(ring, step, float(step))
        assert ring.latest().seq == seq and (ring.latest().data["v"] == step).all()
    assert [f.step for f in ring.read_since(3)] == [4, 5, 6]
    claimed = ring.claim("v", (6, 5), torch.float32, torch.device("cpu"))  # the slot of frame 7
    assert np.shares_memory(claimed.numpy(), ring._slots[7 % 3].arrays["v"])  # no copy to make


def test_write_copies_nothing_for_a_claimed_value(monkeypatch):
    ring = FrameRing("p", capacity=2)
    _claimed_frame(ring, 0, 1.0)  # allocates slot 0's array
    _claimed_frame(ring, 1, 1.0)
    copies = []
    real = np.copyto
    monkeypatch.setattr(np, "copyto", lambda dst, src, **kw: (copies.append(dst.shape), real(dst, src, **kw)))
    _claimed_frame(ring, 2, 3.0)
    ring.write({"v": torch.full((6, 5), 4.0)}, 3, 0)  # a value of its own: copied as before
    assert copies == [(6, 5)]
    assert [float(f.data["v"][0, 0]) for f in ring.read_since(1)] == [3.0, 4.0]


def test_claiming_gives_up_the_slots_old_frame_at_once():
    ring = FrameRing("p", capacity=3)
    for step in range(3):
        ring.write({"v": np.full(4, step)}, step, 0)
    out = ring.claim("v", (4,), torch.int64, torch.device("cpu"))  # frame 3 goes where 0 was
    out[:] = -1  # half-made: a reader must not take it for frame 0
    assert [f.step for f in ring.read_since(-1)] == [1, 2] and ring.dropped == 1
    assert ring.latest().step == 2
    out[:] = 3
    ring.write({"v": out}, 3, 0)
    assert [f.data["v"].tolist() for f in ring.read_since(1)] == [[2] * 4, [3] * 4]


def test_a_frame_that_claimed_and_failed_leaves_its_slot_to_the_next_one():
    ring = FrameRing("p", capacity=2)
    ring.write({"v": np.zeros(3)}, 0, 0)
    ring.claim("v", (3,), torch.float64, torch.device("cpu"))  # then the probe raises: no write
    ring.claim("v", (3,), torch.float64, torch.device("cpu"))  # the next frame claims it again
    assert ring.write({"v": np.ones(3)}, 1, 0) == 1
    assert [f.step for f in ring.read_since(-1)] == [0, 1]


def test_a_claim_of_another_shape_or_dtype_replaces_the_slots_array():
    ring = FrameRing("p", capacity=2)
    _claimed_frame(ring, 0, 1.0, shape=(4, 4))
    _claimed_frame(ring, 1, 2.0, shape=(4, 4))
    _claimed_frame(ring, 2, 3.0, shape=(2, 9))  # the grid's resolution changed
    assert ring.latest().data["v"].shape == (2, 9)
    uint8 = ring.claim("v", (2, 9), torch.uint8, torch.device("cpu"))
    assert uint8.dtype == torch.uint8 and ring._slots[1].arrays["v"].dtype == np.uint8
    bf16 = ring.claim("w", (3,), torch.bfloat16, torch.device("cpu"))  # NumPy has none: its own tensor
    assert bf16.dtype == torch.bfloat16 and "w" not in ring._slots[1].arrays


def _write_whole(ring, value):
    ring.write({"v": np.full(200_000, value, dtype=np.int64)}, value, 0)


def _write_claimed(ring, value):
    """As the probe's kernels do: fill the claimed storage bit by bit, then write it."""
    out = ring.claim("v", (200_000,), torch.int64, torch.device("cpu"))
    for part in range(4):  # a kernel writing in pieces, readers looking on
        out[part * 50_000 : (part + 1) * 50_000] = value
    ring.write({"v": out}, value, 0)


@pytest.mark.parametrize("write", [_write_whole, _write_claimed], ids=["copied", "claimed"])
def test_a_reader_never_sees_a_torn_frame_while_the_writer_laps_it(write):
    ring = FrameRing("p", capacity=2)
    stop = threading.Event()

    def writer():
        value = 0
        while not stop.is_set():
            write(ring, value)
            value += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = 0
        while seen < 200:
            frame = ring.latest()
            if frame is None:
                continue
            v = frame.data["v"]
            assert v.min() == v.max() == frame.step, "latest() returned a half-written frame"
            seen += 1
        frames = ring.read_since(-1)
        assert all(f.data["v"].min() == f.data["v"].max() == f.step for f in frames)
    finally:
        stop.set()
        thread.join()


def test_the_ring_says_how_much_memory_its_slots_hold():
    ring = FrameRing("p", capacity=3)
    assert ring.nbytes == {"host": 0, "device": 0}
    ring.write({"a": np.zeros(10, np.float32), "b": np.zeros((4, 4), np.uint8)}, 0, 0)
    assert ring.nbytes == {"host": 40 + 16, "device": 0}
    for step in range(1, 5):  # slots fill up to the capacity, then are reused
        ring.write({"a": np.zeros(10, np.float32), "b": np.zeros((4, 4), np.uint8)}, step, 0)
    assert ring.nbytes == {"host": 3 * (40 + 16), "device": 0}
    claimed = ring.claim("c", (5,), torch.float64, torch.device("cpu"))  # a kernel's storage
    ring.write({"a": np.zeros(10, np.float32), "b": np.zeros((4, 4), np.uint8), "c": claimed}, 5, 0)
    assert ring.nbytes == {"host": 3 * (40 + 16) + 40, "device": 0}  # counted once


def test_rings_of_large_frames_get_the_slots_that_fit_in_a_share_of_free_memory():
    from probescope.ring import RING_SHARE, fit_capacities

    mib = 2**20
    sizes = {"grid": 100 * mib, "neurons": 10 * mib, "loss": None}  # a LossProbe's frame is small
    assert fit_capacities(sizes, 8, None, None) == (
        {"grid": 8, "neurons": 8, "loss": 8},
        None,
    )  # no limit known
    room = int(8 * 110 * mib / RING_SHARE)
    assert fit_capacities(sizes, 8, room, None) == ({"grid": 8, "neurons": 8, "loss": 8}, None)
    capacities, why = fit_capacities(sizes, 8, room - 1, None)
    assert capacities == {"grid": 7, "neurons": 7, "loss": 8}
    assert why.startswith("a frame of 'grid' 100.0 MiB, 'neurons' 10.0 MiB in 8 slots would take over 25%")
    assert why.endswith(
        "their rings keep 7 slots (a viewer or recorder that falls behind loses frames sooner)"
    )
    # CUDA frames keep a device copy too: the device's free memory counts as well.
    assert fit_capacities(sizes, 8, room, int(3 * 110 * mib / RING_SHARE))[0]["grid"] == 3
    with pytest.raises(ValueError, match="two slots do not fit either; lower the probes' resolution"):
        fit_capacities(sizes, 8, int(110 * mib / RING_SHARE), None)
