"""An animated GIF written frame by frame: the memory it takes does not grow with the frames.

Pillow writes an animation only once it holds every frame (``save_all`` collects them to
compare each with the one before), so a long run's GIF held all its frames in memory. Here
Pillow quantizes and compresses one frame at a time (a single-frame GIF in memory), and its
image block goes to the file at once with its colour table as the frame's own (GIF89a: a
local colour table per frame). Each frame after the first stores only the rectangle that
changed, over the frame before (disposal 1), with its unchanged pixels in it transparent (they
compress to little); one frame is held back, to lengthen its delay when the next is the same
picture.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

_TRAILER = b"\x3b"
_COLOURS = 255  # a frame's own colours; index 255 is its transparent one (unchanged pixels)


class GifWriter:
    """``append`` RGB(A) frames (H x W x 3 or 4, uint8) of one size, then ``close``.

    ``fps``: frames per second; each frame's delay is rounded so that the animation's total
    time stays exact (GIF counts hundredths of a second); ``loop``: times to play (0: forever).
    Each frame has up to 255 colours of its own.
    """

    def __init__(self, path: str | os.PathLike, fps: float, *, loop: int = 0):
        if not fps > 0:
            raise ValueError(f"GifWriter: fps must be > 0, got {fps!r}")
        if isinstance(loop, bool) or not isinstance(loop, int) or not 0 <= loop <= 0xFFFF:
            raise ValueError(f"GifWriter: loop must be an int within 0..65535, got {loop!r}")
        self.path = Path(path)
        self.fps, self.loop = float(fps), loop
        self.frames = 0  # appended (an unchanged picture lengthens the frame before)
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._size: tuple[int, int] | None = None
        self._previous: np.ndarray | None = None  # the last picture appended (RGB)
        self._held: tuple[bytes, bool, int] | None = None  # (image block, transparent?, first frame)

    def append(self, image: np.ndarray) -> None:
        """Add one frame."""
        if self._file.closed:
            raise ValueError("GifWriter: append after close")
        rgb = np.asarray(image)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
            raise ValueError(f"GifWriter: a frame is H x W x 3 or 4 uint8, got {rgb.dtype} {rgb.shape}")
        rgb = rgb[..., :3]
        height, width = rgb.shape[:2]
        if self._size is None:
            if max(width, height) > 0xFFFF:
                raise ValueError(f"GifWriter: a GIF is at most 65535 pixels a side, got {width} x {height}")
            self._size = (width, height)
            self._file.write(_header(width, height, self.loop))
            top, left, bottom, right = 0, 0, height, width
            unchanged = None
        elif (width, height) != self._size:
            was = f"{self._size[0]} x {self._size[1]}"
            raise ValueError(f"GifWriter: frames are {was}, got {width} x {height}")
        else:
            changed = _changed(self._previous, rgb)
            rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
            if not len(rows):  # the same picture: the frame before stays on screen longer
                self.frames += 1
                return
            top, left, bottom, right = rows[0], cols[0], rows[-1] + 1, cols[-1] + 1
            unchanged = ~changed[top:bottom, left:right]
        self._flush()
        crop = Image.fromarray(np.ascontiguousarray(rgb[top:bottom, left:right]))
        # Octree: 20x faster than median cut, and as good on these flat-coloured maps.
        quantized = crop.quantize(colors=_COLOURS, method=Image.Quantize.FASTOCTREE)
        transparent = unchanged is not None and bool(unchanged.any())
        if transparent:
            indices = np.array(quantized)
            indices[unchanged] = _COLOURS
            palette = quantized.getpalette()[: 3 * _COLOURS]
            quantized = Image.fromarray(indices, "P")
            quantized.putpalette(palette + [0] * (3 * 256 - len(palette)))  # a table of 256
        self._held = (_image_block(quantized, int(left), int(top)), transparent, self.frames)
        self._previous = rgb.copy()
        self.frames += 1

    def close(self) -> None:
        """Write the last frame and end the file (idempotent)."""
        if self._file.closed:
            return
        try:
            self._flush()
            self._file.write(_TRAILER)
        finally:
            self._file.close()

    def __enter__(self) -> GifWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _flush(self) -> None:
        """Write the held frame, shown until the frame appended now."""
        if self._held is None:
            return
        block, transparent, first = self._held
        delay = round(self.frames * 100 / self.fps) - round(first * 100 / self.fps)
        self._file.write(_control(delay, transparent) + block)
        self._file.flush()  # on disk as it comes: an export cut short keeps its frames so far
        self._held = None


def _changed(before: np.ndarray, now: np.ndarray) -> np.ndarray:
    """H x W: whether each pixel differs (channel by channel: a reduction over the last axis of
    3 is several times slower)."""
    differs = before != now
    return differs[..., 0] | differs[..., 1] | differs[..., 2]


def _header(width: int, height: int, loop: int) -> bytes:
    """GIF89a, a screen with no global colour table, and the loop count (0: forever)."""
    screen = width.to_bytes(2, "little") + height.to_bytes(2, "little") + b"\x00\x00\x00"
    looping = b"\x21\xff\x0bNETSCAPE2.0\x03\x01" + loop.to_bytes(2, "little") + b"\x00"
    return b"GIF89a" + screen + looping


def _control(delay: int, transparent: bool) -> bytes:
    """A graphic control extension: disposal 1 (leave the frame in place), ``delay`` in 1/100 s,
    index 255 transparent or not."""
    flags = 0x04 | transparent
    delay = min(max(delay, 0), 0xFFFF).to_bytes(2, "little")
    return b"\x21\xf9\x04" + bytes([flags]) + delay + bytes([_COLOURS]) + b"\x00"


def _image_block(image: Image.Image, left: int, top: int) -> bytes:
    """A palette image as one GIF image block at (left, top) with its own colour table: Pillow
    writes the image as a GIF, and its image data is taken from there."""
    buffer = io.BytesIO()
    # Not interlaced (progressive display, a third larger here); the palette as it is (index
    # 255 stays the transparent one).
    image.save(buffer, format="GIF", interlace=False, optimize=False)
    data = buffer.getvalue()
    packed = data[10]
    pos = 13
    table = b""
    if packed & 0x80:  # the global colour table becomes the frame's own
        table = data[pos : pos + 3 * (2 << (packed & 7))]
        pos += len(table)
    while data[pos] == 0x21:  # extensions: label, then sub-blocks up to an empty one
        pos += 2
        pos = _skip_sub_blocks(data, pos)
    if data[pos] != 0x2C:
        raise ValueError("GifWriter: Pillow wrote no image block")
    width, height, flags = data[pos + 5 : pos + 7], data[pos + 7 : pos + 9], data[pos + 9]
    pos += 10
    if flags & 0x80:  # a local colour table of its own
        table = data[pos : pos + 3 * (2 << (flags & 7))]
        pos += len(table)
    if not table:
        raise ValueError("GifWriter: Pillow wrote no colour table")
    size_bits = (len(table) // 3).bit_length() - 2
    start, pos = pos, _skip_sub_blocks(data, pos + 1)  # LZW code size, then the data's sub-blocks
    descriptor = (
        b"\x2c"
        + left.to_bytes(2, "little")
        + top.to_bytes(2, "little")
        + width
        + height
        + bytes([0x80 | (flags & 0x40) | size_bits])  # local table, interlaced as Pillow wrote it
    )
    return descriptor + table + data[start:pos]


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    """The position after a chain of sub-blocks (a length byte, then that many bytes; 0 ends)."""
    while data[pos]:
        pos += data[pos] + 1
    return pos + 1
