"""Which implementation of an op runs: Triton on CUDA tensors, Numba on CPU tensors, torch otherwise.

Every public op takes ``impl="auto"``; tests and benchmarks name an implementation to hold it
to the reference. ``PROBESCOPE_KERNELS=torch`` in the environment forces the reference
everywhere (a switch for debugging a suspected kernel bug in a user's run).

Triton kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (the CPU test suite); the
variable must be set before the first Triton kernel module is imported.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import weakref

import torch

IMPLS = ("auto", "torch", "triton", "numba")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_impl(op: str, device: torch.device, impl: str = "auto") -> str:
    """The implementation that runs ``op`` for tensors on ``device``: torch, triton or numba."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if os.environ.get("PROBESCOPE_KERNELS", "auto") == "torch":
            return "torch"
        if device.type == "cuda" and triton_installed():
            return "triton"
        if device.type == "cpu" and numba_installed():
            return "numba"
        return "torch"
    if impl == "triton":
        if not triton_installed():
            raise RuntimeError(f"{op}: impl='triton' needs triton: pip install 'probescope[triton]'")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests), "
                f"got tensors on {device}"
            )
    if impl == "numba":
        if not numba_installed():
            raise RuntimeError(f"{op}: impl='numba' needs numba: pip install numba")
        if device.type != "cpu":
            raise ValueError(f"{op}: impl='numba' runs on CPU tensors, got tensors on {device}")
    return impl


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


_DEVICE_COPIES: dict[tuple, torch.Tensor] = {}  # (id, version, dtype, device) -> the device copy


def device_copy(table: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``table`` (a small host constant: a palette, a grid's plane) as a contiguous tensor on
    ``device``, copied there once and again only after it changes in place: a copy per frame
    would be a synchronous host-to-device transfer on the probe's stream. A copy lives as long
    as its source: a CUDA graph that captured a frame reads it at every replay, so it is never
    evicted for room, and it goes when the source is garbage (whose id another tensor may then
    take)."""
    dtype = dtype or table.dtype
    if table.device == device:
        return table.to(dtype).contiguous()
    key = (id(table), table._version, dtype, str(device))
    copy = _DEVICE_COPIES.get(key)
    if copy is None:
        copy = _DEVICE_COPIES[key] = table.to(device, dtype).contiguous()
        weakref.finalize(table, _DEVICE_COPIES.pop, key, None)
    return copy
