"""What every probe shares: its run-time context, its counters, input checks, forward helpers."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from probescope.events import Callback
from probescope.graphs import ForwardGraphs
from probescope.history import Series
from probescope.kernels.colormap import check_palette, resolve_palette
from probescope.kernels.grid_mlp import outputs_to_probs as kernel_outputs_to_probs
from probescope.kernels.mlp import is_keras_model, model_output
from probescope.schedule import Schedule
from probescope.spec import Reproducible

log = logging.getLogger("probescope")


@dataclass
class ProbeStats:
    """Counters for one probe: evaluations run, skipped (busy), failed, and their cost."""

    run: int = 0
    skipped: int = 0
    failed: int = 0
    total_ms: float = 0.0
    last_ms: float = 0.0

    @property
    def mean_ms(self) -> float:
        """Mean milliseconds per evaluation (0 before the first)."""
        return self.total_ms / self.run if self.run else 0.0

    def as_dict(self) -> dict:
        return {
            "run": self.run,
            "skipped": self.skipped,
            "failed": self.failed,
            "mean_ms": round(self.mean_ms, 4),
            "total_ms": round(self.total_ms, 3),
        }


class ProbeContext:
    """What a probe evaluation knows besides the model: its step and the history so far.

    ``history`` is read when a probe first asks for it (``read``, a callable, gives it), so a
    probe that never looks at the history does not pay for converting the step's losses."""

    __slots__ = ("_history", "_read", "claim", "epoch", "step")

    def __init__(
        self,
        step: int,
        epoch: int,
        history: dict[str, Series] | None = None,
        *,
        read: Callable[[], dict[str, Series]] | None = None,
        claim: Callable[[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor] | None = None,
    ):
        self.step, self.epoch = step, epoch
        self._history, self._read = history, read
        self.claim = claim  # the Monitor's: the probe's ring (FrameRing.claim), set per probe

    @property
    def history(self) -> dict[str, Series]:
        if self._history is None:
            self._history = self._read() if self._read is not None else {}
        return self._history

    def buffer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """Where the frame's ``key`` can be written: in the Monitor, the ring slot the frame goes
        to (the ring then copies nothing for it: the kernels write the frame straight into the
        ring); elsewhere a new tensor. Return it in the frame as it is, written whole."""
        device = torch.device(device)
        if self.claim is not None:
            return self.claim(key, tuple(shape), dtype, device)
        return torch.empty(shape, dtype=dtype, device=device)


class Probe(Callback, Reproducible):
    """Evaluates a model snapshot into a frame: a dict of arrays.

    Subclasses validate their own arguments in ``__init__`` (before any training), check
    the model in ``attach`` and do the work in ``evaluate``, which runs on the probe worker
    with a consistent snapshot of the weights. A probe remembers the arguments it was built
    with, so that a probe spec (probescope.spec) can write it down and build it again.
    """

    kind: ClassVar[str] = "probe"
    default_schedule: ClassVar[Schedule] = Schedule.every(10)
    #: Whether ``evaluate`` reads ``.grad`` of the parameters (the snapshot then copies them).
    needs_grads: bool = False
    #: Whether ``evaluate`` runs or reads the model (a probe of the run's series alone does not:
    #: its frames take no snapshot, and ``evaluate`` is handed the live model, to leave unread).
    reads_model: bool = True
    #: Whether frames are table rows (``values`` under the static ``columns``, plus scalars):
    #: the finished run then also stores ``table.parquet``.
    tabular: ClassVar[bool] = False
    #: How the viewer and the exporters draw a probe of your own kind: frame entry -> one of
    #: ``image``, ``heatmap``, ``maps``, ``(view, lo, hi)`` for those two, ``histogram``,
    #: ``line``, ``series``, ``hidden`` (the rest by their shape; see probescope.probes.views).
    #: The built-in kinds have panels of their own.
    views: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, *, name: str | None = None, schedule: Schedule | None = None):
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(
                f"{type(self).__name__}: name must use letters, digits, '_', '.' or '-', got {name!r}"
            )
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(
                f"{type(self).__name__}: schedule must be a Schedule (e.g. Schedule.every(10)), "
                f"got {type(schedule).__name__}"
            )
        self.name = name or self.kind
        self.schedule = schedule if schedule is not None else self.default_schedule
        self._warned: set[str] = set()
        self.graphs: ForwardGraphs | None = None  # set by Monitor(cuda_graphs=True)

    def attach(self, model: nn.Module) -> None:
        """Check the probe against the model it will watch; raise ValueError if they do not fit."""

    def warm_up(self, model: nn.Module) -> None:
        """With CUDA graphs on (``graphs`` set), once per shadow before the first step: compile
        and capture what ``evaluate`` will replay, leaving the probe's state as it was. Here:
        the forward of a valid set, if the probe has one."""
        valid = getattr(self, "valid", None)
        if valid:
            valid.evaluate(model)

    def static(self) -> dict[str, np.ndarray]:
        """Arrays that never change between frames (grid axes, data points)."""
        return {}

    def resume(self, frame) -> None:
        """A run is resumed (``Monitor(resume=...)``): ``frame`` is this probe's last frame
        before the step it continues from; take back any state that frames build on (a
        series of its own). Here: nothing."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable parameters, stored in the run's metadata."""
        return {}

    def frame_nbytes(self) -> int | None:
        """About how many bytes one frame holds, once attached; the Monitor sizes rings of large
        frames by it. None: a few kilobytes, not worth counting."""
        return None

    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        """One frame from a snapshot of the model."""
        raise NotImplementedError

    def warn_once(self, cause: str, message: str) -> None:
        """Log a warning the first time ``cause`` happens for this probe."""
        if cause not in self._warned:
            self._warned.add(cause)
            log.warning("%s %r: %s", type(self).__name__, self.name, message)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a model's first parameter (CPU float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def as_float_tensor(name: str, value, *, ndim: tuple[int, ...], owner: str) -> torch.Tensor:
    """``value`` as a float32 CPU tensor of one of the allowed ranks, or a clear ValueError."""
    if value is None:
        raise ValueError(f"{owner}: {name} is required")
    try:
        t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{owner}: {name} must be an array or tensor ({err})") from None
    t = t.detach().to("cpu", torch.float32)
    if t.dim() not in ndim:
        raise ValueError(
            f"{owner}: {name} must have {' or '.join(map(str, ndim))} dimensions, got shape {tuple(t.shape)}"
        )
    if t.shape[0] == 0:
        raise ValueError(f"{owner}: {name} is empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{owner}: {name} contains NaN or infinite values")
    return t


