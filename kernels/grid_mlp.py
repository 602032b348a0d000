"""Evaluate a model over a dense 2-D grid of its input space, straight to class probabilities.

The grid is a plane through a d-dimensional input space: pixel (r, c) is the input
``origin + (u0 + c·du)·axis_u + (v0 + r·dv)·axis_v`` (``GridSpec``). A fusable MLP (an
``nn.Sequential`` of Linear layers with element-wise activations between them) runs as one
fused kernel per frame: the grid's coordinates are generated inside the kernel and the first
layer is folded into the plane, ``W1·(o + u·a + v·b) + b1 = c0 + u·cu + v·cv``, so no input
point and no hidden activation is ever written to memory. Any other module falls back to
materialising the points and calling the module's own forward, in chunks.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from probescope.kernels.backend import choose_impl
from probescope.kernels.grid import GridSpec
from probescope.kernels.mlp import (
    FINALS,
    FusableMLP,
    NotFusableError,
    apply_activation,
    final_output_kind,
    model_output,
)

log = logging.getLogger("probescope")

OUTPUTS = ("auto", "softmax", "sigmoid", "raw")
OUTPUT_CODES = {"raw": 0, "softmax": 1, "sigmoid": 2}
# Measured on a 2-core CPU (benchmarks/RESULTS.md, 2026-11-23): the fused Numba kernel runs
# near the machine's matmul peak up to width 512 (1.7x to 3.7x faster than torch); at 1024 its
# buffers outgrow the core's cache and it is level with torch's BLAS (0.97x to 1.46x across
# runs), so impl="auto" sends CPU MLPs wider than 512 to torch.
NUMBA_MAX_AUTO_WIDTH = 512
# Measured on an H100 (benchmarks/RESULTS.md, 2026-11-23): the fused Triton kernel beats torch
# eager for 16-bit MLPs up to width 256 and fp32 ones up to 64 (its exact fp32 products run
# on the CUDA cores); wider ones go to torch's matrix products under impl="auto".
TRITON_MAX_AUTO_WIDTH = {torch.float32: 64, torch.float16: 256, torch.bfloat16: 256}


def resolve_output(output: str, num_outputs: int) -> str:
    """``auto`` -> ``sigmoid`` for one output, ``softmax`` otherwise."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output == "auto":
        return "sigmoid" if num_outputs == 1 else "softmax"
    return output


def output_width(output: str, num_outputs: int) -> int:
    """Columns of the result: two class probabilities for a 1-output sigmoid model."""
    return 2 if resolve_output(output, num_outputs) == "sigmoid" else num_outputs


def outputs_to_probs(outputs: torch.Tensor, output: str, final: str = "logits") -> torch.Tensor:
    """``(N, K)`` model outputs -> ``(N, C)``: softmax, ``[1 - p, p]`` from a sigmoid, or as they are.

    ``final`` is what the outputs already are (:func:`final_output_kind`): with ``auto``,
    probabilities stay probabilities (log-probabilities are exponentiated, one sigmoid output
    becomes its ``[1 - p, p]`` pair); ``softmax`` and ``sigmoid`` always do what they say."""
    mode = resolve_output(output, outputs.shape[-1])
    if output == "auto" and final != "logits":
        if final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {final!r}")
        if final == "log_softmax":
            return outputs.exp()
        if final == "sigmoid" and outputs.shape[-1] == 1:
            return torch.cat([1.0 - outputs, outputs], dim=-1)
        return outputs
    if mode == "raw":
        return outputs
    if mode == "sigmoid":
        p = torch.sigmoid(outputs[..., :1])
        return torch.cat([1.0 - p, p], dim=-1)
    return torch.softmax(outputs, dim=-1)


def grid_mlp_reference(mlp: FusableMLP, grid: GridSpec, output: str = "auto") -> torch.Tensor:
    """``(height, width, C)`` float64: the MLP's exact weights evaluated in float64 on the grid."""
    h = grid.points(torch.float64).to(mlp.device)
    for w, b, act in zip(mlp.weights, mlp.biases, mlp.activations, strict=True):
        h = h @ w.detach().to(torch.float64).T
        if b is not None:
            h = h + b.detach().to(torch.float64)
        h = apply_activation(h, act, mlp.negative_slope)
    probs = outputs_to_probs(_apply_final(h, mlp.final), output, mlp.final)
    return probs.reshape(grid.height, grid.width, -1)


