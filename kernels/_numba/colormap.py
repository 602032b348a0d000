"""Probabilities -> RGBA on the CPU: one parallel pass over the pixels."""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from probescope.kernels._numba import FASTMATH, threads_aware
from probescope.kernels.colormap import BOUNDARY_INK, BOUNDARY_PALE, DIVERGING_ANCHORS, MODES, NONFINITE_RGBA

_INK = np.asarray(BOUNDARY_INK, np.float32)
_ANCHORS = np.asarray(DIVERGING_ANCHORS, np.float32)
_NONFINITE = np.asarray(NONFINITE_RGBA, np.uint8)


@numba.njit(inline="always")
def _byte(x):
    return np.uint8(min(max(math.floor(x + 0.5), 0.0), 255.0))


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def probs_to_rgba_kernel(probs, palette, out, mode, class_index, ink, pale, anchors, nonfinite):
    n, classes = probs.shape
    for i in numba.prange(n):
        bad = False
        for c in range(classes):
            if not math.isfinite(probs[i, c]):
                bad = True
        if bad:
            for ch in range(4):
                out[i, ch] = nonfinite[ch]
            continue
        k, top, second = 0, probs[i, 0], -math.inf
        for c in range(1, classes):
            p = probs[i, c]
            if p > top:
                k, second, top = c, top, p
            elif p > second:
                second = p
        for ch in range(3):
            colour = np.float32(palette[k, ch])
            if mode == 0:
                shade = 1.0
                if classes > 1:
                    chance = 1.0 / classes
                    shade = min(max((top - chance) / (1.0 - chance), 0.0), 1.0)
                value = 255.0 + (colour - 255.0) * shade
            elif mode == 1:
                margin = 1.0 if classes == 1 else min(max(top - second, 0.0), 1.0)
                rest = 1.0 - margin
                t = 1.0 - rest * rest * rest * rest
                value = ink[ch] + (colour * (1.0 - pale) + 255.0 * pale - ink[ch]) * t
            else:
                q = min(max(probs[i, class_index], 0.0), 1.0) * 4.0
                lo = min(math.floor(q), 3.0)
                j = int(lo)
                value = anchors[j, ch] + (anchors[j + 1, ch] - anchors[j, ch]) * (q - lo)
            out[i, ch] = _byte(value)
        out[i, 3] = 255


probs_to_rgba_kernel = threads_aware(probs_to_rgba_kernel)


def probs_to_rgba_numba(
    probs: torch.Tensor, mode: str, palette: torch.Tensor, class_index: int, out: torch.Tensor
) -> torch.Tensor:
    """Colour ``probs`` (..., C) into the contiguous uint8 ``out`` (..., 4)."""
    flat = probs.reshape(-1, probs.shape[-1]).to(torch.float32).contiguous()
    probs_to_rgba_kernel(
        flat.numpy(), palette.to(torch.uint8).contiguous().numpy(), out.view(-1, 4).numpy(),
        MODES.index(mode), class_index, _INK, np.float32(BOUNDARY_PALE), _ANCHORS, _NONFINITE,
    )  # fmt: skip
    return out
