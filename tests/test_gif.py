"""The streaming GIF writer: frames decode as written, timing stays exact, memory stays flat."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageSequence

from probescope.gif import GifWriter


def _decoded(path) -> tuple[list[np.ndarray], list[int], Image.Image]:
    image = Image.open(path)
    frames, delays = [], []
    for frame in ImageSequence.Iterator(image):
        frames.append(np.asarray(frame.convert("RGB")))
        delays.append(frame.info["duration"])
    return frames, delays, image


def _few_colours(rng, count: int, height: int, width: int) -> list[np.ndarray]:
    """Frames of 8 colours, each changing a different rectangle of the one before."""
    palette = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    frame = palette[rng.integers(0, 8, (height, width))]
    frames = []
    for i in range(count):
        frame = frame.copy()
        top, left = rng.integers(0, height), rng.integers(0, width)
        bottom, right = top + rng.integers(1, height + 1), left + rng.integers(1, width + 1)
        frame[top:bottom, left:right] = palette[i % 8]
        frames.append(frame)
    return frames


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (90, 131), (240, 320)])
def test_frames_of_few_colours_decode_exactly(tmp_path, shape):
    rng = np.random.default_rng(sum(shape))
    frames = _few_colours(rng, 9, *shape)
    with GifWriter(tmp_path / "a.gif", fps=10) as gif:
        for frame in frames:
            gif.append(np.dstack([frame, np.full(shape, 255, np.uint8)]))  # RGBA: alpha ignored
    decoded, _, image = _decoded(tmp_path / "a.gif")
    assert image.info["loop"] == 0 and image.size == shape[::-1]
    distinct = [frames[0]] + [b for a, b in itertools.pairwise(frames) if not np.array_equal(a, b)]
    assert len(decoded) == len(distinct)
    for got, want in zip(decoded, distinct, strict=True):
        np.testing.assert_array_equal(got, want)


def test_many_colours_lose_only_what_pillows_quantization_of_the_picture_loses(tmp_path):
    y, x = np.mgrid[0:200, 0:300]
    frames = [
        np.stack([(x + 10 * i) % 256, (y * 1.2) % 256, (x + y + 5 * i) % 256], axis=-1).astype(np.uint8)
        for i in range(4)
    ]
    with GifWriter(tmp_path / "g.gif", fps=5) as gif:
        for frame in frames:
            gif.append(frame)
    decoded, _, _ = _decoded(tmp_path / "g.gif")
    assert len(decoded) == 4
    for got, frame in zip(decoded, frames, strict=True):  # every pixel changes: whole frames
        want = Image.fromarray(frame).quantize(colors=255, method=Image.Quantize.FASTOCTREE)
        np.testing.assert_array_equal(got, np.asarray(want.convert("RGB")))
        assert np.abs(got.astype(int) - frame).mean() < 10  # and that is close


def test_a_repeated_picture_lengthens_the_frame_before_and_the_total_time_stays_exact(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c = _few_colours(rng, 3, 40, 60)
    sequence = [a, b, b, b, c, c, a]  # 7 frames at 12 fps: 583 ms in all
    with GifWriter(tmp_path / "r.gif", fps=12) as gif:
        for frame in sequence:
            gif.append(frame)
    assert gif.frames == 7
    decoded, delays, _ = _decoded(tmp_path / "r.gif")
    assert len(decoded) == 4
    for got, want in zip(decoded, [a, b, c, a], strict=True):
        np.testing.assert_array_equal(got, want)
    # Hundredths of a second, rounded at each frame's start: none drifts from its true time.
    starts = np.cumsum([0, *delays])
    np.testing.assert_array_equal(starts, [0, 80, 330, 500, 580])
    assert all(abs(s - 1000 * i / 12) <= 5 for s, i in zip(starts, [0, 1, 4, 6, 7], strict=True))


def test_frames_reach_the_file_as_they_come_and_only_what_changed_is_stored(tmp_path):
    rng = np.random.default_rng(1)
    background = rng.integers(0, 256, (4, 3), dtype=np.uint8)[rng.integers(0, 4, (300, 400))]
    path = tmp_path / "s.gif"
    sizes = []
    with GifWriter(path, fps=30) as gif:
        for i in range(40):
            frame = background.copy()
            frame[100 + i : 110 + i, 50 + 5 * i : 60 + 5 * i] = (255, 0, 0)  # a moving square
            gif.append(frame)
            sizes.append(path.stat().st_size)
    # Written frame by frame (one is held back), not all at close.
    assert all(later > earlier for earlier, later in itertools.pairwise(sizes))
    first_frame = sizes[1] - sizes[0]  # the whole picture
    assert path.stat().st_size < first_frame + 40 * first_frame / 20  # each later one: a patch
    decoded, _, _ = _decoded(path)
    assert len(decoded) == 40
    np.testing.assert_array_equal(decoded[-1][139:149, 245:255], np.broadcast_to([255, 0, 0], (10, 10, 3)))


def test_bad_frames_and_arguments_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="fps must be > 0"):
        GifWriter(tmp_path / "x.gif", fps=0)
    with pytest.raises(ValueError, match=r"loop must be an int within 0\.\.65535"):
        GifWriter(tmp_path / "x.gif", fps=10, loop=-1)
    gif = GifWriter(tmp_path / "x.gif", fps=10)
    gif.append(np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="frames are 20 x 10, got 21 x 10"):
        gif.append(np.zeros((10, 21, 3), np.uint8))
    with pytest.raises(ValueError, match="H x W x 3 or 4 uint8"):
        gif.append(np.zeros((10, 20, 3), np.float32))
    gif.close()
    gif.close()  # idempotent
    with pytest.raises(ValueError, match="append after close"):
        gif.append(np.zeros((10, 20, 3), np.uint8))
    decoded, _, _ = _decoded(tmp_path / "x.gif")  # what was appended before the errors is whole
    assert len(decoded) == 1 and not decoded[0].any()
