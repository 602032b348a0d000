"""StatsProbe: statistics of weights, gradients and activations at hook points, over training.

The raw material of the latent-state analysis (probescope.analysis, after Hu et al., "Latent
State Models of Training Dynamics"): per hook point and per frame, the kernels' one-pass
``tensor_stats`` (mean, variance, L1 and L2 norms, max |x|, near-zero and non-finite
fractions) and the spectral norm of each weight matrix, plus the run's losses and metrics.
Everything is computed on the model's device and copied to the host once per frame.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from probescope.history import display_name
from probescope.kernels.stats import STAT_NAMES, spectral_norm, tensor_stats
from probescope.probes.base import (
    ForwardHooks,
    Probe,
    ProbeContext,
    ValidSet,
    as_input_tensor,
    check_forward,
    is_leaf,
    model_device_dtype,
    named_layers,
    own_parameters,
    to_model,
)
from probescope.schedule import Schedule

log = logging.getLogger("probescope")

TARGETS = ("weights", "grads", "activations")
_PREFIX = {"weights": "weight", "grads": "grad", "activations": "act"}


class StatsProbe(Probe):
    """Per-tensor statistics at hook points, one row of a steps x metrics table per frame.

    ``hooks``: module names or glob patterns over ``model.named_modules()`` (a Keras model's
    layer names; ``"*"``: every module). Each matched module contributes its own parameters
    (weights, and with ``"grads"`` in ``targets`` their gradients as of the step boundary)
    and, when ``batch`` is given, its output on that fixed batch (``"activations"``; forward
    hooks on the snapshot). ``spectral``: also the largest singular value of every parameter with two or
    more dimensions, by warm-started power iteration. ``valid=(x, y)`` with ``loss_fn`` and
    ``metrics`` adds ``valid_loss`` and each metric evaluated on the snapshot; every scalar the
    training loop logs (``Monitor.step(loss=...)``, ``Monitor.log(...)``) is added as its mean
    since the previous frame.

    ``states``: a state model fitted on earlier runs (``latent_states(...).state_model()``,
    or the ``states.json`` that ``write_report`` writes, or its directory): every frame then
    also holds ``state`` (the most likely latent state now) and ``state_probs`` (P(state |
    the frames so far), filtered online), and each change of state is logged and kept in
    ``transitions`` as (step, from, to), with the metrics that drove it in
    ``transition_drivers`` (the gradient of the log odds of the new state over the old at
    that frame, as ``latent_states`` ranks them offline). Its metrics must be among this
    probe's columns (or ``loss/<series>`` that the loop logs).

    Columns are ``<target>/<tensor>/<stat>``, e.g. ``weight/fc1.weight/l2``,
    ``grad/fc1.weight/max_abs``, ``act/fc1/near_zero``, and ``loss/<series>``. Read the table
    with ``open_run(path).probe("stats").table()`` (a pandas DataFrame); a finished run also
    holds it as ``probes/<name>/table.parquet``.
    """

    kind = "stats"
    default_schedule = Schedule.every(10)
    tabular = True

    def __init__(
        self,
        hooks: str | Iterable[str] = "*",
        *,
        targets: Iterable[str] | None = None,
        batch=None,
        spectral: bool = True,
        spectral_iterations: int = 3,
        near_zero: float = 1e-3,
        valid: tuple | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metrics: Mapping[str, Callable[[torch.Tensor, torch.Tensor], Any]] | None = None,
        batch_size: int = 8192,
        states=None,
        name: str | None = None,
        schedule: Schedule | None = None,
    ):
        super().__init__(name=name, schedule=schedule)
        owner = f"StatsProbe {self.name!r}"
        self.states = _state_model(owner, states)
        self.transitions: list[tuple[int, int, int]] = []
        self.transition_drivers: list[list[tuple[str, float]]] = []  # per transition: (metric, d log-odds)
        self._tracker = None
        self.patterns = [hooks] if isinstance(hooks, str) else list(hooks)
        if not self.patterns or not all(isinstance(p, str) and p for p in self.patterns):
            raise ValueError(f"{owner}: hooks must be module names or glob patterns, got {hooks!r}")
        if targets is None:
            targets = ("weights", "activations") if batch is not None else ("weights",)
        self.targets = tuple(targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"{owner}: targets must be among {TARGETS}, got {list(self.targets)}")
        if "activations" in self.targets and batch is None:
            raise ValueError(f"{owner}: activation statistics need a fixed input batch (batch=...)")
        self.batch = None
        if batch is not None:
            self.batch = as_input_tensor("batch", batch, owner=owner)
        if isinstance(spectral_iterations, bool) or not isinstance(spectral_iterations, int):
            raise TypeError(f"{owner}: spectral_iterations must be an int")
        if spectral_iterations < 1:
            raise ValueError(f"{owner}: spectral_iterations must be >= 1, got {spectral_iterations}")
        if not near_zero >= 0:
            raise ValueError(f"{owner}: near_zero must be >= 0, got {near_zero!r}")
        self.spectral, self.spectral_iterations, self.near_zero = spectral, spectral_iterations, near_zero
        self.needs_grads = "grads" in self.targets
        self.valid = ValidSet(owner, valid, loss_fn, metrics, batch_size)
        self.parameters: list[str] = []  # qualified parameter names
        self.computed: list[str] = []  # weights parametrized layers compute, e.g. "fc.weight"
        self.modules: list[str] = []  # modules whose outputs are measured
        self.columns: list[str] = []
        self._matrices: set[str] = set()
        self._vectors: dict[str, torch.Tensor] = {}  # power-iteration warm starts
        self._last_step = -1

    # ---- set-up -------------------------------------------------------------------------
    def _matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def attach(self, model: nn.Module) -> None:
        owner = f"StatsProbe {self.name!r}"
        modules = named_layers(model)
        unused = [p for p in self.patterns if not any(fnmatch.fnmatchcase(n, p) for n in modules)]
        if unused:
            names = ", ".join(repr(n) for n in modules if n) or "(none)"
            raise ValueError(f"{owner}: hook patterns {unused} match no module; the modules are {names}")
        # A parametrized layer (weight_norm, orthogonal, spectral_norm's parametrizations) is one
        # layer: the modules that compute its weights are not layers whose output is measured.
        inner = _parametrization_modules(modules)
        matched = [
            n for n in modules if n not in inner and (self._matches(n) or (n == "" and "" in self.patterns))
        ]
        # Each floating-point parameter once (a tied one under its first name), as the model names it;
        # a parametrized layer's are the originals its parametrizations hold.
        owned = {id(p) for m in matched for p in [*own_parameters(modules[m]), *_originals(modules[m])]}
        self.parameters = [q for q, p in model.named_parameters() if id(p) in owned and p.is_floating_point()]
        # ... and the weights they compute (``layer.weight``), which the layer multiplies by.
        self.computed = [
            f"{m}.{t}" if m else t
            for m in matched
            if parametrize.is_parametrized(modules[m])
            for t in modules[m].parametrizations
        ]
        if "activations" in self.targets:
            self.modules = self._measured_modules(model, modules, inner, [m for m in matched if m])
        if not self.parameters and not self.computed and "activations" not in self.targets:
            raise ValueError(f"{owner}: the hook patterns {self.patterns} match no module with parameters")
        if self.valid:
            check_forward(owner, model, self.valid.x[:2])
        named = dict(model.named_parameters())
        with torch.no_grad():
            shapes = {q: named[q].shape for q in self.parameters} | {
                q: _computed(model, q).shape for q in self.computed
            }
        self._matrices = {q for q, shape in shapes.items() if len(shape) >= 2}
        self.columns = self._column_names()
        if self.states is not None:
            self._check_states(owner)
        # Compile the kernels now, before training, not in the first frame.
        probe = torch.zeros(3, 3, device=next((p.device for p in named.values()), torch.device("cpu")))
        tensor_stats(probe, self.near_zero)
        if self._matrices and self.spectral:
            spectral_norm(probe, 1)

    def _measured_modules(
        self, model: nn.Module, modules: dict[str, nn.Module], inner: set[str], candidates: list[str]
    ) -> list[str]:
        """The modules whose outputs are measured, found by a forward of the batch: each one named
        exactly (it must give a floating-point tensor); under a glob, the layers (leaf modules)
        that give one, and the containers none of whose sub-modules runs (their own forward
        computes their output: ``nn.MultiheadAttention``, which holds an ``out_proj`` it never
        calls), not a container whose output often repeats its last child's. A module a glob
        matches that gives no tensor (never called) is left out."""
        owner = f"StatsProbe {self.name!r}"
        gave: set[str] = set()  # floating-point outputs
        ran: set[str] = set()  # called at all
        hookable = [n for n in modules if n and n not in inner]
        handles = [modules[n].register_forward_hook(lambda *_, n=n: ran.add(n)) for n in hookable]
        try:
            with ForwardHooks(model, candidates, lambda n, t: gave.add(n)):
                check_forward(owner, model, self.batch[:2])
        finally:
            for handle in handles:
                handle.remove()

        # The containers of a module that ran: their outputs are made by their sub-modules.
        parents = {n.rsplit(".", k)[0] for n in ran for k in range(1, n.count(".") + 1)}
        chosen = [m for m in candidates if m in self.patterns or _is_layer(modules[m]) or m not in parents]
        named = [m for m in chosen if m in self.patterns and m not in gave]
        if named:
            raise ValueError(
                f"{owner}: modules {named} produced no floating-point tensor on the batch "
                "(not called in forward, or their output is not a tensor)"
            )
        silent = [m for m in chosen if m not in gave]
        if silent:
            log.info("StatsProbe %r: no activations from %s (not called in forward)", self.name, silent)
        chosen = [m for m in chosen if m in gave]
        if not chosen:
            raise ValueError(
                f"{owner}: the hook patterns match no module whose output can be measured on the batch "
                "(a glob takes the layers it matches that run; name a container exactly to measure its "
                "output)"
            )
        return chosen

    def _column_names(self) -> list[str]:
        columns = []
        for target in ("weights", "grads"):
            if target in self.targets:
                for p in [*self.parameters, *(self.computed if target == "weights" else [])]:
                    columns += [f"{_PREFIX[target]}/{_label(p)}/{s}" for s in STAT_NAMES]
                    if target == "weights" and self.spectral and p in self._matrices:
                        columns.append(f"weight/{_label(p)}/spectral")
        for m in self.modules:
            columns += [f"act/{m}/{s}" for s in STAT_NAMES]
        columns += [f"loss/{k}" for k in self.valid.names] if self.valid else []
        return columns

    # ---- evaluation ---------------------------------------------------------------------
    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        params = dict(model.named_parameters())
        device = next((p.device for p in params.values()), torch.device("cpu"))
        nan = torch.full((len(STAT_NAMES),), float("nan"), dtype=torch.float64, device=device)
        parts: list[torch.Tensor] = []  # all on the model's device: one copy to the host at the end
        for target in ("weights", "grads"):
            if target not in self.targets:
                continue
            for qualified in self.parameters:
                p = params[qualified]
                tensor = p.detach() if target == "weights" else p.grad
                if tensor is None and context.step > 0:  # before the first backward, no gradient yet
                    self.warn_once(
                        "no-grad",
                        f"{qualified} has no gradient at the step boundary (call Monitor.step() before "
                        "optimizer.zero_grad()); its gradient statistics are NaN",
                    )
                if tensor is None:
                    parts.append(nan)
                else:
                    parts.append(tensor_stats(tensor, self.near_zero))
                if target == "weights" and self.spectral and qualified in self._matrices:
                    parts.append(self._spectral(qualified, p.detach()).to(torch.float64))
            if target == "weights":
                with torch.no_grad():
                    for qualified in self.computed:
                        weight = _computed(model, qualified)
                        parts.append(tensor_stats(weight, self.near_zero))
                        if self.spectral and qualified in self._matrices:
                            parts.append(self._spectral(qualified, weight).to(torch.float64))
        if "activations" in self.targets:
            parts += self._activation_stats(model, device, nan)
        values = torch.cat([t.reshape(-1) for t in parts]).cpu().numpy() if parts else np.zeros(0)
        if self.valid:
            values = np.concatenate([values, self.valid.evaluate(model)])
        frame: dict[str, Any] = {"values": values.astype(np.float64)}
        frame.update(self._history_means(context))
        if self._tracker is not None and context.step != self._last_step:
            self._track(frame, context.step)
        self._last_step = context.step
        return frame

    def _check_states(self, owner: str) -> None:
        missing = [m for m in self.states.metrics if m not in self.columns and not m.startswith("loss/")]
        if missing:
            raise ValueError(
                f"{owner}: the state model was fitted on metrics this probe does not record: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (hook the same modules with the same "
                "targets as the runs it was fitted on)"
            )
        index = {c: i for i, c in enumerate(self.columns)}
        self._state_sources = [index.get(m, m) for m in self.states.metrics]  # column index or frame key
        self._tracker = self.states.tracker()
        self.transitions = []
        self.transition_drivers = []

    def _track(self, frame: dict[str, Any], step: int) -> None:
        values = frame["values"]
        observed = [
            values[src] if isinstance(src, int) else float(frame.get(src, np.nan))
            for src in self._state_sources
        ]
        before = self._tracker.steps
        previous = int(self._state) if before else None
        probs = self._tracker.update(observed)
        self._state = state = int(np.argmax(probs))
        frame["state"] = np.int64(state)
        frame["state_probs"] = probs
        if previous is not None and state != previous:
            self.transitions.append((step, previous, state))
            drivers = self._tracker.drivers(previous, state)
            self.transition_drivers.append(drivers)
            named = ", ".join(f"{m} {g:+.3g}" for m, g in drivers)
            log.info("StatsProbe %r: latent state %d -> %d at step %d (p=%.2f); driven by %s", self.name,
                     previous, state, step, probs[state], named)  # fmt: skip

    def _spectral(self, qualified: str, weight: torch.Tensor) -> torch.Tensor:
        v = self._vectors.get(qualified)
        # Cold start: enough iterations to converge; later frames warm-start from the last vector.
        iterations = self.spectral_iterations if v is not None else max(30, self.spectral_iterations)
        sigma, v = spectral_norm(weight, iterations, v=v)
        self._vectors[qualified] = v.detach()
        return sigma.reshape(1)

    def _activation_stats(self, model: nn.Module, device, nan: torch.Tensor) -> list[torch.Tensor]:
        found: dict[str, torch.Tensor] = {}

        def measure(name: str, out: torch.Tensor) -> None:
            found[name] = tensor_stats(out, self.near_zero)

        with ForwardHooks(model, self.modules, measure), torch.no_grad():
            model(to_model(self.batch, *model_device_dtype(model)))
        return [found.get(m, nan) for m in self.modules]

    def _history_means(self, context: ProbeContext) -> dict[str, np.ndarray]:
        out = {}
        for name, series in context.history.items():
            if len(series.values) == 0:
                continue
            recent = series.steps > self._last_step
            values = series.values[recent] if recent.any() else series.values[-1:]
            out[f"loss/{display_name(name)}"] = np.float64(np.mean(values))
        return out

    # ---- what the run stores ------------------------------------------------------------
    def static(self) -> dict[str, np.ndarray]:
        return {"columns": np.asarray(self.columns, dtype=str)}

    def spec_arguments(self) -> dict[str, Any]:
        # The state model itself, not the path it may have been read from.
        return {**super().spec_arguments(), "states": self.states}

    def config(self) -> dict[str, Any]:
        return {
            "hooks": self.patterns,
            "targets": list(self.targets),
            "parameters": self.parameters,
            **({"computed": self.computed} if self.computed else {}),
            "modules": self.modules,
            "spectral": self.spectral,
            "near_zero": self.near_zero,
            "columns": len(self.columns),
            **({"states": self.states.to_json()} if self.states is not None else {}),
        }


def _state_model(owner: str, states):
    """``states`` as a StateModel: one, a LatentStates, or the path of a states.json."""
    if states is None:
        return None
    from probescope.analysis.online import StateModel

    if isinstance(states, StateModel):
        return states
    if hasattr(states, "state_model"):
        return states.state_model()
    if isinstance(states, (str, os.PathLike)):
        return StateModel.load(states)
    raise TypeError(
        f"{owner}: states must be a StateModel, a LatentStates or a path, got {type(states).__name__}"
    )


def _parametrization_modules(modules: dict[str, nn.Module]) -> set[str]:
    """The names of the modules inside parametrized layers' ``parametrizations`` (each
    computes a weight from its originals; torch.nn.utils.parametrize)."""
    inside = {
        id(inner)
        for module in modules.values()
        if parametrize.is_parametrized(module)
        for inner in module.parametrizations.modules()
    }
    return {name for name, module in modules.items() if id(module) in inside}


def _originals(module: nn.Module) -> list[torch.Tensor]:
    """A parametrized layer's original parameters (none for any other module)."""
    return list(module.parametrizations.parameters()) if parametrize.is_parametrized(module) else []


def _is_layer(module: nn.Module) -> bool:
    """A leaf module, or a parametrized one whose only sub-modules compute its weights."""
    if parametrize.is_parametrized(module):
        return all(name == "parametrizations" for name, _ in module.named_children())
    return is_leaf(module)


def _computed(model: nn.Module, qualified: str) -> torch.Tensor:
    """The tensor a parametrized layer computes, e.g. ``"head.weight"``, as its forward uses it."""
    owner, _, attribute = qualified.rpartition(".")
    return getattr(model.get_submodule(owner), attribute).detach()


def _label(name: str) -> str:
    """A parameter's name in metric names: its qualified name, or for a Keras model (whose
    torch parameters live in ``_torch_params`` dictionaries) the Keras variable path."""
    return name.rpartition("_torch_params.")[2]
