"""Fused grid MLP on the GPU: coordinates, every layer, softmax, in one kernel per frame.

One program owns BLOCK_M pixels. It computes their plane coordinates from its program id,
runs the first layer as fused multiply-adds (the layer is folded into the plane, so K = 2
never reaches the matrix units), and then the remaining layers two at a time: for the middle
layer of a pair it produces BLOCK_N units at a time and immediately multiplies them into the
pair's second layer, so a full-width hidden layer never has to exist anywhere, and wide
(1024) layers need only an (HIDDEN, BLOCK_N) weight tile in shared memory. An odd last
layer is one plain product. Softmax (or the sigmoid pair) runs on the logits in registers,
and only the (pixels, classes) probabilities are stored.

Three layouts of the same computation (``layout`` in the launch configuration):

- ``units``: activations held transposed, (units, pixels), every product
  weights @ activations, the weight tile being the matrix units' A operand. A pair's first
  product has only BLOCK_N rows, too few for Hopper's warp-group products (64 rows a warp
  group), so it runs on the older mma instructions. Correct at every tile size tried on an H100.
- ``pixels``: activations (pixels, units), the products of hidden layers activations @
  weights, the form of a fused attention kernel (pixels are its queries, a layer pair its keys
  and values). With BLOCK_M >= 64 both products of a hidden pair are warp-group products
  (compiled for sm_90a and read back: ``python -m benchmarks.triton_report``). The output
  layer's narrow product is still taken in the units form (its activations transposed once):
  Triton 3.6 on an H100 miscompiled chained row-major products whose second has 16 columns
  (benchmarks/triton_chained_dot.py, RESULTS.md), which is exactly that product. On an H100
  its CUDA tests passed and it was the fastest configuration swept for 16-bit hidden widths
  64 to 256 (2026-11-24, RESULTS.md), which therefore take it; the rest keep ``units``.
- ``kloop``: the ``pixels`` layout with the pairs shifted by one layer. The first hidden
  layer is a plain matrix product's main loop over the plane layer's units, BLOCK_N of them
  at a time, each chunk computed where it is used (the plane layer is a few multiply-adds a
  unit), so no full-width activations are held while it runs; the pairs start at the next
  layer, and where the hidden layers left are odd in number the output layer closes the last
  pair instead of following alone. The products have the same shapes as in ``pixels`` (for
  2-256-256-256-7: one (64 x 256) @ (256 x BLOCK_N) and one (64 x BLOCK_N) @ (BLOCK_N x
  256) per chunk), the kernel holds less: on the tile ``pixels`` is launched with (64
  pixels, BLOCK_N 32, 4 warps, 2 stages), bf16, it compiles for sm_90a to 204 registers a
  thread and 37 KiB of shared memory against 249 and 96 KiB (``python -m
  benchmarks.triton_report``, Triton 3.9), which leaves room for wider chunks (BLOCK_N 64:
  242 registers, no spill). Not yet timed on a GPU: the launch sweep times it
  (``benchmarks.tune_grid_mlp``).

In every layout the logits come out (outputs, pixels), and the softmax and store are shared.
Widths are padded to powers of two with zero weights, so padded units contribute nothing.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from probescope.kernels.backend import next_power_of_2, triton_interpreting
from probescope.kernels.grid import GridSpec
from probescope.kernels.grid_mlp import OUTPUT_CODES, output_width
from probescope.kernels.mlp import FusableMLP

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
def _pixels_dot(x, w, acc, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """acc + x @ w with fp32 accumulation, activations x rounded to DOT_DTYPE (weights already are);
    EMULATE multiplies the rounded values in fp32."""
    if EMULATE:
        return tl.dot(x.to(DOT_DTYPE).to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    if tl.float32 == DOT_DTYPE:
        return tl.dot(x, w, acc, input_precision="ieee")
    return tl.dot(x.to(DOT_DTYPE), w, acc, out_dtype=tl.float32)


@triton.jit
def _transposed(x, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """x.T, rounded to the product dtype first (half the bytes through shared memory)."""
    if EMULATE:
        return tl.trans(x)  # rounded by the product that takes it
    return tl.trans(x.to(DOT_DTYPE))


@triton.jit
def _layer_pair(h, mid_w, mid_b, next_w, next_b, slope, MID_ACT: tl.constexpr, NEXT_ACT: tl.constexpr,
                HIDDEN: tl.constexpr, NEXT: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
                BLOCK_N: tl.constexpr, PIXELS_FIRST: tl.constexpr, UNITS_OUT: tl.constexpr):  # fmt: skip
    """act(act(h W_mid + b_mid) W_next + b_next), the middle layer BLOCK_N units at a time, on
    activations h (HIDDEN, pixels), or (pixels, HIDDEN) if PIXELS_FIRST. The result is
    (NEXT, pixels), or (pixels, NEXT) if PIXELS_FIRST and not UNITS_OUT: with UNITS_OUT the
    second product is taken in the units form (weights @ activations), the form proven on
    Hopper for a narrow output layer. Weights are stored (in, out) row-major."""
    cols = tl.arange(0, HIDDEN)
    chunk = tl.arange(0, BLOCK_N)
    next_cols = tl.arange(0, NEXT)
    if PIXELS_FIRST and UNITS_OUT:
        acc = tl.zeros((NEXT, h.shape[0]), tl.float32)
        for n0 in range(0, HIDDEN, BLOCK_N):
            w = tl.load(mid_w + cols[:, None] * HIDDEN + (n0 + chunk)[None, :])  # (HIDDEN, BLOCK_N)
            z = _pixels_dot(h, w, tl.zeros((h.shape[0], BLOCK_N), tl.float32), DOT_DTYPE, EMULATE)
            z = _activate(z + tl.load(mid_b + n0 + chunk)[None, :], MID_ACT, slope)
            w2 = tl.load(next_w + (n0 + chunk)[None, :] * NEXT + next_cols[:, None])  # (NEXT, BLOCK_N)
            acc += _dot(w2, _transposed(z, DOT_DTYPE, EMULATE), DOT_DTYPE, EMULATE)
        out = _activate(acc + tl.load(next_b + next_cols)[:, None], NEXT_ACT, slope)
    elif PIXELS_FIRST:
        acc = tl.zeros((h.shape[0], NEXT), tl.float32)
        for n0 in range(0, HIDDEN, BLOCK_N):
            w = tl.load(mid_w + cols[:, None] * HIDDEN + (n0 + chunk)[None, :])  # (HIDDEN, BLOCK_N)
            z = _pixels_dot(h, w, tl.zeros((h.shape[0], BLOCK_N), tl.float32), DOT_DTYPE, EMULATE)
            z = _activate(z + tl.load(mid_b + n0 + chunk)[None, :], MID_ACT, slope)
            w2 = tl.load(next_w + (n0 + chunk)[:, None] * NEXT + next_cols[None, :])  # (BLOCK_N, NEXT)
            acc = _pixels_dot(z, w2, acc, DOT_DTYPE, EMULATE)
        out = _activate(acc + tl.load(next_b + next_cols)[None, :], NEXT_ACT, slope)
    else:  # (a compiled jit function has one return: code after an early one is still built)
        acc = tl.zeros((NEXT, h.shape[1]), tl.float32)
        for n0 in range(0, HIDDEN, BLOCK_N):
            w = tl.load(mid_w + cols[None, :] * HIDDEN + (n0 + chunk)[:, None])  # (BLOCK_N, HIDDEN)
            z = _dot(w, h, DOT_DTYPE, EMULATE) + tl.load(mid_b + n0 + chunk)[:, None]
            z = _activate(z, MID_ACT, slope)
            w2 = tl.load(next_w + (n0 + chunk)[None, :] * NEXT + next_cols[:, None])  # (NEXT, BLOCK_N)
            acc += _dot(w2, z, DOT_DTYPE, EMULATE)
        out = _activate(acc + tl.load(next_b + next_cols)[:, None], NEXT_ACT, slope)
    return out


@triton.jit
def _last_layer(h, w_ptr, b_ptr, slope, ACT: tl.constexpr, HIDDEN: tl.constexpr, OUT_PAD: tl.constexpr,
                DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """act(W^T h + b) for the output layer alone, on activations h (HIDDEN, pixels); W stored
    (HIDDEN, OUT_PAD) row-major."""
    cols = tl.arange(0, HIDDEN)
    out_cols = tl.arange(0, OUT_PAD)
    w = tl.load(w_ptr + cols[None, :] * OUT_PAD + out_cols[:, None])  # (OUT_PAD, HIDDEN)
    return _activate(_dot(w, h, DOT_DTYPE, EMULATE) + tl.load(b_ptr + out_cols)[:, None], ACT, slope)


@triton.jit
def _plane_layer(plane_ptr, u, v, slope, N: tl.constexpr, ACT: tl.constexpr, PIXELS_FIRST: tl.constexpr):
    """act(c0 + u·cu + v·cv): the first layer's N units at each pixel's plane coordinates."""
    return _plane_units(plane_ptr, u, v, slope, tl.arange(0, N), N, ACT, PIXELS_FIRST)


@triton.jit
def _plane_units(plane_ptr, u, v, slope, units, N: tl.constexpr, ACT: tl.constexpr,
                 PIXELS_FIRST: tl.constexpr):  # fmt: skip
    """The first layer's ``units`` (of its N) at each pixel's plane coordinates."""
    axis: tl.constexpr = 1 if PIXELS_FIRST else 0  # where the units run
    c0 = tl.expand_dims(tl.load(plane_ptr + units), 1 - axis)
    cu = tl.expand_dims(tl.load(plane_ptr + N + units), 1 - axis)
    cv = tl.expand_dims(tl.load(plane_ptr + 2 * N + units), 1 - axis)
    return _activate(c0 + cu * tl.expand_dims(u, axis) + cv * tl.expand_dims(v, axis), ACT, slope)


@triton.jit
def _plane_product(plane_ptr, u, v, w_ptr, b_ptr, slope, PLANE_ACT: tl.constexpr, ACT: tl.constexpr,
                   HIDDEN: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
                   BLOCK_K: tl.constexpr):  # fmt: skip
    """act(act_plane(c0 + u·cu + v·cv) W + b), (pixels, HIDDEN): the first hidden layer's
    product over the plane layer's units BLOCK_K at a time, each chunk of units computed where
    it is used; W stored (in, out) row-major."""
    cols = tl.arange(0, HIDDEN)
    acc = tl.zeros((u.shape[0], HIDDEN), tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        units = k0 + tl.arange(0, BLOCK_K)
        h = _plane_units(plane_ptr, u, v, slope, units, HIDDEN, PLANE_ACT, True)  # (pixels, BLOCK_K)
        w = tl.load(w_ptr + units[:, None] * HIDDEN + cols[None, :])  # (BLOCK_K, HIDDEN)
        acc = _pixels_dot(h, w, acc, DOT_DTYPE, EMULATE)
    return _activate(acc + tl.load(b_ptr + cols)[None, :], ACT, slope)


@triton.jit
def _outputs(logits, col, NUM_OUT: tl.constexpr, OUT_MODE: tl.constexpr):
    """Softmax over the NUM_OUT real outputs, the [1 - p, p] sigmoid pair, or the raw logits,
    on (OUT_PAD, pixels) logits; ``col`` is each row's output column."""
    if OUT_MODE == 1:
        logits = tl.where(col < NUM_OUT, logits, float("-inf"))
        e = tl.exp(logits - tl.max(logits, axis=0)[None, :])
        result = e / tl.sum(e, axis=0)[None, :]
    elif OUT_MODE == 2:
        p = tl.sigmoid(tl.sum(tl.where(col == 0, logits, 0.0), axis=0))[None, :]
        result = tl.where(col == 0, 1.0 - p, p)
    else:
        result = logits
    return result


