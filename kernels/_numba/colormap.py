"""Probabilities -> RGBA on the CPU: one parallel pass over blocks of pixels, one packed store each.

A pixel's classes are read once: finiteness, top-1 (its index) and top-2 in one loop, with the
mode chosen per block, not per channel. The colour goes out as one little-endian 32-bit word
(R, G, B, A bytes), as on the GPU.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from probescope.kernels._numba import FASTMATH, host_array, threads_aware
from probescope.kernels.colormap import BOUNDARY_INK, BOUNDARY_PALE, DIVERGING_ANCHORS, MODES, NONFINITE_RGBA

_INK = np.asarray(BOUNDARY_INK, np.float32)
_ANCHORS = np.asarray(DIVERGING_ANCHORS, np.float32)
_NONFINITE = np.uint32(int.from_bytes(bytes(NONFINITE_RGBA), "little"))
BLOCK = 1024  # pixels per parallel iteration


@numba.njit(inline="always", fastmath=FASTMATH)
def _byte(x):
    return np.uint32(min(max(math.floor(x + 0.5), 0.0), 255.0))


@numba.njit(inline="always", fastmath=FASTMATH)
def _pack(r, g, b):
    return _byte(r) | (_byte(g) << np.uint32(8)) | (_byte(b) << np.uint32(16)) | np.uint32(0xFF000000)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def probs_to_rgba_kernel(
    probs, palette, out, mode, class_index, ramp_lo, ramp_scale, ink, pale, anchors, nonfinite
):
    n, classes = probs.shape
    chance = 1.0 / classes
    for blk in numba.prange((n + BLOCK - 1) // BLOCK):
        start = blk * BLOCK
        stop = min(start + BLOCK, n)
        if mode == 4:  # blend: the class colours mixed by probability (white where none weighs)
            for i in range(start, stop):
                finite = True
                r = g = b = total = np.float32(0.0)
                for c in range(classes):
                    p = probs[i, c]
                    finite &= math.isfinite(p)
                    w = max(p, np.float32(0.0)) if math.isfinite(p) else np.float32(0.0)
                    r += w * np.float32(palette[c, 0])
                    g += w * np.float32(palette[c, 1])
                    b += w * np.float32(palette[c, 2])
                    total += w
                packed = _pack(r / total, g / total, b / total) if total > 0 else _pack(255.0, 255.0, 255.0)
                out[i] = packed if finite else nonfinite
            continue
        if mode >= 2:  # prob, value: one class (output) through the diverging ramp
            for i in range(start, stop):
                finite = True
                for c in range(classes):
                    finite &= math.isfinite(probs[i, c])
                q = min(max((probs[i, class_index] - ramp_lo) * ramp_scale, 0.0), 1.0) * 4.0
                lo = min(math.floor(q), 3.0)
                j = int(lo)
                f = q - lo
                packed = _pack(
                    anchors[j, 0] + (anchors[j + 1, 0] - anchors[j, 0]) * f,
                    anchors[j, 1] + (anchors[j + 1, 1] - anchors[j, 1]) * f,
                    anchors[j, 2] + (anchors[j + 1, 2] - anchors[j, 2]) * f,
                )
                out[i] = packed if finite else nonfinite
            continue
        for i in range(start, stop):
            top = probs[i, 0]
            finite = math.isfinite(top)
            k, second = 0, -math.inf
            for c in range(1, classes):
                p = probs[i, c]
                finite &= math.isfinite(p)
                if p > top:
                    k, second, top = c, top, p
                else:
                    second = max(second, p)
            r, g, b = np.float32(palette[k, 0]), np.float32(palette[k, 1]), np.float32(palette[k, 2])
            if mode == 0:
                shade = 1.0 if classes == 1 else min(max((top - chance) / (1.0 - chance), 0.0), 1.0)
                packed = _pack(
                    255.0 + (r - 255.0) * shade, 255.0 + (g - 255.0) * shade, 255.0 + (b - 255.0) * shade
                )
            else:
                margin = 1.0 if classes == 1 else min(max(top - second, 0.0), 1.0)
                rest = 1.0 - margin
                t = 1.0 - rest * rest * rest * rest
                packed = _pack(
                    ink[0] + (r * (1.0 - pale) + 255.0 * pale - ink[0]) * t,
                    ink[1] + (g * (1.0 - pale) + 255.0 * pale - ink[1]) * t,
                    ink[2] + (b * (1.0 - pale) + 255.0 * pale - ink[2]) * t,
                )
            out[i] = packed if finite else nonfinite


probs_to_rgba_kernel = threads_aware(probs_to_rgba_kernel)


def probs_to_rgba_numba(
    probs: torch.Tensor,
    mode: str,
    palette: torch.Tensor,
    class_index: int,
    out: torch.Tensor,
    ramp: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Colour ``probs`` (..., C) into the contiguous uint8 ``out`` (..., 4); ``ramp`` is the
    ``prob``/``value`` ramp's ``(lo, scale)`` (``ramp_scale``)."""
    # NumPy, not torch, for the small steps around the kernel (see host_array).
    flat = np.ascontiguousarray(host_array(probs, np.float32).reshape(-1, probs.shape[-1]))
    words = out.numpy().reshape(-1, 4).view(np.uint32).reshape(-1)  # one RGBA word per pixel
    probs_to_rgba_kernel(
        flat, np.ascontiguousarray(host_array(palette, np.uint8)), words,
        MODES.index(mode), class_index, np.float32(ramp[0]), np.float32(ramp[1]),
        _INK, np.float32(BOUNDARY_PALE), _ANCHORS, _NONFINITE,
    )  # fmt: skip
    return out
