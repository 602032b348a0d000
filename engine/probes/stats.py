"""StatsProbe: statistics of weights, gradients and activations at hook points, over training.

The raw material of the latent-state analysis (probescope.analysis, after Hu et al., "Latent
State Models of Training Dynamics"): per hook point and per frame, the kernels' one-pass
``tensor_stats`` (mean, variance, L1 and L2 norms, max |x|, near-zero and non-finite
fractions) and the spectral norm of each weight matrix, plus the run's losses and metrics.
Everything is computed on the model's device and copied to the host once per frame.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from probescope.history import display_name
from probescope.kernels.stats import STAT_NAMES, spectral_norm, tensor_stats
from probescope.probes.base import Probe, ProbeContext, ValidSet, check_forward
from probescope.probes.hooks import HookPoints
from probescope.schedule import Schedule

log = logging.getLogger("probescope")


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
        self.points = HookPoints(owner, hooks, targets, batch)
        if isinstance(spectral_iterations, bool) or not isinstance(spectral_iterations, int):
            raise TypeError(f"{owner}: spectral_iterations must be an int")
        if spectral_iterations < 1:
            raise ValueError(f"{owner}: spectral_iterations must be >= 1, got {spectral_iterations}")
        if not near_zero >= 0:
            raise ValueError(f"{owner}: near_zero must be >= 0, got {near_zero!r}")
        self.spectral, self.spectral_iterations, self.near_zero = spectral, spectral_iterations, near_zero
        self.needs_grads = self.points.needs_grads
        self.valid = ValidSet(owner, valid, loss_fn, metrics, batch_size)
        self.columns: list[str] = []
        self._matrices: set[str] = set()
        self._vectors: dict[str, torch.Tensor] = {}  # power-iteration warm starts
        self._last_step = -1

    # ---- set-up -------------------------------------------------------------------------
    @property
    def patterns(self) -> list[str]:
        return self.points.patterns

    @property
    def targets(self) -> tuple[str, ...]:
        return self.points.targets

    @property
    def batch(self) -> torch.Tensor | None:
        return self.points.batch

    @property
    def parameters(self) -> list[str]:
        """The qualified names of the parameters measured."""
        return self.points.parameters

    @property
    def computed(self) -> list[str]:
        """The weights parametrized layers compute, e.g. ``"fc.weight"``."""
        return self.points.computed

    @property
    def modules(self) -> list[str]:
        """The modules whose outputs are measured."""
        return self.points.modules

    def attach(self, model: nn.Module) -> None:
        owner = f"StatsProbe {self.name!r}"
        self.points.attach(model)
        if self.valid:
            check_forward(owner, model, self.valid.x[:2])
        self._matrices = {q for q, shape in self.points.shapes.items() if len(shape) >= 2}
        self.columns = self._column_names()
        if self.states is not None:
            self._check_states(owner)
        # Compile the kernels now, before training, not in the first frame.
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        probe = torch.zeros(3, 3, device=device)
        tensor_stats(probe, self.near_zero)
        if self._matrices and self.spectral:
            spectral_norm(probe, 1)

    def _column_names(self) -> list[str]:
        columns = []
        for target, qualified, name in self.points.tensors():
            columns += [f"{name}/{s}" for s in STAT_NAMES]
            if target == "weights" and self.spectral and qualified in self._matrices:
                columns.append(f"{name}/spectral")
        columns += [f"loss/{k}" for k in self.valid.names] if self.valid else []
        return columns

    # ---- evaluation ---------------------------------------------------------------------
    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        nan = torch.full((len(STAT_NAMES),), float("nan"), dtype=torch.float64, device=device)
        parts: list[torch.Tensor] = []  # all on the model's device: one copy to the host at the end
        if "weights" in self.targets:
            for qualified, weight in self.points.weights(model):
                parts.append(tensor_stats(weight, self.near_zero))
                if self.spectral and qualified in self._matrices:
                    parts.append(self._spectral(qualified, weight).to(torch.float64))
        if "grads" in self.targets:
            for _, grad in self.points.grads(model, context, self.warn_once):
                parts.append(nan if grad is None else tensor_stats(grad, self.near_zero))
        if "activations" in self.targets:
            parts += self.points.activations(model, lambda out: tensor_stats(out, self.near_zero), nan)
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
            **self.points.config(),
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
