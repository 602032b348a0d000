"""Probabilities -> packed RGBA on the GPU: one program per BLOCK pixels, one 4-byte store each."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from probescope.kernels.backend import device_copy, next_power_of_2
from probescope.kernels.colormap import BOUNDARY_INK, BOUNDARY_PALE, DIVERGING_ANCHORS, MODES, NONFINITE_RGBA

# Little-endian int32 words whose bytes are R, G, B, A.
_PACKED_NONFINITE = int.from_bytes(bytes(NONFINITE_RGBA), "little", signed=True)
_OPAQUE = int.from_bytes(bytes((0, 0, 0, 255)), "little", signed=True)


_ANCHORS = torch.tensor(DIVERGING_ANCHORS, dtype=torch.uint8)


@triton.jit
def _gather_rgb(table_ptr, index, ROW: tl.constexpr):
    return (
        tl.load(table_ptr + index * ROW).to(tl.float32),
        tl.load(table_ptr + index * ROW + 1).to(tl.float32),
        tl.load(table_ptr + index * ROW + 2).to(tl.float32),
    )


@triton.jit
def _to_byte(x):
    return tl.minimum(tl.maximum(tl.floor(x + 0.5), 0.0), 255.0).to(tl.int32)


@triton.jit
def _probs_to_rgba_kernel(
    probs_ptr, palette_ptr, anchors_ptr, out_ptr, n_pixels, n_values, class_index, ramp_lo, ramp_scale,
    NUM_CLASSES: tl.constexpr, MODE: tl.constexpr,
    INK_R: tl.constexpr, INK_G: tl.constexpr, INK_B: tl.constexpr, PALE: tl.constexpr,
    NONFINITE: tl.constexpr, OPAQUE: tl.constexpr, BLOCK: tl.constexpr, STAGED: tl.constexpr,
    FLAT: tl.constexpr,
):  # fmt: skip
    # One pass over the classes with a running top-1/top-2 in registers: no 2-D tile, no index
    # reduction, and every probability is read from memory once. Each class's values come
    # either from a strided load (the rows' cache lines are shared by consecutive loads) or,
    # STAGED, from the program's whole contiguous span of BLOCK rows, loaded once in wide
    # coalesced accesses and gathered class by class (through shared memory).
    pixel = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pixel < n_pixels
    row = probs_ptr + pixel * NUM_CLASSES
    if STAGED:
        span = tl.arange(0, FLAT)
        first = tl.program_id(0).to(tl.int64) * (BLOCK * NUM_CLASSES)
        keep = (span < BLOCK * NUM_CLASSES) & (first + span < n_values)
        flat = tl.load(probs_ptr + first + span, mask=keep, other=0.0).to(tl.float32)
        local = tl.arange(0, BLOCK) * NUM_CLASSES
    bad = tl.zeros([BLOCK], dtype=tl.int1)
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    second = tl.full([BLOCK], float("-inf"), tl.float32)
    k = tl.zeros([BLOCK], dtype=tl.int32)
    q = tl.zeros([BLOCK], dtype=tl.float32)
    mix_r = tl.zeros([BLOCK], dtype=tl.float32)  # blend: the weighted colours and their weight
    mix_g = tl.zeros([BLOCK], dtype=tl.float32)
    mix_b = tl.zeros([BLOCK], dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(NUM_CLASSES):
        if STAGED:
            p = tl.gather(flat, local + c, 0)
        else:
            p = tl.load(row + c, mask=inside, other=0.0).to(tl.float32)
        finite = (p == p) & (tl.abs(p) != float("inf"))
        bad = bad | ~finite
        p = tl.where(finite, p, 0.0)
        if MODE == 4:
            w = tl.maximum(p, 0.0)
            mix_r += w * tl.load(palette_ptr + c * 3).to(tl.float32)
            mix_g += w * tl.load(palette_ptr + c * 3 + 1).to(tl.float32)
            mix_b += w * tl.load(palette_ptr + c * 3 + 2).to(tl.float32)
            total += w
        elif MODE >= 2:
            q = tl.where(class_index == c, p, q)
        else:
            better = p > top  # strict: the first of equal maxima wins, as torch's argmax
            second = tl.where(better, top, tl.maximum(second, p))
            k = tl.where(better, c, k)
            top = tl.where(better, p, top)
    if MODE == 4:  # blend: the class colours mixed by probability (white where none weighs)
        some = total > 0.0
        weight = tl.where(some, total, 1.0)
        r = tl.where(some, mix_r / weight, 255.0)
        g = tl.where(some, mix_g / weight, 255.0)
        b = tl.where(some, mix_b / weight, 255.0)
    elif MODE >= 2:  # prob, value: one class (output) through the diverging ramp
        q = tl.minimum(tl.maximum((q - ramp_lo) * ramp_scale, 0.0), 1.0) * 4.0
        lo = tl.minimum(tl.floor(q), 3.0)
        frac = q - lo
        lo_i = lo.to(tl.int32)
        r0, g0, b0 = _gather_rgb(anchors_ptr, lo_i, 3)
        r1, g1, b1 = _gather_rgb(anchors_ptr, lo_i + 1, 3)
        r, g, b = r0 + (r1 - r0) * frac, g0 + (g1 - g0) * frac, b0 + (b1 - b0) * frac
    else:
        pr, pg, pb = _gather_rgb(palette_ptr, k, 3)
        if MODE == 0:  # region
            if NUM_CLASSES == 1:
                shade = tl.full([BLOCK], 1.0, tl.float32)
            else:
                chance = 1.0 / NUM_CLASSES
                shade = tl.minimum(tl.maximum((top - chance) / (1.0 - chance), 0.0), 1.0)
            r, g, b = 255.0 + (pr - 255.0) * shade, 255.0 + (pg - 255.0) * shade, 255.0 + (pb - 255.0) * shade
        else:  # boundary
            if NUM_CLASSES == 1:
                margin = tl.full([BLOCK], 1.0, tl.float32)
            else:
                margin = tl.minimum(tl.maximum(top - second, 0.0), 1.0)
            rest = 1.0 - margin
            t = 1.0 - rest * rest * rest * rest
            r = INK_R + (pr * (1.0 - PALE) + 255.0 * PALE - INK_R) * t
            g = INK_G + (pg * (1.0 - PALE) + 255.0 * PALE - INK_G) * t
            b = INK_B + (pb * (1.0 - PALE) + 255.0 * PALE - INK_B) * t
    packed = _to_byte(r) | (_to_byte(g) << 8) | (_to_byte(b) << 16) | OPAQUE
    packed = tl.where(bad, NONFINITE, packed)
    tl.store(out_ptr + pixel, packed, mask=inside)


def launch_config(num_classes: int) -> dict:
    """Pixels per program, warps, and whether a program stages its rows (see the kernel)."""
    return {"block": 1024, "num_warps": 4, "staged": False}


def probs_to_rgba_triton(
    probs: torch.Tensor,
    mode: str,
    palette: torch.Tensor,
    class_index: int,
    out: torch.Tensor,
    ramp: tuple[float, float] = (0.0, 1.0),
    **config,
) -> torch.Tensor:
    """Colour ``probs`` (..., C) into the contiguous uint8 ``out`` (..., 4); ``ramp`` is the
    ``prob``/``value`` ramp's ``(lo, scale)`` (``ramp_scale``). ``config`` overrides
    :func:`launch_config` (``block``, ``num_warps``, ``staged``), for tuning."""
    programs, args, constants, options = kernel_arguments(
        probs, mode, palette, class_index, out, ramp=ramp, **config
    )
    _probs_to_rgba_kernel[(programs,)](*args, **constants, **options)
    return out


def kernel_arguments(
    probs: torch.Tensor,
    mode: str,
    palette: torch.Tensor,
    class_index: int,
    out: torch.Tensor,
    ramp: tuple[float, float] = (0.0, 1.0),
    **config,
) -> tuple[int, tuple, dict, dict]:
    """The launch: its number of programs, run-time arguments, compile-time constants and
    options (``benchmarks.tune_colormap --report`` compiles from the same)."""
    num_classes = probs.shape[-1]
    flat = probs.reshape(-1, num_classes).contiguous()
    n_pixels = flat.shape[0]
    palette = device_copy(palette, probs.device, torch.uint8)
    anchors = device_copy(_ANCHORS, probs.device)
    config = {**launch_config(num_classes), **config}
    block = config["block"]
    n_values = n_pixels * num_classes
    args = (flat, palette, anchors, out.view(torch.int32), n_pixels, n_values, class_index, *map(float, ramp))
    constants = dict(
        NUM_CLASSES=num_classes, MODE=MODES.index(mode),
        INK_R=float(BOUNDARY_INK[0]), INK_G=float(BOUNDARY_INK[1]), INK_B=float(BOUNDARY_INK[2]),
        PALE=BOUNDARY_PALE, NONFINITE=_PACKED_NONFINITE, OPAQUE=_OPAQUE, BLOCK=block,
        STAGED=bool(config["staged"]), FLAT=next_power_of_2(block * num_classes),
    )  # fmt: skip
    return triton.cdiv(max(n_pixels, 1), block), args, constants, {"num_warps": config["num_warps"]}
