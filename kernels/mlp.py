"""Reading a module as an MLP the fused grid kernels evaluate (``FusableMLP``).

A fusable MLP is a chain of Linear layers with element-wise activations between them (ReLU,
LeakyReLU, GELU, tanh, SiLU, sigmoid), eval-mode batch norms folded into the Linear layers,
pass-through layers (Dropout off, Flatten of a batch, Identity) and a last Softmax or
LogSoftmax: an ``nn.Sequential``, a module whose forward is such a chain (read once per
structure by tracing the torch calls of a forward on zeros), or a ``keras.Sequential`` of
Dense layers. The wrappers that only change how a model runs (``torch.compile``,
DataParallel, DistributedDataParallel) are seen through.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from probescope.kernels.backend import device_copy

if TYPE_CHECKING:
    from probescope.kernels.grid import GridSpec

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
MAX_LINEAR_LAYERS = 8
MAX_WIDTH = 1024
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NotFusableError(ValueError):
    """The module is not an MLP the fused kernels can evaluate; the reason says why."""


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


def model_output(out):
    """What a probe reads of a model's output: a tensor as it is; of a mapping (a Hugging Face
    ``ModelOutput``, a dict), its ``logits`` tensor. Anything else is returned for the caller
    to refuse."""
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    return out


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
                out = model_output(module(x))
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