def module_forward_on_grid(
    model: nn.Module, grid: GridSpec, output: str = "auto", batch_size: int = 65536
) -> torch.Tensor:
    """``(height, width, C)`` float32 through the module's own forward, in chunks (the fallback)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    points = grid.points(torch.float32)
    chunks = []
    with torch.no_grad():
        for start in range(0, points.shape[0], batch_size):
            x = points[start : start + batch_size].to(device, dtype, non_blocking=True)
            y = model_output(model(x)).float()
            chunks.append(y.reshape(y.shape[0], -1))
    outputs = torch.cat(chunks)
    return outputs_to_probs(outputs, output, final_output_kind(model)).reshape(grid.height, grid.width, -1)


def grid_mlp(
    model: nn.Module | FusableMLP,
    grid: GridSpec,
    output: str = "auto",
    *,
    out: torch.Tensor | None = None,
    impl: str = "auto",
    batch_size: int = 65536,
) -> torch.Tensor:
    """``(height, width, C)`` float32 probabilities (or raw outputs) of ``model`` over ``grid``.

    A fusable MLP runs fused (Triton on CUDA, Numba on CPU); any other module transparently
    runs its own forward on the materialised grid. ``out`` (e.g. a ring slot) receives the
    result when given.
    """
    if isinstance(model, FusableMLP):
        mlp = model
    else:
        try:
            mlp = FusableMLP.from_module(model)
        except NotFusableError as err:
            log.debug("grid_mlp: %s; using the module's forward", err)
            mlp = None
    if mlp is not None and mlp.in_features != grid.input_dim:
        raise ValueError(
            f"grid_mlp: the grid has {grid.input_dim} input dimensions, the MLP takes {mlp.in_features}"
        )
    if mlp is None:
        result = module_forward_on_grid(model, grid, output, batch_size)
        return result if out is None else out.copy_(result.reshape(out.shape))
    kind = _auto_kind(mlp, impl)
    plan = _kernel_plan(mlp, output)
    if kind == "torch" or plan is None:
        result = _torch_eager(mlp, grid, output, batch_size)
        return result if out is None else out.copy_(result.reshape(out.shape))
    mlp, mode = plan
    shape = (grid.height, grid.width, output_width(mode, mlp.out_features))
    if out is not None and out.numel() != math.prod(shape):
        raise ValueError(f"grid_mlp: out has {out.numel()} elements, the result has shape {shape}")
    direct = (
        out is not None and out.dtype == torch.float32 and out.is_contiguous() and out.device == mlp.device
    )
    target = out if direct else torch.empty(shape, dtype=torch.float32, device=mlp.device)
    if kind == "triton":
        from probescope.kernels._triton.grid_mlp import grid_mlp_triton as run
    else:
        from probescope.kernels._numba.grid_mlp import grid_mlp_numba as run
    run(mlp, grid, mode, target.view(-1, shape[-1]))
    if out is not None and not direct:
        out.copy_(target.reshape(out.shape))
        return out
    return target.view(shape) if out is None else out


def _torch_eager(mlp: FusableMLP, grid: GridSpec, output: str, batch_size: int) -> torch.Tensor:
    """The naive way: materialise the points, then one torch op per layer, chunk by chunk."""
    points = grid.points(torch.float32)
    chunks = []
    with torch.no_grad():
        for start in range(0, points.shape[0], batch_size):
            h = points[start : start + batch_size].to(mlp.device, mlp.dtype)
            for w, b, act in zip(mlp.weights, mlp.biases, mlp.activations, strict=True):
                h = apply_activation(F.linear(h, w, b), act, mlp.negative_slope)
            chunks.append(_apply_final(h.float(), mlp.final))
    return outputs_to_probs(torch.cat(chunks), output, mlp.final).reshape(grid.height, grid.width, -1)


def _apply_final(h: torch.Tensor, final: str) -> torch.Tensor:
    """The trailing Softmax / LogSoftmax a FusableMLP records rather than holds as a layer."""
    if final == "softmax":
        return torch.softmax(h, dim=-1)
    return torch.log_softmax(h, dim=-1) if final == "log_softmax" else h


def _kernel_plan(mlp: FusableMLP, output: str) -> tuple[FusableMLP, str] | None:
    """The MLP and kernel output mode that give ``outputs_to_probs(module outputs, output,
    mlp.final)``, or None where no kernel mode does (the torch path computes those)."""
    mode = resolve_output(output, mlp.out_features)  # validates ``output``
    if mlp.final == "logits":
        return mlp, mode
    if output not in ("auto", "raw"):  # softmax / sigmoid of probabilities, as asked
        return None
    if mlp.final == "sigmoid":
        if output == "auto" and mlp.out_features == 1:  # the kernel's [1 - p, p] from the logit
            return dataclasses.replace(mlp, activations=(*mlp.activations[:-1], "identity")), "sigmoid"
        return mlp, "raw"
    if mlp.final == "softmax":
        return mlp, "softmax"
    return (mlp, "softmax") if output == "auto" else None  # log-probabilities: none in the kernel


def fused_path(model: nn.Module, impl: str = "auto") -> str:
    """Which path ``grid_mlp`` takes for ``model``: ``triton``, ``numba``, ``torch`` or ``module forward``."""
    try:
        mlp = FusableMLP.from_module(model)
    except NotFusableError as err:
        return f"module forward ({err})"
    return _auto_kind(mlp, impl)


def _auto_kind(mlp: FusableMLP, impl: str) -> str:
    """The implementation for ``mlp``: ``impl`` if named, else the fastest measured one."""
    kind = choose_impl("grid_mlp", mlp.device, impl)
    if impl != "auto":
        return kind
    width = max(mlp.widths)
    if kind == "numba" and width > NUMBA_MAX_AUTO_WIDTH:
        return "torch"
    if kind == "triton" and width > TRITON_MAX_AUTO_WIDTH[mlp.dtype]:
        return "torch"
    return kind
