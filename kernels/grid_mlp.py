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
import functools
import logging
import math
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from probescope.kernels.backend import choose_impl, device_copy
from probescope.kernels.grid import grid_inputs_reference

log = logging.getLogger("probescope")

OUTPUTS = ("auto", "softmax", "sigmoid", "raw")
# Activation codes shared by every implementation (Triton packs them four bits a layer).
ACTIVATIONS = {
    "identity": 0,
    "relu": 1,
    "leaky_relu": 2,
    "tanh": 3,
    "sigmoid": 4,
    "silu": 5,
    "gelu": 6,
    "gelu_tanh": 7,
}
OUTPUT_CODES = {"raw": 0, "softmax": 1, "sigmoid": 2}
MAX_LINEAR_LAYERS = 8
MAX_WIDTH = 1024
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Measured on a 2-core CPU (benchmarks/RESULTS.md, 2026-11-23): the fused Numba kernel runs
# near the machine's matmul peak up to width 512 (1.7x to 3.7x faster than torch); at 1024 its
# buffers outgrow the core's cache and it is level with torch's BLAS (0.97x to 1.46x across
# runs), so impl="auto" sends CPU MLPs wider than 512 to torch.
NUMBA_MAX_AUTO_WIDTH = 512
# Measured on an H100 (benchmarks/RESULTS.md, 2026-11-23): the fused Triton kernel beats torch
# eager for 16-bit MLPs up to width 256 and fp32 ones up to 64 (its exact fp32 products run
# on the CUDA cores); wider ones go to torch's matrix products under impl="auto".
TRITON_MAX_AUTO_WIDTH = {torch.float32: 64, torch.float16: 256, torch.bfloat16: 256}


class NotFusableError(ValueError):
    """The module is not an MLP the fused kernels can evaluate; the reason says why."""


