"""Fused grid MLP on the GPU: coordinates, every layer, softmax, in one kernel per frame.

One program owns BLOCK_M pixels. It computes their plane coordinates from its program id,
runs the first layer as fused multiply-adds (the layer is folded into the plane, so K = 2
never reaches the matrix units), and then the remaining layers two at a time: for the middle
layer of a pair it produces BLOCK_N units at a time and immediately multiplies them into the
pair's second layer, so a full-width hidden layer never has to exist anywhere, and wide
(1024) layers need only an (HIDDEN, BLOCK_N) weight tile in shared memory. An odd last
layer is one plain product. Softmax (or the sigmoid pair) runs on the logits in registers,
and only the (pixels, classes) probabilities are stored.

Activations are held transposed, (units, pixels), and every product is weights @ activations:
the weight tile is the matrix units' A operand, loaded from memory, and the activations are
the B operand. The row-major form (activations @ weights, activations as A operand straight
from registers) is miscompiled by Triton 3.6 on Hopper when two products are chained in the
loop (wrong sums with BLOCK_N = 64, illegal addresses with bf16 64-wide layers; found on an
H100 with benchmarks' diagnostics, recorded in benchmarks/RESULTS.md); this form is correct at
every tile size tried.

Widths are padded to powers of two with zero weights, so padded units contribute nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from probescope.kernels.backend import next_power_of_2, triton_interpreting
from probescope.kernels.grid_mlp import OUTPUT_CODES, FusableMLP, GridSpec, output_width

_DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _activate(x, CODE: tl.constexpr, slope):
    if CODE == 1:
        x = tl.where(x < 0.0, 0.0, x)  # NaN stays NaN (tl.maximum would return 0)
    elif CODE == 2:
        x = tl.where(x >= 0.0, x, x * slope)
    elif CODE == 3:
        x = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    elif CODE == 4:
        x = tl.sigmoid(x)
    elif CODE == 5:
        x = x * tl.sigmoid(x)
    elif CODE == 6:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif CODE == 7:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    return x


@triton.jit
def _dot(w, x, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """w @ x with fp32 accumulation, x rounded to DOT_DTYPE; EMULATE multiplies in fp32."""
    if EMULATE:
        return tl.dot(w.to(tl.float32), x.to(DOT_DTYPE).to(tl.float32), input_precision="ieee")
    if tl.float32 == DOT_DTYPE:
        return tl.dot(w, x, input_precision="ieee")
    return tl.dot(w, x.to(DOT_DTYPE), out_dtype=tl.float32)


@triton.jit
def _layer_pair(h, mid_w, mid_b, next_w, next_b, slope, MID_ACT: tl.constexpr, NEXT_ACT: tl.constexpr,
                HIDDEN: tl.constexpr, NEXT: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
    """act(W_next^T act(W_mid^T h + b_mid) + b_next) on transposed activations h (HIDDEN, pixels),
    the middle layer BLOCK_N units at a time. Weights are stored (in, out) row-major."""
    cols = tl.arange(0, HIDDEN)
    chunk = tl.arange(0, BLOCK_N)
    next_cols = tl.arange(0, NEXT)
    acc = tl.zeros((NEXT, h.shape[1]), tl.float32)
    for n0 in range(0, HIDDEN, BLOCK_N):
        w = tl.load(mid_w + cols[None, :] * HIDDEN + (n0 + chunk)[:, None])  # (BLOCK_N, HIDDEN)
        z = _activate(_dot(w, h, DOT_DTYPE, EMULATE) + tl.load(mid_b + n0 + chunk)[:, None], MID_ACT, slope)
        w2 = tl.load(next_w + (n0 + chunk)[None, :] * NEXT + next_cols[:, None])  # (NEXT, BLOCK_N)
        acc += _dot(w2, z, DOT_DTYPE, EMULATE)
    return _activate(acc + tl.load(next_b + next_cols)[:, None], NEXT_ACT, slope)


@triton.jit
def _grid_mlp_kernel(
    out_ptr, plane_ptr, hidden_w_ptr, hidden_b_ptr, out_w_ptr, out_b_ptr,
    n_pixels, width, u0, du, v0, dv, slope, out_stride,
    NUM_LINEAR: tl.constexpr, NUM_OUT: tl.constexpr, OUT_COLS: tl.constexpr,
    HIDDEN: tl.constexpr, OUT_PAD: tl.constexpr, ACTS: tl.constexpr, OUT_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pixel = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row = pixel // width
    u = (u0 + (pixel - row * width).to(tl.float32) * du)[None, :]
    v = (v0 + row.to(tl.float32) * dv)[None, :]
    out_cols = tl.arange(0, OUT_PAD)

    if NUM_LINEAR == 1:
        c0 = tl.load(plane_ptr + out_cols)[:, None]
        cu = tl.load(plane_ptr + OUT_PAD + out_cols)[:, None]
        cv = tl.load(plane_ptr + 2 * OUT_PAD + out_cols)[:, None]
        logits = _activate(c0 + cu * u + cv * v, ACTS & 15, slope)
    else:
        cols = tl.arange(0, HIDDEN)
        c0 = tl.load(plane_ptr + cols)[:, None]
        cu = tl.load(plane_ptr + HIDDEN + cols)[:, None]
        cv = tl.load(plane_ptr + 2 * HIDDEN + cols)[:, None]
        h = _activate(c0 + cu * u + cv * v, ACTS & 15, slope)  # (HIDDEN, BLOCK_M)
        # Linear layers 1 .. NUM_LINEAR-1 in pairs (middle, second): first the pairs whose second
        # layer is hidden, then either a last pair ending in the output layer or the output alone.
        for pair in tl.static_range((NUM_LINEAR - 2) // 2):
            h = _layer_pair(h, hidden_w_ptr + 2 * pair * HIDDEN * HIDDEN, hidden_b_ptr + 2 * pair * HIDDEN,
                            hidden_w_ptr + (2 * pair + 1) * HIDDEN * HIDDEN,
                            hidden_b_ptr + (2 * pair + 1) * HIDDEN, slope,
                            (ACTS >> (4 * (2 * pair + 1))) & 15, (ACTS >> (4 * (2 * pair + 2))) & 15,
                            HIDDEN, HIDDEN, DOT_DTYPE, EMULATE, BLOCK_N)  # fmt: skip
        if (NUM_LINEAR - 1) % 2 == 0:
            logits = _layer_pair(h, hidden_w_ptr + (NUM_LINEAR - 3) * HIDDEN * HIDDEN,
                                 hidden_b_ptr + (NUM_LINEAR - 3) * HIDDEN, out_w_ptr, out_b_ptr, slope,
                                 (ACTS >> (4 * (NUM_LINEAR - 2))) & 15, (ACTS >> (4 * (NUM_LINEAR - 1))) & 15,
                                 HIDDEN, OUT_PAD, DOT_DTYPE, EMULATE, BLOCK_N)  # fmt: skip
        else:
            w = tl.load(out_w_ptr + cols[None, :] * OUT_PAD + out_cols[:, None])  # (OUT_PAD, HIDDEN)
            logits = _dot(w, h, DOT_DTYPE, EMULATE) + tl.load(out_b_ptr + out_cols)[:, None]
            logits = _activate(logits, (ACTS >> (4 * (NUM_LINEAR - 1))) & 15, slope)

    if OUT_MODE == 1:
        logits = tl.where(out_cols[:, None] < NUM_OUT, logits, float("-inf"))
        top = tl.max(logits, axis=0)
        e = tl.exp(logits - top[None, :])
        result = e / tl.sum(e, axis=0)[None, :]
    elif OUT_MODE == 2:
        first = tl.sum(tl.where(out_cols[:, None] == 0, logits, 0.0), axis=0)
        p = tl.sigmoid(first)[None, :]
        result = tl.where(out_cols[:, None] == 0, 1.0 - p, p)
    else:
        result = logits
    mask = (pixel < n_pixels)[None, :] & (out_cols[:, None] < OUT_COLS)
    tl.store(out_ptr + pixel[None, :] * out_stride + out_cols[:, None], result, mask=mask)


def _pad(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    padded = torch.zeros(shape, dtype=dtype, device=t.device)
    padded[tuple(slice(0, n) for n in t.shape)] = t.to(dtype)
    return padded


def pack_layers(mlp: FusableMLP, hidden: int, out_pad: int, weight_dtype: torch.dtype):
    """Zero-padded weights: hidden layers (in, out) as [L-2, H, H], the output layer as [H, OUT_PAD].

    The buffers are allocated once per MLP (per set of parameter tensors) and refreshed with
    one multi-tensor copy per call, so a frame costs a single op here, not a dozen."""
    key = (tuple(map(id, mlp.weights)), tuple(map(id, mlp.biases)), hidden, out_pad, weight_dtype)
    packed = _PACKED.get(key)
    if packed is None:
        if len(_PACKED) >= 32:
            _PACKED.clear()
        packed = _PACKED[key] = _PackedLayers(mlp, hidden, out_pad, weight_dtype)
    packed.refresh()
    return packed.buffers


class _PackedLayers:
    """Padded buffers of one MLP and the (buffer view, parameter view) pairs that fill them."""

    def __init__(self, mlp: FusableMLP, hidden: int, out_pad: int, weight_dtype: torch.dtype):
        device = mlp.device
        self.keep = (mlp.weights, mlp.biases)  # held: the key's ids stay theirs
        middle = list(zip(mlp.weights[1:-1], mlp.biases[1:-1], strict=True))
        hidden_w = torch.zeros((max(len(middle), 1), hidden, hidden), dtype=weight_dtype, device=device)
        hidden_b = torch.zeros((max(len(middle), 1), hidden), dtype=torch.float32, device=device)
        targets, sources = [], []
        for i, (w, b) in enumerate(middle):
            targets.append(hidden_w[i, : w.shape[1], : w.shape[0]])
            sources.append(w.detach().T)
            if b is not None:
                targets.append(hidden_b[i, : b.shape[0]])
                sources.append(b.detach())
        out_b = torch.zeros((out_pad,), dtype=torch.float32, device=device)
        if len(mlp.weights) > 1:
            last_w, last_b = mlp.weights[-1], mlp.biases[-1]
            out_w = torch.zeros((hidden, out_pad), dtype=weight_dtype, device=device)
            targets.append(out_w[: last_w.shape[1], : last_w.shape[0]])
            sources.append(last_w.detach().T)
            if last_b is not None:
                targets.append(out_b[: last_b.shape[0]])
                sources.append(last_b.detach())
        else:
            out_w = torch.zeros((1,), dtype=weight_dtype, device=device)
        self.buffers = (hidden_w, hidden_b, out_w, out_b)
        self.targets, self.sources = targets, sources

    def refresh(self) -> None:
        if self.targets:
            with torch.no_grad():
                torch._foreach_copy_(self.targets, self.sources)


_PACKED: dict[tuple, _PackedLayers] = {}


def launch_config(hidden: int, dtype: torch.dtype) -> dict:
    """BLOCK_M, BLOCK_N and num_warps for a padded hidden width.

    A program keeps a (BLOCK_N, HIDDEN) weight tile per pipeline stage and its (HIDDEN, BLOCK_M)
    activations in shared memory, so wide layers take narrow tiles; :func:`grid_mlp_triton`
    shrinks a configuration that does not fit the device's shared memory.
    """
    if triton_interpreting():
        return {"block_m": 128, "block_n": min(hidden, 64), "num_warps": 4}
    # Swept on an H100 (python -m benchmarks.tune_grid_mlp, benchmarks/RESULTS.md, 2026-11-23).
    if hidden <= 64:
        return {"block_m": 128, "block_n": min(hidden, 64), "num_warps": 4}
    if hidden <= 256:
        return {"block_m": 128, "block_n": 32, "num_warps": 8}
    return {"block_m": 32, "block_n": 16 if dtype == torch.float32 else 32, "num_warps": 4}


def _smaller(config: dict) -> dict | None:
    """The next configuration to try after an out-of-shared-memory error, or None."""
    if config.get("num_stages", 3) > 1:
        return {**config, "num_stages": config.get("num_stages", 3) - 1}
    if config["block_n"] > 16:
        return {**config, "block_n": config["block_n"] // 2, "num_stages": 2}
    if config["block_m"] > 16:
        return {**config, "block_m": config["block_m"] // 2, "num_stages": 2}
    return None


_FITTED: dict[tuple, dict] = {}  # launch configurations that fit, by kernel shape and device


def grid_mlp_triton(
    mlp: FusableMLP, grid: GridSpec, output: str, out: torch.Tensor, **config: int
) -> torch.Tensor:
    """Fill ``out`` (pixels, C) float32 from the fused Triton kernel; ``output`` is already resolved.

    ``config`` overrides :func:`launch_config` (``block_m``, ``block_n``, ``num_warps``,
    ``num_stages``), for tuning.
    """
    emulate = triton_interpreting() and mlp.dtype == torch.bfloat16  # the interpreter lacks bf16 dots
    widths = mlp.widths
    hidden = max(16, next_power_of_2(max(widths[:-1]))) if len(widths) > 1 else 16
    out_pad = max(16, next_power_of_2(widths[-1]))
    weight_dtype = torch.float32 if emulate else mlp.dtype
    hidden_w, hidden_b, out_w, out_b = pack_layers(mlp, hidden, out_pad, weight_dtype)
    plane = _pad(mlp.plane_layer(grid), (3, hidden if len(widths) > 1 else out_pad), torch.float32)
    acts = sum(code << (4 * i) for i, code in enumerate(mlp.activation_codes()))

    n_pixels = grid.width * grid.height
    constants = dict(
        NUM_LINEAR=len(widths), NUM_OUT=widths[-1], OUT_COLS=output_width(output, mlp.out_features),
        HIDDEN=hidden, OUT_PAD=out_pad, ACTS=acts, OUT_MODE=OUTPUT_CODES[output],
        DOT_DTYPE=_DOT_DTYPES[mlp.dtype], EMULATE=emulate,
    )  # fmt: skip
    args = (
        out, plane.contiguous(), hidden_w, hidden_b, out_w, out_b,
        n_pixels, grid.width, grid.u0, grid.du, grid.v0, grid.dv, mlp.negative_slope, out.stride(0),
    )  # fmt: skip
    key = (tuple(sorted(constants.items(), key=str)), out.device)
    tuned = bool(config)
    config = {**_FITTED.get(key, launch_config(hidden, mlp.dtype)), **config}
    while True:
        try:
            _launch(args, constants, config)
        except OutOfResources:
            smaller = None if tuned else _smaller(config)
            if smaller is None:
                raise
            config = smaller
            continue
        if not tuned:
            _FITTED[key] = config
        return out


def _launch(args: tuple, constants: dict, config: dict) -> None:
    stages = {"num_stages": config["num_stages"]} if "num_stages" in config else {}
    _grid_mlp_kernel[(triton.cdiv(args[6], config["block_m"]),)](
        *args, **constants, BLOCK_M=config["block_m"], BLOCK_N=config["block_n"],
        num_warps=config["num_warps"], **stages,
    )  # fmt: skip
