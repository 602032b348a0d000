"""Fused grid MLP on the CPU: a block of pixels at a time, every activation in a per-thread buffer.

Each parallel iteration owns BLOCK pixels. It generates their plane coordinates, runs the
first layer as three fused multiply-adds per unit (the layer is folded into the plane), then
every further layer as a small matrix product over the block with the activation applied as
each unit is stored, and finally softmax or sigmoid straight into the output rows. The hidden
activations live in two (max width, BLOCK) buffers that stay in the core's cache; nothing of
size (pixels, width) is ever allocated.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from probescope.kernels._numba import FASTMATH, host_array, threads_aware
from probescope.kernels.grid import GridSpec
from probescope.kernels.grid_mlp import OUTPUT_CODES
from probescope.kernels.mlp import FusableMLP

BLOCK = 128  # pixels per parallel iteration: 8 AVX-512 vectors of float32


@numba.njit(inline="always", fastmath=FASTMATH)
def _activate(x, code, slope):
    if code == 1:
        return max(x, 0.0)
    if code == 2:
        return x if x >= 0.0 else x * slope
    if code == 3:
        return math.tanh(x)
    if code == 4:
        return 1.0 / (1.0 + math.exp(-x))
    if code == 5:
        return x / (1.0 + math.exp(-x))
    if code == 6:
        return 0.5 * x * (1.0 + math.erf(x * 0.7071067811865476))
    if code == 7:
        return 0.5 * x * (1.0 + math.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    return x


@numba.njit(inline="always", fastmath=FASTMATH, nogil=True)
def _store(dst, j, acc, code, slope):
    """dst[j] = act(acc), with the two common cases as plain loops LLVM vectorises."""
    if code == 0:
        for p in range(BLOCK):
            dst[j, p] = acc[p]
    elif code == 1:
        for p in range(BLOCK):
            dst[j, p] = max(acc[p], 0.0)
    else:
        for p in range(BLOCK):
            dst[j, p] = _activate(acc[p], code, slope)


@numba.njit(fastmath=FASTMATH, nogil=True)
def _linear(src, dst, acc, n_in, n_out, weights, w_off, biases, b_off, code, slope):
    """dst[:n_out] = act(W @ src[:n_in] + b) for a block of pixels; W is (n_out, n_in) row-major.

    Feature-major buffers make the innermost loop a fixed-length sweep over the block's pixels,
    which LLVM turns into vector instructions. The two accumulator rows ``acc`` stay in memory
    (LLVM cannot prove they do not alias the inputs), so each sweep does as much arithmetic
    per load and store as it can: two units share every input row they read, and four inputs
    are folded into each accumulator per sweep. That is 8 multiply-adds per 6 vector loads and
    2 stores, where one input of one unit per sweep did 1 per 2 loads and a store. An odd last
    unit is computed twice (both rows name it), which keeps a single code path.
    """
    k4 = n_in - n_in % 4
    for j in range(0, n_out, 2):
        j1 = min(j + 1, n_out - 1)
        row0, row1 = w_off + j * n_in, w_off + j1 * n_in
        bias0, bias1 = biases[b_off + j], biases[b_off + j1]
        for p in range(BLOCK):
            acc[0, p] = bias0
            acc[1, p] = bias1
        for k in range(0, k4, 4):
            i, n = row0 + k, row1 + k
            a0, a1, a2, a3 = weights[i], weights[i + 1], weights[i + 2], weights[i + 3]
            b0, b1, b2, b3 = weights[n], weights[n + 1], weights[n + 2], weights[n + 3]
            for p in range(BLOCK):
                x0, x1, x2, x3 = src[k, p], src[k + 1, p], src[k + 2, p], src[k + 3, p]
                acc[0, p] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                acc[1, p] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
        for k in range(k4, n_in):
            a0, b0 = weights[row0 + k], weights[row1 + k]
            for p in range(BLOCK):
                acc[0, p] += a0 * src[k, p]
                acc[1, p] += b0 * src[k, p]
        _store(dst, j, acc[0], code, slope)
        _store(dst, j1, acc[1], code, slope)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def grid_mlp_kernel(out, plane, weights, w_offsets, biases, b_offsets, widths, acts, slope,
                    width, n_pixels, u0, du, v0, dv, out_mode):  # fmt: skip
    n_layers = widths.shape[0]
    max_width = widths.max()
    first = widths[0]
    n_blocks = (n_pixels + BLOCK - 1) // BLOCK
    for blk in numba.prange(n_blocks):
        a = np.empty((max_width, BLOCK), np.float32)
        b = np.empty((max_width, BLOCK), np.float32)
        acc = np.empty((2, BLOCK), np.float32)
        u = np.empty(BLOCK, np.float32)
        v = np.empty(BLOCK, np.float32)
        start = blk * BLOCK
        rows = min(BLOCK, n_pixels - start)
        for p in range(BLOCK):
            pixel = start + min(p, rows - 1)  # the block's tail repeats its last pixel
            r = pixel // width
            u[p] = u0 + (pixel - r * width) * du
            v[p] = v0 + r * dv
        for j in range(first):
            c0, cu, cv = plane[0, j], plane[1, j], plane[2, j]
            for p in range(BLOCK):
                acc[0, p] = c0 + u[p] * cu + v[p] * cv
            _store(a, j, acc[0], acts[0], slope)
        n_in = first
        for layer in range(1, n_layers):
            n_out = widths[layer]
            w_off, b_off = w_offsets[layer - 1], b_offsets[layer - 1]
            _linear(a, b, acc, n_in, n_out, weights, w_off, biases, b_off, acts[layer], slope)
            a, b = b, a
            n_in = n_out
        _write_outputs(out, start, rows, a, n_in, u, v, out_mode)  # u, v: free scratch now


grid_mlp_kernel = threads_aware(grid_mlp_kernel)


@numba.njit(fastmath=FASTMATH, nogil=True)
def _write_outputs(out, start, rows, logits, n_out, top, total, out_mode):
    """Softmax over the units (vectorised across the block's pixels), sigmoid pair, or raw."""
    if out_mode == 1:
        for p in range(BLOCK):
            top[p] = logits[0, p]
            total[p] = 0.0
        for j in range(1, n_out):
            for p in range(BLOCK):
                top[p] = max(top[p], logits[j, p])
        for j in range(n_out):
            for p in range(BLOCK):
                e = math.exp(logits[j, p] - top[p])
                logits[j, p] = e
                total[p] += e
        for p in range(rows):
            scale = 1.0 / total[p]
            for j in range(n_out):
                out[start + p, j] = logits[j, p] * scale
    elif out_mode == 2:
        for p in range(rows):
            s = 1.0 / (1.0 + math.exp(-logits[0, p]))
            out[start + p, 0] = 1.0 - s
            out[start + p, 1] = s
    else:
        for p in range(rows):
            for j in range(n_out):
                out[start + p, j] = logits[j, p]


def pack_layers(mlp: FusableMLP) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every Linear after the first, (out, in) row-major, laid end to end in float32."""
    ws, bs = [], []
    for w, b in zip(mlp.weights[1:], mlp.biases[1:], strict=True):
        ws.append(np.ascontiguousarray(host_array(w, np.float32)).reshape(-1))
        bs.append(host_array(b, np.float32) if b is not None else np.zeros(w.shape[0], np.float32))
    if not ws:
        ws, bs = [np.zeros(1, np.float32)], [np.zeros(1, np.float32)]
    w_offsets = np.cumsum([0] + [w.size for w in ws])[:-1].astype(np.int64)
    b_offsets = np.cumsum([0] + [b.size for b in bs])[:-1].astype(np.int64)
    return np.concatenate(ws), w_offsets, np.concatenate(bs), b_offsets


def plane_layer(mlp: FusableMLP, grid: GridSpec) -> np.ndarray:
    """``FusableMLP.plane_layer`` in NumPy: the first layer folded into the grid's plane, in
    float64, returned as float32 ``(3, width_1)``."""
    plane = host_array(grid.basis, np.float64) @ host_array(mlp.weights[0], np.float64).T
    if mlp.biases[0] is not None:
        plane[0] += host_array(mlp.biases[0], np.float64)
    return plane.astype(np.float32)


def grid_mlp_numba(mlp: FusableMLP, grid: GridSpec, output: str, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (pixels, C) float32 from the fused CPU kernel; ``output`` is already resolved."""
    n_pixels = grid.width * grid.height
    plane = plane_layer(mlp, grid)
    weights, w_offsets, biases, b_offsets = pack_layers(mlp)
    grid_mlp_kernel(
        out.numpy(), plane, weights, w_offsets, biases, b_offsets,
        np.asarray(mlp.widths, np.int64), np.asarray(mlp.activation_codes(), np.int64),
        np.float32(mlp.negative_slope), grid.width, n_pixels,
        grid.u0, grid.du, grid.v0, grid.dv, OUTPUT_CODES[output],
    )  # fmt: skip
    return out
