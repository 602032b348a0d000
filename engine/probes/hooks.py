"""Hook points: the tensors of a model a probe measures, chosen by module names or globs.

The statistics probe and the histogram probe choose alike: each module a pattern matches
gives its own parameters (``weights``; with ``grads``, the gradients of those that train, as
of the step boundary) and, given a fixed batch, its output on that batch (``activations``,
by forward hooks on the snapshot). A parametrized layer (weight_norm, orthogonal,
spectral_norm's parametrizations) is one layer: it gives the originals its parametrizations
hold and the weight they compute, and the modules inside the parametrizations are no layers
of their own.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from probescope.probes.base import (
    ForwardHooks,
    ProbeContext,
    as_input_tensor,
    check_forward,
    is_leaf,
    model_device_dtype,
    named_layers,
    own_parameters,
    to_model,
)
from probescope.snapshot import trained_parameters

log = logging.getLogger("probescope")

TARGETS = ("weights", "grads", "activations")
PREFIX = {"weights": "weight", "grads": "grad", "activations": "act"}


class HookPoints:
    """Which tensors of a model are measured: ``hooks`` (module names or glob patterns over
    ``model.named_modules()``, a Keras model's layer names; ``"*"``: every module), ``targets``
    (among ``TARGETS``; default weights, and activations when a ``batch`` is given) and the
    fixed ``batch`` whose activations are measured. ``attach`` finds them in a model."""

    def __init__(self, owner: str, hooks: str | Iterable[str], targets: Iterable[str] | None, batch):
        self.owner = owner
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
            raise ValueError(f"{owner}: activations need a fixed input batch (batch=...)")
        self.batch = None if batch is None else as_input_tensor("batch", batch, owner=owner)
        self.parameters: list[str] = []  # qualified parameter names
        self.computed: list[str] = []  # weights parametrized layers compute, e.g. "fc.weight"
        self.modules: list[str] = []  # modules whose outputs are measured
        self.shapes: dict[str, torch.Size] = {}  # of every parameter and computed weight

    @property
    def needs_grads(self) -> bool:
        return "grads" in self.targets

    def _matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def attach(self, model: nn.Module) -> None:
        """Find the hook points in ``model``; a pattern that matches nothing is a ValueError
        naming the modules there are."""
        owner = self.owner
        modules = named_layers(model)
        unused = [p for p in self.patterns if not any(fnmatch.fnmatchcase(n, p) for n in modules)]
        if unused:
            names = ", ".join(repr(n) for n in modules if n) or "(none)"
            raise ValueError(f"{owner}: hook patterns {unused} match no module; the modules are {names}")
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
        named = dict(model.named_parameters())
        # A frozen parameter (requires_grad=False) has no gradient while it is frozen: its
        # statistics are NaN then, without a warning. Training may unfreeze it (gradual
        # unfreezing; fastai's fine_tune, whose two fits a resumed run records as one), so the
        # columns do not depend on which train now.
        if self.needs_grads:
            trains = trained_parameters(model)
            frozen = [q for q in self.parameters if q not in trains]
            if frozen:
                log.info("%s: the frozen parameters %s have NaN gradients while frozen", owner, frozen)
        if "activations" in self.targets:
            self.modules = self._measured_modules(model, modules, inner, [m for m in matched if m])
        if not self.parameters and not self.computed and "activations" not in self.targets:
            raise ValueError(f"{owner}: the hook patterns {self.patterns} match no module with parameters")
        with torch.no_grad():
            self.shapes = {q: named[q].shape for q in self.parameters} | {
                q: computed_weight(model, q).shape for q in self.computed
            }

    def _measured_modules(
        self, model: nn.Module, modules: dict[str, nn.Module], inner: set[str], candidates: list[str]
    ) -> list[str]:
        """The modules whose outputs are measured, found by a forward of the batch: each one named
        exactly (it must give a floating-point tensor); under a glob, the layers (leaf modules)
        that give one, and the containers none of whose sub-modules runs (their own forward
        computes their output: ``nn.MultiheadAttention``, which holds an ``out_proj`` it never
        calls), not a container whose output often repeats its last child's. A module a glob
        matches that gives no tensor (never called) is left out."""
        owner = self.owner
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
            log.info("%s: no activations from %s (not called in forward)", owner, silent)
        chosen = [m for m in chosen if m in gave]
        if not chosen:
            raise ValueError(
                f"{owner}: the hook patterns match no module whose output can be measured on the batch "
                "(a glob takes the layers it matches that run; name a container exactly to measure its "
                "output)"
            )
        return chosen

    # ---- the tensors, on a snapshot -----------------------------------------------------
    def weights(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter, then every computed weight, by name (detached, on the model's device)."""
        params = dict(model.named_parameters())
        for qualified in self.parameters:
            yield qualified, params[qualified].detach()
        with torch.no_grad():
            for qualified in self.computed:
                yield qualified, computed_weight(model, qualified)

    def grads(
        self, model: nn.Module, context: ProbeContext, warn: Callable[[str, str], None]
    ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Every parameter's gradient as of the step boundary (None before the first backward,
        while the parameter is frozen, and when the loop has cleared it: ``warn`` says so once)."""
        params = dict(model.named_parameters())
        trains = None  # the names of the parameters that train now, if one has no gradient
        for qualified in self.parameters:
            grad = params[qualified].grad
            if grad is None and context.step > 0:
                trains = trained_parameters(model) if trains is None else trains
                if qualified in trains:
                    warn(
                        "no-grad",
                        f"{qualified} has no gradient at the step boundary (call Monitor.step() before "
                        "optimizer.zero_grad()); its gradient statistics are NaN",
                    )
            yield qualified, grad

    def activations(
        self, model: nn.Module, measure: Callable[[torch.Tensor], torch.Tensor], missing: torch.Tensor
    ) -> list[torch.Tensor]:
        """Run the batch through ``model``: ``measure`` of each measured module's output, in the
        order of ``modules`` (``missing`` for one that did not run this time)."""
        found: dict[str, torch.Tensor] = {}

        def hooked(name: str, out: torch.Tensor) -> None:
            found[name] = measure(out)

        with ForwardHooks(model, self.modules, hooked), torch.no_grad():
            model(to_model(self.batch, *model_device_dtype(model)))
        return [found.get(m, missing) for m in self.modules]

    def tensors(self) -> list[tuple[str, str, str]]:
        """``(target, parameter or module, name)`` of every tensor measured, in the order the
        iterators give them: weights (parameters, then computed weights), gradients, activations;
        names as ``weight/<parameter>``, ``grad/<parameter>``, ``act/<module>``."""
        chosen = [
            *(("weights", q) for q in [*self.parameters, *self.computed] if "weights" in self.targets),
            *(("grads", q) for q in self.parameters if self.needs_grads),
            *(("activations", m) for m in self.modules),
        ]
        return [
            (target, q, f"{PREFIX[target]}/{q if target == 'activations' else tensor_label(q)}")
            for target, q in chosen
        ]

    def config(self) -> dict:
        return {
            "hooks": self.patterns,
            "targets": list(self.targets),
            "parameters": self.parameters,
            **({"computed": self.computed} if self.computed else {}),
            "modules": self.modules,
        }


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


def computed_weight(model: nn.Module, qualified: str) -> torch.Tensor:
    """The tensor a parametrized layer computes, e.g. ``"head.weight"``, as its forward uses it."""
    owner, _, attribute = qualified.rpartition(".")
    return getattr(model.get_submodule(owner), attribute).detach()


def tensor_label(name: str) -> str:
    """A parameter's name in metric names: its qualified name, or for a Keras model (whose
    torch parameters live in ``_torch_params`` dictionaries) the Keras variable path."""
    return name.rpartition("_torch_params.")[2]