@dataclass(frozen=True)
class GridSpec:
    """A ``height`` x ``width`` grid of points on the plane (origin, axis_u, axis_v).

    Pixel (r, c) has plane coordinates ``u = u0 + c·du``, ``v = v0 + r·dv``; row 0 is the top of
    the picture, so ``dv`` is usually negative.
    """

    origin: torch.Tensor
    axis_u: torch.Tensor
    axis_v: torch.Tensor
    u0: float
    du: float
    v0: float
    dv: float
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("origin", "axis_u", "axis_v"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dim() != 1:
                raise ValueError(f"GridSpec: {name} must be a 1-D tensor, got {value!r}")
            object.__setattr__(self, name, value.detach().to("cpu", torch.float64))
        if not self.origin.shape == self.axis_u.shape == self.axis_v.shape:
            raise ValueError(
                "GridSpec: origin, axis_u and axis_v must have the same length, got "
                f"{self.origin.shape[0]}, {self.axis_u.shape[0]}, {self.axis_v.shape[0]}"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GridSpec: {name} must be a positive integer, got {value!r}")
        for name in ("u0", "du", "v0", "dv"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"GridSpec: {name} must be finite, got {getattr(self, name)!r}")

    @classmethod
    def rectangle(cls, domain: tuple[float, float, float, float], width: int, height: int) -> GridSpec:
        """Pixel centres of the 2-D rectangle ``(x0, x1, y0, y1)``, row 0 at the top (y1)."""
        return cls.on_plane(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]),
                            domain, width, height)  # fmt: skip

    @classmethod
    def on_plane(
        cls,
        origin: torch.Tensor,
        axis_u: torch.Tensor,
        axis_v: torch.Tensor,
        domain: tuple[float, float, float, float],
        width: int,
        height: int,
    ) -> GridSpec:
        """Pixel centres of the plane rectangle ``(u0, u1, v0, v1)``, row 0 at the top (v1)."""
        u_lo, u_hi, v_lo, v_hi = (float(x) for x in domain)
        for name, n in (("width", width), ("height", height)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"GridSpec: {name} must be a positive integer, got {n!r}")
        du, dv = (u_hi - u_lo) / width, (v_hi - v_lo) / height
        return cls(origin, axis_u, axis_v, u_lo + 0.5 * du, du, v_hi - 0.5 * dv, -dv, width, height)

    @property
    def input_dim(self) -> int:
        return int(self.origin.shape[0])

    @functools.cached_property
    def basis(self) -> torch.Tensor:
        """``(3, d)`` float64 rows origin, axis_u, axis_v (built once; the spec is frozen)."""
        return torch.stack([self.origin, self.axis_u, self.axis_v])

    def us(self) -> torch.Tensor:
        return self.u0 + self.du * torch.arange(self.width, dtype=torch.float64)

    def vs(self) -> torch.Tensor:
        return self.v0 + self.dv * torch.arange(self.height, dtype=torch.float64)

    def points(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(height * width, d)`` input points, row-major: row ``r * width + c`` is pixel (r, c)."""
        return grid_inputs_reference(self.origin, self.axis_u, self.axis_v, self.us(), self.vs()).to(dtype)


@dataclass(frozen=True)
class FusableMLP:
    """The layers of an MLP the fused kernels evaluate: ``act_i(W_i x + b_i)`` for each Linear i.

    ``activations[i]`` follows Linear i; the last one is usually ``identity``. ``final`` says
    what the module's outputs are (see :func:`final_output_kind`): a trailing Softmax or
    LogSoftmax is not among the layers but recorded there. Tensors are the module's own
    parameters (no copy), so a FusableMLP always sees the current weights; a Linear layer
    with a batch norm folded in (eval mode: an affine map per feature, see :class:`_Folds`)
    is a buffer of that layer's, refilled from the current weights and statistics at every
    ``from_module``.
    """

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor | None, ...]
    activations: tuple[str, ...]
    negative_slope: float = 0.01
    final: str = "logits"

    @classmethod
    def from_module(cls, model: nn.Module) -> FusableMLP:
        """The MLP inside ``model``; raises NotFusableError saying why when there is none."""
        inner = unwrap(model)
        if is_keras_model(inner):
            return cls._build(*_keras_parts(inner))
        layers = list(_flatten_sequential(model))
        weights, biases, acts = [], [], []
        slopes = set()
        final = None  # a Softmax / LogSoftmax seen: only pass-through layers may follow it
        folds = _Folds()
        for layer in layers:
            if final is not None and not _passes_through(layer):
                raise NotFusableError(f"{type(layer).__name__} follows a {final} over the outputs")
            if isinstance(layer, (nn.Softmax, nn.LogSoftmax)):
                if not weights or layer.dim not in (None, -1, 1):
                    raise NotFusableError(f"{type(layer).__name__} is not over the last layer's outputs")
                final = "softmax" if isinstance(layer, nn.Softmax) else "log_softmax"
                continue
            if isinstance(layer, nn.Linear):
                weights.append(layer.weight)
                biases.append(layer.bias)
                acts.append("identity")
                folds.linear(layer, weights, biases)
                continue
            if isinstance(layer, nn.BatchNorm1d):
                folds.norm(layer, weights, biases, after_activation=not weights or acts[-1] != "identity")
                continue
            if _passes_through(layer):
                continue
            name = _activation_name(layer)
            if name is None:
                raise NotFusableError(f"{type(layer).__name__} is not a Linear layer or a fusable activation")
            if not weights:
                raise NotFusableError("an activation comes before the first Linear layer")
            if acts[-1] != "identity":
                raise NotFusableError("two activations follow one Linear layer")
            acts[-1] = name
            if name == "leaky_relu":
                slopes.add(float(layer.negative_slope))
        if any(m._forward_pre_hooks or m._forward_hooks for m in inner.modules()):  # asked every frame
            hooked = next(n for n, m in inner.named_modules() if m._forward_pre_hooks or m._forward_hooks)
            # e.g. torch's weight_norm, which computes the weight in its hook
            raise NotFusableError(
                f"{hooked or type(inner).__name__} has forward hooks, which only its forward runs"
            )
        folds.finish(weights, biases)
        return cls._build(weights, biases, acts, slopes, final)

    @classmethod
    def _build(cls, weights, biases, acts, slopes: set[float], final: str | None) -> FusableMLP:
        if not weights:
            raise NotFusableError("no Linear layer")
        if len(slopes) > 1:
            raise NotFusableError(f"LeakyReLU layers with different slopes {sorted(slopes)}")
        if final is None:
            final = "sigmoid" if acts[-1] == "sigmoid" else "logits"
        mlp = cls(tuple(weights), tuple(biases), tuple(acts), slopes.pop() if slopes else 0.01, final)
        mlp._check()
        return mlp

    def _check(self) -> None:
        if len(self.weights) > MAX_LINEAR_LAYERS:
            raise NotFusableError(
                f"{len(self.weights)} Linear layers; the fused kernels take {MAX_LINEAR_LAYERS}"
            )
        first = self.weights[0]
        for i, w in enumerate(self.weights):
            if w.dtype not in FUSED_DTYPES:
                raise NotFusableError(f"Linear {i} has dtype {w.dtype}; fused dtypes are {FUSED_DTYPES}")
            if w.dtype != first.dtype or w.device != first.device:
                raise NotFusableError("the Linear layers differ in dtype or device")
            if i and w.shape[1] != self.weights[i - 1].shape[0]:
                raise NotFusableError(
                    f"Linear {i} takes {w.shape[1]} inputs after a layer of {self.weights[i - 1].shape[0]}"
                )
        for w in self.weights[:-1]:
            if w.shape[0] > MAX_WIDTH:
                raise NotFusableError(
                    f"a hidden layer of width {w.shape[0]}; the fused kernels take {MAX_WIDTH}"
                )
        if self.weights[-1].shape[0] > MAX_WIDTH:
            raise NotFusableError(f"{self.weights[-1].shape[0]} outputs; the fused kernels take {MAX_WIDTH}")

    @property
    def in_features(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weights[-1].shape[0])

    @property
    def widths(self) -> tuple[int, ...]:
        """Output width of every Linear layer, the last being the number of outputs."""
        return tuple(int(w.shape[0]) for w in self.weights)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def activation_codes(self) -> list[int]:
        return [ACTIVATIONS[a] for a in self.activations]

    def plane_layer(self, grid: GridSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(3, width_1)`` rows c0, cu, cv: the first layer folded into the grid's plane, worked
        out in float64 and returned as float32, or written into ``out`` (four ops in all)."""
        w = self.weights[0].detach().to(torch.float64)
        plane = torch.mm(device_copy(grid.basis, w.device), w.T)
        if self.biases[0] is not None:
            plane[0].add_(self.biases[0].detach())  # in place: no write-back copy
        return plane.to(torch.float32) if out is None else out.copy_(plane)


class _Folds:
    """Batch norms folded into the Linear layers next to them, for ``FusableMLP.from_module``.

    In eval mode a BatchNorm1d is ``x * scale + shift`` per feature, with ``scale = gamma /
    sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``. Right after a
    Linear layer (before its activation) it folds into that layer's rows: ``W' = scale * W``,
    ``b' = scale * b + shift``. Anywhere else (on the inputs, after an activation) it waits
    for the next Linear layer and folds into its columns: ``W' = W * scale``, ``b' = b + W
    shift``. Folds are worked out in float32 (in the layer's dtype when that is wider) and
    written into buffers kept per Linear layer, so the tensors a kernel reads keep their
    identity from frame to frame (the Triton path's packed weights and CUDA graphs rely on
    that)."""

    def __init__(self):
        self.pending: tuple[torch.Tensor, torch.Tensor, nn.Module] | None = None  # waits for a Linear
        self.folded: dict[int, nn.Linear] = {}  # index of each Linear changed by a fold
        self._linear: nn.Linear | None = None  # the last Linear layer seen

    @staticmethod
    def _affine(norm: nn.BatchNorm1d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if norm.training:
            raise NotFusableError(f"{type(norm).__name__} in train mode normalises by its batch")
        if norm.running_mean is None or norm.running_var is None:
            raise NotFusableError(f"{type(norm).__name__} without running statistics normalises by its batch")
        mean, var = norm.running_mean.detach().to(dtype), norm.running_var.detach().to(dtype)
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach().to(dtype)
        shift = -mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias.detach().to(dtype)
        return scale, shift

    @staticmethod
    def _dtype(weight: torch.Tensor) -> torch.dtype:
        return torch.promote_types(weight.dtype, torch.float32)

    def norm(self, norm: nn.BatchNorm1d, weights: list, biases: list, after_activation: bool) -> None:
        """Fold ``norm`` into the last Linear layer, or keep it for the next one."""
        dtype = self._dtype(weights[-1]) if weights else torch.float32
        scale, shift = self._affine(norm, dtype)
        if not after_activation and self.pending is None:
            w, b = weights[-1], biases[-1]
            if w.shape[0] != scale.shape[0]:
                raise NotFusableError(
                    f"{type(norm).__name__} of {scale.shape[0]} features after {w.shape[0]}"
                )
            weights[-1] = w.detach().to(dtype) * scale[:, None]
            biases[-1] = shift if b is None else b.detach().to(dtype) * scale + shift
            self.folded[len(weights) - 1] = self._linear
            return
        if self.pending is not None:  # two in a row: one affine map
            before, after, _ = self.pending
            scale, shift = before * scale, after * scale + shift
        self.pending = (scale, shift, norm)

    def linear(self, layer: nn.Linear, weights: list, biases: list) -> None:
        """A Linear layer was appended: fold a waiting norm into its columns."""
        self._linear = layer
        if self.pending is None:
            return
        scale, shift, norm = self.pending
        self.pending = None
        if layer.in_features != scale.shape[0]:
            raise NotFusableError(
                f"{type(norm).__name__} of {scale.shape[0]} features before a Linear layer of "
                f"{layer.in_features} inputs"
            )
        dtype = self._dtype(layer.weight)
        w = layer.weight.detach().to(dtype)
        weights[-1] = w * scale.to(dtype)[None, :]
        folded_shift = w @ shift.to(dtype)
        biases[-1] = folded_shift if layer.bias is None else layer.bias.detach().to(dtype) + folded_shift
        self.folded[len(weights) - 1] = layer

    def finish(self, weights: list, biases: list) -> None:
        """Write every folded layer into its buffers (in the layer's dtype)."""
        if self.pending is not None:
            raise NotFusableError(
                f"{type(self.pending[2]).__name__} follows the last Linear layer's activation"
            )
        for i, layer in self.folded.items():
            weights[i], biases[i] = _fold_buffers(layer, weights[i], biases[i])


_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Linear -> its folded (weight, bias)
_FOLDED_LOCK = threading.Lock()


def _fold_buffers(
    layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s folded weight and bias, written into buffers of its own (one pair per layer,
    kept while it lives)."""
    dtype, device = layer.weight.dtype, layer.weight.device
    with _FOLDED_LOCK:
        pair = _FOLDED.get(layer)
        held = None if pair is None else (pair[0].shape, pair[0].dtype, pair[0].device)
        if held != (weight.shape, dtype, device):
            pair = _FOLDED[layer] = (
                torch.empty(weight.shape, dtype=dtype, device=device),
                torch.empty(bias.shape, dtype=dtype, device=device),
            )
    with torch.no_grad():
        pair[0].copy_(weight)
        pair[1].copy_(bias)
    return pair


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside the wrappers that only change how it runs: ``torch.compile``'s
    OptimizedModule, DataParallel, DistributedDataParallel (same parameters, same function)."""
    while (inner := _inside(module)) is not module:
        module = inner
    return module


def wrapper_names(module: nn.Module) -> list[str]:
    """The class names of the wrappers ``unwrap`` takes off ``module``, outermost first."""
    names = []
    while (inner := _inside(module)) is not module:
        names.append(type(module).__name__)
        module = inner
    return names


def _inside(module: nn.Module) -> nn.Module:
    """The module one wrapper holds, or ``module`` itself if it is no wrapper."""
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return module.module
    inner = getattr(module, "_orig_mod", None)  # torch.compile
    return inner if isinstance(inner, nn.Module) else module


def _flatten_sequential(module: nn.Module):
    module = unwrap(module)
    if type(module).forward is not nn.Sequential.forward:
        if isinstance(module, nn.Linear):
            yield module
        else:
            yield from traced_layers(module)
        return
    for child in module:
        if isinstance(child, nn.Sequential):
            yield from _flatten_sequential(child)
        else:
            yield child


_RECIPES: dict[tuple, tuple | str] = {}  # a module structure -> its recipe, or why there is none
_ODD_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> why no MLP, or ""
_RESOLVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (structure, its layers)
_TRACED_LOCK = threading.Lock()
_PASS = "pass"  # an op that leaves its input as it is (Dropout off, Flatten of a 2-D batch)


def traced_layers(module: nn.Module) -> tuple[nn.Module, ...]:
    """The layers a module with a forward of its own applies, when that forward is a chain of
    them: ``x = F.relu(self.fc1(x)); ...; return self.out(x)``, a LightningModule whose forward
    calls its ``nn.Sequential``, tensor methods such as ``.relu()``, a last ``.softmax(-1)``.
    Functional activations come back as their modules. Raises NotFusableError saying why not.

    The chain is read by running the forward once on a batch of two zero inputs under a
    ``TorchFunctionMode`` that records every torch function it calls (a mode is the calling
    thread's own: training on another thread is untouched), and only for a module that holds
    nothing but Linear layers, batch norms, activations, Dropout, Identity, Flatten, Softmax
    and LogSoftmax. Every recorded call must take the previous one's output and nothing else that
    is computed, and the forward must return the last one's. What is read is kept per module
    structure and mode (a snapshot's shadow copy in the same mode is not run again)."""
    with _TRACED_LOCK:
        odd = _ODD_LAYERS.get(module)
    if odd is None:  # once per instance: a large model's fallback does not walk it every frame
        odd = _odd_layers(module)
        with _TRACED_LOCK:
            _ODD_LAYERS[module] = odd
    if odd:
        raise NotFusableError(odd)
    for m in module.modules():  # their forward in train mode changes them or draws random numbers
        if (isinstance(m, nn.BatchNorm1d) and m.training) or (
            isinstance(m, nn.Dropout) and not _passes_through(m)
        ):
            raise NotFusableError(f"{type(m).__name__} in train mode: not run to read the chain")
    key = _structure(module)
    with _TRACED_LOCK:
        resolved = _RESOLVED.get(module)
        if resolved is not None and resolved[0] == key:  # every frame after the first
            return resolved[1]
        recipe = _RECIPES.get(key)
    if recipe is None:
        try:
            recipe = _trace_chain(module)
        except NotFusableError as err:
            recipe = str(err)
        with _TRACED_LOCK:
            _RECIPES[key] = recipe
    if isinstance(recipe, str):
        raise NotFusableError(recipe)
    layers = tuple(module.get_submodule(step) if isinstance(step, str) else step() for step in recipe)
    with _TRACED_LOCK:
        _RESOLVED[module] = (key, layers)
    return layers


def _structure(module: nn.Module) -> tuple:
    """What a recipe depends on: the modules' classes, names and modes (a Dropout, or a
    functional dropout on ``self.training``, passes through only in eval mode) and the Linear
    layers' shapes."""
    parts = (
        (name, type(m), m.training, tuple(m.weight.shape) if isinstance(m, nn.Linear) else None)
        for name, m in module.named_modules()
    )
    return (type(module), *parts)


_CHAIN_PARTS = (nn.Linear, nn.BatchNorm1d, nn.Dropout, nn.Identity, nn.Flatten, nn.Softmax, nn.LogSoftmax)


class _Calls(torch.overrides.TorchFunctionMode):
    """Every torch function called in this thread while active: (function, args, kwargs, output)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def _odd_layers(module: nn.Module) -> str:
    """Why ``module`` holds no MLP (layers of other kinds, no Linear layer), or ""."""
    leaves = [m for m in module.modules() if next(m.children(), None) is None and m is not module]
    odd = sorted({type(m).__name__ for m in leaves if not _chain_part(m)})
    if odd or not any(isinstance(m, nn.Linear) for m in leaves):
        held = ", ".join(odd) or "no Linear layer"
        return f"{type(module).__name__} has its own forward and holds {held}; only MLPs fuse"
    return ""


def _trace_chain(module: nn.Module) -> tuple:
    own = f"{type(module).__name__} has its own forward"
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    names = {m: name for name, m in module.named_modules()}
    weight = linears[0].weight
    why = f"{own}, which fails on inputs of its Linear layers' widths"
    for width in dict.fromkeys(m.in_features for m in linears):  # the first layer's width first
        x = torch.zeros(2, width, dtype=weight.dtype, device=weight.device)
        recorder = _Calls()
        try:
            with torch.no_grad(), recorder:
                out = module(x)
        except Exception:
            continue
        return _chain_recipe(own, recorder.calls, x, out, names)
    raise NotFusableError(why)


def _chain_recipe(own: str, calls: list[tuple], x, out, names: dict) -> tuple:
    """The recipe of a chain of ``calls`` from ``x`` to ``out``: submodule names and layer
    constructors, in order."""
    current, recipe = x, []
    for func, args, kwargs, result in calls:
        if not isinstance(result, torch.Tensor) and args and args[0] is current:
            continue  # a look at the tensor (x.dim(), x.shape): no step of the chain
        called = getattr(func, "__name__", str(func))
        if not args or args[0] is not current:
            raise NotFusableError(f"{own}, which is not a chain of Linear layers and activations ({called})")
        step = _chain_step(func, args, kwargs, result, names)
        if step is None:
            raise NotFusableError(f"{own}, which is not a chain of Linear layers and activations ({called})")
        if step is not _PASS:
            recipe.append(step)
        current = result
    if out is not current:
        raise NotFusableError(f"{own}, which does not return its last layer's output")
    return tuple(recipe)


_ACTIVATION_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", torch.Tensor.relu: "relu", F.tanh: "tanh", torch.tanh: "tanh",
    torch.Tensor.tanh: "tanh", F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid", F.silu: "silu", F.gelu: "gelu", F.leaky_relu: "leaky_relu",
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
    F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax", torch.Tensor.log_softmax: "log_softmax",
}  # fmt: skip


_BATCH_NORM_ARGS = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _chain_step(func, args, kwargs, result, names: dict):
    """A submodule's name (a Linear), a layer constructor (an activation), ``_PASS``, or None."""
    extra = list(args[1:])
    kwargs = dict(kwargs)
    if func is F.linear:
        weight = extra[0] if extra else kwargs.get("weight")
        bias = extra[1] if len(extra) > 1 else kwargs.get("bias")
        owner = next((m for m in names if isinstance(m, nn.Linear) and m.weight is weight), None)
        return names[owner] if owner is not None and owner.bias is bias else None
    if func is F.batch_norm:  # an eval-mode BatchNorm1d's own call: its statistics, no batch's
        given = {**dict(zip(_BATCH_NORM_ARGS, extra, strict=False)), **kwargs}
        mean = given.get("running_mean")
        owner = next((m for m in names if isinstance(m, nn.BatchNorm1d) and m.running_mean is mean), None)
        own = owner is not None and mean is not None and not given.get("training", False)
        own = own and all(given.get(k) is getattr(owner, k) for k in ("running_var", "weight", "bias"))
        return names[owner] if own and given.get("eps", 1e-5) == owner.eps else None
    if func is F.dropout:
        training = extra[1] if len(extra) > 1 else kwargs.get("training", True)
        p = extra[0] if extra else kwargs.get("p", 0.5)
        return _PASS if not training or p == 0 else None
    if func in (torch.flatten, torch.Tensor.flatten):
        return _PASS if result.shape == args[0].shape else None
    kind = _ACTIVATION_FUNCTIONS.get(func)
    if kind is None:
        return None
    kwargs.pop("inplace", None)
    kwargs.pop("_stacklevel", None)
    if kind in ("softmax", "log_softmax"):
        dim = kwargs.pop("dim", extra.pop(0) if extra else None)
        if kwargs.pop("dtype", None) is not None or dim not in (-1, 1) or extra or kwargs:
            return None
        return functools.partial(nn.Softmax if kind == "softmax" else nn.LogSoftmax, dim)
    if kind == "leaky_relu":
        slope = float(kwargs.pop("negative_slope", extra.pop(0) if extra else 0.01))
        extra = [a for a in extra if a is not False]  # F.leaky_relu(x, slope, inplace) positionally
        return None if extra or kwargs else functools.partial(nn.LeakyReLU, slope)
    if kind == "gelu":
        approximate = kwargs.pop("approximate", "none")
        return None if extra or kwargs else functools.partial(nn.GELU, approximate=approximate)
    extra = [a for a in extra if a is not False]  # F.relu(x, False): inplace positionally
    if extra or kwargs:
        return None
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}[kind]


def _chain_part(layer: nn.Module) -> bool:
    return isinstance(layer, _CHAIN_PARTS) or _activation_name(layer) is not None


def _passes_through(layer: nn.Module) -> bool:
    """A layer that leaves its input as it is when evaluating (Identity, Flatten, Dropout off)."""
    return isinstance(layer, (nn.Identity, nn.Flatten)) or (
        isinstance(layer, nn.Dropout) and (not layer.training or layer.p == 0)
    )


FINALS = ("logits", "sigmoid", "softmax", "log_softmax")


def final_output_kind(model: nn.Module) -> str:
    """What ``model``'s outputs are, read from its last layer: ``softmax`` / ``log_softmax`` (an
    nn.Softmax / nn.LogSoftmax over the outputs), ``sigmoid`` (an nn.Sigmoid), else ``logits``
    (also for a module whose forward is its own, unless it is a chain of layers:
    :func:`traced_layers`).

    ``output="auto"`` turns logits into probabilities and takes probabilities as they are,
    so a model trained with BCELoss behind a Sigmoid is not squashed twice."""
    last = unwrap(model)
    if is_keras_model(last):
        return _keras_final_kind(last)
    if type(last).forward is not nn.Sequential.forward and next(last.children(), None) is not None:
        try:
            chain = [layer for layer in traced_layers(last) if not _passes_through(layer)]
        except NotFusableError:
            chain = []
        last = chain[-1] if chain else last
    while type(last).forward is nn.Sequential.forward:
        children = [c for c in last if not _passes_through(c)]
        if not children:
            return "logits"
        last = unwrap(children[-1])
    if isinstance(last, nn.Softmax) and last.dim in (None, -1, 1):
        return "softmax"
    if isinstance(last, nn.LogSoftmax) and last.dim in (None, -1, 1):
        return "log_softmax"
    return "sigmoid" if isinstance(last, nn.Sigmoid) else "logits"


def is_keras_model(model: object) -> bool:
    """Whether ``model`` is a Keras 3 model or layer (a torch module on Keras's torch backend);
    read from its classes, without importing Keras."""
    return any(c.__module__.split(".")[0] == "keras" for c in type(model).__mro__)


_KERAS_ACTIVATIONS = ("relu", "tanh", "sigmoid", "silu", "gelu")  # Keras's names are the fused codes
_KERAS_PASS_THROUGH = ("InputLayer", "Dropout", "Flatten", "Identity")


def _keras_activation(layer) -> str | None:
    """The name of the Keras activation function ``layer`` applies (``linear``, ``relu``,
    ``softmax``, ...), or None when it has none or a function of its own."""
    function = getattr(layer, "activation", None)
    if not getattr(function, "__module__", "").startswith("keras"):
        return None
    return getattr(function, "__name__", None)


def _is_keras_softmax(layer) -> bool:
    """A Keras Softmax layer over the last axis."""
    return type(layer).__name__ == "Softmax" and getattr(layer, "axis", -1) in (-1, 1)


def _keras_parts(model):
    """The Linear layers and activations of a Keras Sequential of Dense layers, as
    ``FusableMLP._build`` takes them. Kernels are ``(in, out)`` in Keras: their transposes
    (views, so the MLP still sees the current weights) are the Linear weights."""
    if type(model).__name__ != "Sequential":
        raise NotFusableError(
            f"a Keras {type(model).__name__}; only a keras.Sequential of Dense layers fuses"
        )
    weights, biases, acts, slopes, final = [], [], [], set(), None

    def activate(name: str, slope: float | None = None) -> None:
        if not weights:
            raise NotFusableError("an activation comes before the first Dense layer")
        if acts[-1] != "identity":
            raise NotFusableError("two activations follow one Dense layer")
        acts[-1] = name
        if slope is not None:
            slopes.add(slope)

    for layer in model.layers:
        kind = type(layer).__name__
        if final is not None and kind not in _KERAS_PASS_THROUGH:
            raise NotFusableError(f"{kind} follows a {final} over the outputs")
        if kind in _KERAS_PASS_THROUGH:
            continue
        if kind == "Dense":
            weights.append(layer.kernel.value.t())
            biases.append(layer.bias.value if layer.bias is not None else None)
            acts.append("identity")
        elif kind == "Softmax":
            if not weights or not _is_keras_softmax(layer):
                raise NotFusableError("a Softmax that is not over the last layer's outputs")
            final = "softmax"
            continue
        elif kind == "LeakyReLU":
            activate("leaky_relu", float(layer.negative_slope))
            continue
        elif kind == "ReLU":
            if layer.max_value is not None or layer.threshold != 0 or layer.negative_slope != 0:
                raise NotFusableError("a ReLU layer with a max_value, threshold or negative_slope")
            activate("relu")
            continue
        elif kind != "Activation":
            raise NotFusableError(f"a Keras {kind} layer is not a Dense layer or a fusable activation")
        name = _keras_activation(layer)
        if name is None:
            raise NotFusableError(f"the activation {layer.activation!r} is not a Keras one")
        if name == "linear":
            continue
        if name in ("softmax", "log_softmax"):
            final = name
        elif name == "leaky_relu":
            activate("leaky_relu", 0.2)  # keras.activations.leaky_relu's slope
        elif name in _KERAS_ACTIVATIONS:
            activate(name)
        else:
            raise NotFusableError(f"the Keras activation {name!r} has no fused form")
    return weights, biases, acts, slopes, final


def _keras_final_kind(model) -> str:
    """``final_output_kind`` of a Keras model: its last layer's activation, or a last Softmax /
    Activation layer."""
    last = (getattr(model, "layers", None) or [model])[-1]
    if _is_keras_softmax(last):
        return "softmax"
    name = _keras_activation(last)
    return name if name in ("softmax", "log_softmax", "sigmoid") else "logits"


def _activation_name(layer: nn.Module) -> str | None:
    if type(layer) is nn.ReLU:
        return "relu"
    if type(layer) is nn.LeakyReLU:
        return "leaky_relu"
    if type(layer) is nn.Tanh:
        return "tanh"
    if type(layer) is nn.Sigmoid:
        return "sigmoid"
    if type(layer) is nn.SiLU:
        return "silu"
    if type(layer) is nn.GELU:
        return "gelu" if layer.approximate == "none" else "gelu_tanh"
    return None


def apply_activation(x: torch.Tensor, name: str, negative_slope: float = 0.01) -> torch.Tensor:
    """The torch definition of every activation code."""
    if name == "identity":
        return x
    if name == "relu":
        return F.relu(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, negative_slope)
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")


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
            y = model(x).float()
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