@triton.jit
def _grid_mlp_kernel(
    out_ptr, plane_ptr, hidden_w_ptr, hidden_b_ptr, out_w_ptr, out_b_ptr,
    n_pixels, width, u0, du, v0, dv, slope, out_stride,
    NUM_LINEAR: tl.constexpr, NUM_OUT: tl.constexpr, OUT_COLS: tl.constexpr,
    HIDDEN: tl.constexpr, OUT_PAD: tl.constexpr, ACTS: tl.constexpr, OUT_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PIXELS_FIRST: tl.constexpr, K_FIRST: tl.constexpr,
):  # fmt: skip
    pixel = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = pixel // width
    u = u0 + (pixel - row * width).to(tl.float32) * du
    v = v0 + row.to(tl.float32) * dv

    # Logits always come out (OUT_PAD, pixels): the output layer's narrow product is taken in
    # the units form in every layout (see the module's docstring).
    if NUM_LINEAR == 1:
        logits = _plane_layer(plane_ptr, u, v, slope, OUT_PAD, ACTS & 15, False)
    else:
        # Linear layer 0 is the plane's; with K_FIRST layer 1 is taken with it (a product over
        # its units, chunk by chunk) when it is a hidden layer. FIRST: the layers done so far.
        FIRST: tl.constexpr = 2 if K_FIRST and NUM_LINEAR >= 3 else 1
        if FIRST == 2:
            h = _plane_product(plane_ptr, u, v, hidden_w_ptr, hidden_b_ptr, slope, ACTS & 15,
                               (ACTS >> 4) & 15, HIDDEN, DOT_DTYPE, EMULATE, BLOCK_N)  # fmt: skip
        else:
            h = _plane_layer(plane_ptr, u, v, slope, HIDDEN, ACTS & 15, PIXELS_FIRST)
        # The hidden layers left (FIRST .. NUM_LINEAR-2) in pairs (middle, second), hidden layer
        # i's weights at hidden_w_ptr[i - 1]; then either a last pair ending in the output layer
        # or the output layer alone.
        for pair in tl.static_range((NUM_LINEAR - 1 - FIRST) // 2):
            mid = FIRST + 2 * pair  # the pair's middle layer
            h = _layer_pair(h, hidden_w_ptr + (mid - 1) * HIDDEN * HIDDEN, hidden_b_ptr + (mid - 1) * HIDDEN,
                            hidden_w_ptr + mid * HIDDEN * HIDDEN, hidden_b_ptr + mid * HIDDEN, slope,
                            (ACTS >> (4 * mid)) & 15, (ACTS >> (4 * (mid + 1))) & 15,
                            HIDDEN, HIDDEN, DOT_DTYPE, EMULATE, BLOCK_N, PIXELS_FIRST,
                            UNITS_OUT=False)  # fmt: skip
        if (NUM_LINEAR - 1 - FIRST) % 2 == 1:
            logits = _layer_pair(h, hidden_w_ptr + (NUM_LINEAR - 3) * HIDDEN * HIDDEN,
                                 hidden_b_ptr + (NUM_LINEAR - 3) * HIDDEN, out_w_ptr, out_b_ptr, slope,
                                 (ACTS >> (4 * (NUM_LINEAR - 2))) & 15, (ACTS >> (4 * (NUM_LINEAR - 1))) & 15,
                                 HIDDEN, OUT_PAD, DOT_DTYPE, EMULATE, BLOCK_N, PIXELS_FIRST,
                                 UNITS_OUT=True)  # fmt: skip
        else:
            if PIXELS_FIRST:
                h = _transposed(h, DOT_DTYPE, EMULATE)
            logits = _last_layer(h, out_w_ptr, out_b_ptr, slope, (ACTS >> (4 * (NUM_LINEAR - 1))) & 15,
                                 HIDDEN, OUT_PAD, DOT_DTYPE, EMULATE)  # fmt: skip

    out_cols = tl.arange(0, OUT_PAD)
    result = _outputs(logits, out_cols[:, None], NUM_OUT, OUT_MODE)
    mask = (pixel < n_pixels)[None, :] & (out_cols[:, None] < OUT_COLS)
    tl.store(out_ptr + pixel[None, :] * out_stride + out_cols[:, None], result, mask=mask)


def pack_layers(mlp: FusableMLP, grid: GridSpec, hidden: int, out_pad: int, weight_dtype: torch.dtype):
    """Zero-padded kernel inputs: the first layer folded into the grid's plane as [3, H] (or
    [3, OUT_PAD] without hidden layers), hidden layers (in, out) as [L-2, H, H], their biases,
    the output layer as [H, OUT_PAD] and its bias.

    The buffers are allocated once per MLP (per set of parameter tensors) and refreshed from
    the current weights on every call: one multi-tensor copy, and four ops for the plane. They
    live exactly as long as those parameters: a captured CUDA graph of a frame reads them at
    every replay, so they are never evicted for room, and once any of the parameters is
    garbage (its id free for another tensor) the entry goes with it."""
    params = [t for t in (*mlp.weights, *mlp.biases) if t is not None]
    key = (tuple(map(id, mlp.weights)), tuple(map(id, mlp.biases)), hidden, out_pad, weight_dtype)
    packed = _PACKED.get(key)
    if packed is None:
        packed = _PACKED[key] = _PackedLayers(mlp, hidden, out_pad, weight_dtype)
        for t in params:
            weakref.finalize(t, _PACKED.pop, key, None)
    packed.refresh()
    mlp.plane_layer(grid, out=packed.plane[:, : mlp.widths[0]])
    return (packed.plane, *packed.buffers)


class _PackedLayers:
    """Padded buffers of one MLP and the (buffer view, parameter view) pairs that fill them."""

    def __init__(self, mlp: FusableMLP, hidden: int, out_pad: int, weight_dtype: torch.dtype):
        device = mlp.device
        self.plane = torch.zeros((3, hidden if len(mlp.weights) > 1 else out_pad), device=device)
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


def padded_hidden(widths: tuple[int, ...]) -> int:
    """The kernel's hidden width for Linear output ``widths``: the widest hidden layer, padded
    to a power of two of at least 16 (the smallest matrix-unit tile)."""
    return max(16, next_power_of_2(max(widths[:-1]))) if len(widths) > 1 else 16


def launch_config(hidden: int, dtype: torch.dtype) -> dict:
    """BLOCK_M, BLOCK_N and num_warps for a padded hidden width.

    A program keeps a (BLOCK_N, HIDDEN) weight tile per pipeline stage and its (HIDDEN, BLOCK_M)
    activations in shared memory, so wide layers take narrow tiles; :func:`grid_mlp_triton`
    shrinks a configuration that does not fit the device's shared memory.
    """
    if triton_interpreting():
        return {"layout": "units", "block_m": 128, "block_n": min(hidden, 64), "num_warps": 4}
    # Swept on an H100 (python -m benchmarks.tune_grid_mlp, benchmarks/RESULTS.md): 16-bit
    # widths 64 to 256 in the pixels layout (2026-11-24: 2-256x3-7 bf16 at 1024² 1.02 ms against
    # 1.47 ms in units, 2-64-64-3 0.280 against 0.343 ms); the rest as swept on 2026-11-23.
    if dtype != torch.float32 and 64 <= hidden <= 256:
        return {"layout": "pixels", "block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
    # fp32 up to width 64 on 8 warps: the sweep's winner for 2-32-32-3 fp32, and at width 64
    # the 4-warp tile spills registers (benchmarks.triton_report; 8 warps: 66, no spill).
    if hidden <= 64:
        warps = 8 if dtype == torch.float32 else 4
        return {"layout": "units", "block_m": 128, "block_n": min(hidden, 64), "num_warps": warps}
    if hidden <= 256:
        return {"layout": "units", "block_m": 128, "block_n": 32, "num_warps": 8}
    return {"layout": "units", "block_m": 32, "block_n": 16 if dtype == torch.float32 else 32, "num_warps": 4}


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

    ``config`` overrides :func:`launch_config` (``layout``: ``units`` or ``pixels``, ``block_m``,
    ``block_n``, ``num_warps``, ``num_stages``), for tuning.
    """
    if config.get("layout", "units") not in LAYOUTS:
        raise ValueError(
            f"grid_mlp_triton: layout must be one of {sorted(LAYOUTS)}, got {config['layout']!r}"
        )
    args, constants = kernel_arguments(mlp, grid, output, out)
    # the constants are always built in this order; a layout alone still shrinks to fit
    key = (*constants.values(), config.get("layout"), out.device)
    tuned = any(name != "layout" for name in config)
    config = {**_FITTED.get(key, launch_config(constants["HIDDEN"], mlp.dtype)), **config}
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


def kernel_arguments(
    mlp: FusableMLP, grid: GridSpec, output: str, out: torch.Tensor, emulate: bool | None = None
) -> tuple[tuple, dict]:
    """The kernel's run-time arguments (packed from the current weights) and compile-time
    constants. ``emulate`` (fp32 products of bf16-rounded values) defaults to on for bf16
    under the interpreter, which lacks bf16 products."""
    if emulate is None:
        emulate = triton_interpreting() and mlp.dtype == torch.bfloat16
    widths = mlp.widths
    hidden = padded_hidden(widths)
    out_pad = max(16, next_power_of_2(widths[-1]))
    weight_dtype = torch.float32 if emulate else mlp.dtype
    plane, hidden_w, hidden_b, out_w, out_b = pack_layers(mlp, grid, hidden, out_pad, weight_dtype)
    constants = dict(
        NUM_LINEAR=len(widths), NUM_OUT=widths[-1], OUT_COLS=output_width(output, mlp.out_features),
        HIDDEN=hidden, OUT_PAD=out_pad, OUT_MODE=OUTPUT_CODES[output],
        ACTS=sum(code << (4 * i) for i, code in enumerate(mlp.activation_codes())),
        DOT_DTYPE=_DOT_DTYPES[mlp.dtype], EMULATE=emulate,
    )  # fmt: skip
    args = (
        out, plane, hidden_w, hidden_b, out_w, out_b, grid.width * grid.height, grid.width,
        grid.u0, grid.du, grid.v0, grid.dv, mlp.negative_slope, out.stride(0),
    )  # fmt: skip
    return args, constants


LAYOUTS = {"units": (False, False), "pixels": (True, False), "kloop": (True, True)}  # (PIXELS_FIRST, K_FIRST)


def layout_constants(layout: str) -> dict:
    """The kernel's compile-time constants that make ``layout``."""
    pixels_first, k_first = LAYOUTS[layout]
    return {"PIXELS_FIRST": pixels_first, "K_FIRST": k_first}


def _launch(args: tuple, constants: dict, config: dict) -> None:
    stages = {"num_stages": config["num_stages"]} if "num_stages" in config else {}
    _grid_mlp_kernel[(triton.cdiv(args[6], config["block_m"]),)](
        *args, **constants, BLOCK_M=config["block_m"], BLOCK_N=config["block_n"],
        **layout_constants(config.get("layout", "units")),
        num_warps=config["num_warps"], **stages,
    )  # fmt: skip