def as_input_tensor(name: str, value, *, owner: str) -> torch.Tensor:
    """Model inputs as a CPU tensor: floating point as float32 (checked finite), integers (token
    ids, indices) kept as they are."""
    if value is None:
        raise ValueError(f"{owner}: {name} is required")
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if t.is_floating_point():
        return as_float_tensor(name, t, ndim=tuple(range(1, 8)), owner=owner)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{owner}: {name} must hold floats or integers, got {t.dtype}")
    if t.dim() == 0 or t.shape[0] == 0:
        raise ValueError(f"{owner}: {name} is empty")
    return t.detach().cpu()


def to_model(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``x`` on the model's device; floating inputs in the model's dtype, integer ones unchanged."""
    if x.is_floating_point():
        return x.to(device, dtype, non_blocking=True)
    return x.to(device, non_blocking=True)


class ValidSet:
    """Held-out data a probe scores the snapshot on: ``valid_loss`` and named metrics.

    ``valid=(x, y)`` needs ``loss_fn(pred, target)``; ``metrics`` are ``{name: fn(pred, target)}``
    and need ``valid``. Arguments are checked here, before any training. ``valid=None`` with
    no metrics gives an empty set (``bool(valid_set)`` is False).
    """

    def __init__(self, owner: str, valid, loss_fn, metrics, batch_size: int):
        self.graphs: ForwardGraphs | None = None  # set by Monitor(cuda_graphs=True)
        self.metrics = dict(metrics or {})
        for key, fn in self.metrics.items():
            if not callable(fn):
                raise TypeError(f"{owner}: metric {key!r} must be callable(pred, target)")
        self.x = self.y = None
        if valid is not None:
            if len(valid) != 2:
                raise ValueError(f"{owner}: valid must be a pair (x, y)")
            self.x = as_input_tensor("valid x", valid[0], owner=owner)
            y = valid[1]
            self.y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).detach().cpu()
            if self.y.shape[0] != self.x.shape[0]:
                raise ValueError(f"{owner}: valid x has {self.x.shape[0]} samples, y has {self.y.shape[0]}")
            if loss_fn is None:
                raise ValueError(f"{owner}: valid data needs a loss_fn(pred, target)")
        elif self.metrics:
            raise ValueError(f"{owner}: metrics are evaluated on valid data; pass valid=(x, y)")
        self.loss_fn, self.batch_size = loss_fn, batch_size

    def __bool__(self) -> bool:
        return self.x is not None

    @property
    def names(self) -> list[str]:
        """``valid_loss`` and the metrics, in the order ``evaluate`` returns them."""
        return ["valid_loss", *self.metrics]

    def evaluate(self, model: nn.Module) -> list[float]:
        """The loss and each metric of ``model`` on the data."""
        pred = batched_forward(model, self.x, self.batch_size, self.graphs)
        if pred.shape[1] == 1 and self.y.dim() == 1 and self.y.is_floating_point():
            pred = pred[:, 0]
        return [float(self.loss_fn(pred, self.y))] + [float(fn(pred, self.y)) for fn in self.metrics.values()]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside; after, every module back in its own mode. (``train(was)``
    would put a part the user keeps in eval, a frozen backbone's batch norms, in train mode.)"""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        model.train(modes[0][1])
        for module, training in modes:
            module.training = training


def check_forward(owner: str, model: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """Run the model once on ``sample``; turn a shape error into a sentence about the input."""
    device, dtype = model_device_dtype(model)
    try:
        with eval_mode(model), torch.no_grad():
            returned = model(to_model(sample, device, dtype))
    except Exception as err:
        raise ValueError(
            f"{owner}: the model rejected inputs of shape {tuple(sample.shape)} "
            f"(input width {sample.shape[-1]}): {type(err).__name__}: {err}"
        ) from err
    out = model_output(returned)
    if not isinstance(out, torch.Tensor):
        problem = f"must return a tensor (or a mapping with its 'logits'), got {type(out).__name__}"
    elif out is not returned and out.dim() > 2:  # e.g. a language model's (batch, position, vocab)
        problem = f"returns logits of shape {tuple(out.shape)}, and a probe reads one row per sample"
    else:
        return out
    raise TypeError(
        f"{owner}: the model {problem}; give the Monitor a module whose forward returns the "
        "tensor to probe and holds the model (its weights are the model's), e.g. "
        "forward(self, x): return self.model(x).logits[:, -1]"
    )


def batched_forward(
    model: nn.Module, inputs: torch.Tensor, batch_size: int, graphs: ForwardGraphs | None = None
) -> torch.Tensor:
    """The model's outputs on ``inputs`` in chunks of ``batch_size``, as float32 on the CPU;
    replayed from CUDA graphs when ``graphs`` is given (fixed inputs only)."""
    device, dtype = model_device_dtype(model)
    outs = []
    with torch.no_grad():
        for i, start in enumerate(range(0, inputs.shape[0], batch_size)):

            def chunk(start=start):
                return to_model(inputs[start : start + batch_size], device, dtype)

            out = model(chunk()) if graphs is None else graphs.forward(model, i, chunk)
            outs.append(model_output(out).float())
    out = torch.cat(outs)
    return out.reshape(out.shape[0], -1).cpu()


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every entry of ``t`` is finite, as a device scalar (nothing waits for the GPU).

    One min-max pass, exact: a NaN propagates to both, an infinity is the min or the max, and
    finite values cannot overflow it as they can a float32 sum. On a CPU it costs far less than
    a float64 sum (``python -m benchmarks.grid_frame`` measures the difference), and it is one
    fixed kernel, so CUDA graphs capture it."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def check_names(owner: str, names) -> tuple[str, ...] | None:
    """``class_names`` (of classes, labels or outputs, in their order) as a tuple of distinct
    strings: a list, a tuple, an array, a fastai vocab; None stays None."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise TypeError(f"{owner}: class_names must be a sequence of names, got {type(names).__name__}")
    names = tuple(str(n) for n in names)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if not names or repeated:
        got = "no names" if not names else f"{repeated} more than once"
        raise ValueError(f"{owner}: class_names must be distinct names, one per class, got {got}")
    return names


def check_name_count(owner: str, names: tuple[str, ...] | None, count: int, what: str) -> None:
    """One name per class (label, output) of the attached model."""
    if names is not None and len(names) != count:
        raise ValueError(f"{owner}: {len(names)} class_names for {count} {what}")


def checked_palette(owner: str, palette):
    """``palette=`` checked as a probe is built (``check_palette``), errors naming ``owner``."""
    try:
        return check_palette(palette)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{owner}: {err}") from None


def attached_palette(owner: str, palette, count: int) -> torch.Tensor:
    """The ``(count, 3)`` palette of an attached probe's classes (``resolve_palette``),
    errors naming ``owner``."""
    try:
        return resolve_palette(palette, count)
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None


def display_name(config: dict[str, Any], index: int, word: str | None = "class") -> str:
    """What a drawing calls class (label, output) ``index`` of a probe with ``config``: its
    name from ``class_names``, else ``"<word> <index>"`` (the index alone for no ``word``:
    a tick, a cell)."""
    names = config.get("class_names")
    if names and 0 <= index < len(names):
        return str(names[index])
    return str(index) if word is None else f"{word} {index}"


#: What a probe's ``output=`` may say its model's outputs are turned into.
OUTPUTS = ("auto", "softmax", "sigmoid", "probs")


def check_output(owner: str, output: str, width: int | None = None) -> None:
    """``output`` is one of ``OUTPUTS``; ``sigmoid`` (a binary model's one logit) needs a model
    of one output (``width``, when known): of several it would read the first alone."""
    if output not in OUTPUTS:
        raise ValueError(f"{owner}: output must be one of {OUTPUTS}, got {output!r}")
    if output == "sigmoid" and width not in (None, 1):
        raise ValueError(
            f"{owner}: output='sigmoid' takes a model of one output (a binary model's logit), the "
            f"model gives {width}; 'softmax' for classes, or for independent labels one map per "
            "label through a module that picks its output"
        )


def outputs_to_probs(logits: torch.Tensor, output: str, final: str = "logits") -> torch.Tensor:
    """``(N, K)`` model outputs -> ``(N, C)`` class probabilities (``probs``: already probabilities;
    ``final``: what the model's last layer makes them, see ``final_output_kind``)."""
    return kernel_outputs_to_probs(logits, "raw" if output == "probs" else output, final)


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that hook patterns and layer names refer to: ``model.named_modules()``, or
    for a Keras model its layers by name (a nested model's as ``outer.inner``), the model
    itself as ``""``. Keras layers are torch modules whose forward hooks fire as usual."""
    if not is_keras_model(model):
        return dict(model.named_modules())
    table: dict[str, nn.Module] = {"": model}

    def visit(prefix: str, layer) -> None:
        for child in getattr(layer, "layers", None) or []:
            if type(child).__name__ != "InputLayer":
                table[prefix + child.name] = child
                visit(f"{prefix}{child.name}.", child)

    visit("", model)
    return table


def own_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The parameters ``module`` holds itself, not through a sub-module (or Keras sub-layer)."""
    if not is_keras_model(module):
        return [p for _, p in module.named_parameters(recurse=False)]
    inner = {id(v.value) for child in getattr(module, "layers", None) or [] for v in child.variables}
    return [v.value for v in module.variables if id(v.value) not in inner]


def is_leaf(module: nn.Module) -> bool:
    """Whether ``module`` has no sub-modules (for a Keras layer: no sub-layers)."""
    if is_keras_model(module):
        return not getattr(module, "layers", None)
    return not any(True for _ in module.children())


class ForwardHooks:
    """Forward hooks on the named modules calling ``fn(name, output)`` with each one's floating-point
    output (the first tensor of a tuple), detached; removed on exit."""

    def __init__(self, model: nn.Module, names: list[str], fn: Callable[[str, torch.Tensor], None]):
        modules = named_layers(model)
        self.handles = []
        for name in names:
            self.handles.append(modules[name].register_forward_hook(self._hook(name, fn)))

    @staticmethod
    def _hook(name, fn):
        def hook(module, inputs, output):
            tensor = output
            if isinstance(output, (tuple, list)):
                tensor = next((o for o in output if isinstance(o, torch.Tensor)), None)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                fn(name, tensor.detach())

        return hook

    def __enter__(self) -> ForwardHooks:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
