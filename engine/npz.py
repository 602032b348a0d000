"""Writing a frame's arrays as an ``.npz`` file with little Python and few GIL hand-offs.

A run directory holds one ``.npz`` per frame, written by the recorder thread while the training
thread runs. On the CPU path the two threads share the GIL, and what a frame costs training is
mostly the GIL its writing holds and hands back and forth (``python -m benchmarks.contention``
measures it): ``np.savez`` goes through ``zipfile`` and ``np.lib.format`` (some 70 Python calls
and a copy of every array per entry). The files written here are what ``np.savez`` writes
(uncompressed zip entries ``<key>.npy`` holding ``.npy`` version 1.0 data) and ``np.load`` reads
them as it reads its own; per array they take one header, one CRC over the array's own memory
(zlib releases the GIL for it) and one write of that memory (a buffered file writes a large
buffer straight through, the GIL released). What the lean path does not cover (object arrays,
headers beyond format 1.0, sizes that need zip64, more than 65 535 entries) goes to
``np.savez``.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Mapping
from typing import BinaryIO

import numpy as np

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_DOS_DATE = 0x21  # 1980-01-01, the zip epoch
_UTF8 = 0x800  # general purpose flag: the name is UTF-8
_LIMIT = 0xFFFFFFFF  # beyond this a size or an offset needs zip64


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` 1.0 header of a C-contiguous array: a probe's frames repeat their arrays'
    dtypes and shapes, so each header is made once."""
    header = io.BytesIO()
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(header, fields)
    return header.getvalue()


class _Entry:
    __slots__ = ("crc", "data", "flags", "head", "name", "size")

    def __init__(self, key: str, array: np.ndarray):
        self.name = f"{key}.npy".encode()
        self.flags = 0 if self.name.isascii() else _UTF8
        self.head = _npy_header(array.dtype, array.shape)
        self.data = array.reshape(-1).view(np.uint8)  # the array's own memory, as bytes
        self.size = len(self.head) + self.data.nbytes
        self.crc = zlib.crc32(self.data, zlib.crc32(self.head))


def write_npz(f: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to the binary file ``f`` as ``np.savez(f, **arrays)`` would."""
    entries = _entries(arrays)
    if entries is None:
        np.savez(f, **arrays)
        return
    central, offset = [], 0
    for e in entries:
        local = _LOCAL.pack(0x04034B50, 20, e.flags, 0, 0, _DOS_DATE, e.crc, e.size, e.size, len(e.name), 0)
        f.write(local + e.name + e.head)
        f.write(e.data)
        fields = (20, 20, e.flags, 0, 0, _DOS_DATE, e.crc, e.size, e.size, len(e.name), 0, 0, 0, 0, 0, offset)
        central.append(_CENTRAL.pack(0x02014B50, *fields) + e.name)
        offset += len(local) + len(e.name) + e.size
    directory = b"".join(central)
    f.write(directory + _END.pack(0x06054B50, 0, 0, len(entries), len(entries), len(directory), offset, 0))


def _entries(arrays: Mapping[str, np.ndarray]) -> list[_Entry] | None:
    """The entries to write, or None where ``np.savez`` must write the file."""
    if len(arrays) >= 0xFFFF:
        return None
    entries, total = [], 0
    for key, value in arrays.items():
        array = np.asarray(value)
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)  # (never 0-d here: a 0-d array is contiguous)
        if array.dtype.hasobject:
            return None
        try:
            entry = _Entry(key, array)
        except (ValueError, TypeError):  # a header too long for format 1.0, a dtype without bytes
            return None
        total += 30 + len(entry.name) + entry.size
        if total >= _LIMIT:
            return None
        entries.append(entry)
    return entries
