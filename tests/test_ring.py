"""FrameRing: preallocated slots, sequence numbers, latest() without waiting, drops counted."""

import threading

import numpy as np

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


def test_a_reader_never_sees_a_torn_frame_while_the_writer_laps_it():
    ring = FrameRing("p", capacity=2)
    stop = threading.Event()

    def writer():
        value = 0
        while not stop.is_set():
            ring.write({"v": np.full(200_000, value, dtype=np.int64)}, value, 0)
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
    finally:
        stop.set()
        thread.join()
