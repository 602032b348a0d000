"""LossProbe: train and valid loss per step and per epoch, plus metrics (after tsai's ShowGraph)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from probescope.history import MIN_POINTS, Series, display_name, envelope, epoch_means
from probescope.probes.base import Probe, ProbeContext, ValidSet, check_forward
from probescope.schedule import Schedule
from probescope.validation import at_least

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


class LossProbe(Probe):
    """Every scalar series of the run, as of the frame's step.

    Series: ``train_loss`` (each batch's loss, from ``Monitor.step(loss=...)``),
    ``train_loss_epoch`` (its mean per epoch), everything passed to ``Monitor.log(...)``
    (e.g. ``valid_loss``, ``accuracy``), and, when ``valid=(x, y)`` is given, ``valid_loss``
    and each of ``metrics`` evaluated by this probe on that data at every frame. A series
    longer than ``max_points`` is cut to that many of its points, keeping its shape (each
    stretch's lowest, highest and first NaN point): frames stay the same size however long
    training runs.
    Frame keys are ``series/<name>/steps`` and ``series/<name>/values``.
    """

    kind = "loss"
    default_schedule = Schedule.every_epoch()

    def __init__(
        self,
        *,
        valid: tuple | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metrics: Mapping[str, Metric] | None = None,
        batch_size: int = 65536,
        max_points: int = 10_000,
        name: str | None = None,
        schedule: Schedule | None = None,
    ):
        super().__init__(name=name, schedule=schedule)
        self.valid = ValidSet(f"LossProbe {self.name!r}", valid, loss_fn, metrics, batch_size)
        self.reads_model = bool(self.valid)
        self.max_points = at_least(f"LossProbe {self.name!r}: max_points", max_points, MIN_POINTS)
        self._probe_series: dict[str, tuple[list[int], list[float]]] = {}

    def attach(self, model: nn.Module) -> None:
        if self.valid:
            check_forward(f"LossProbe {self.name!r}", model, self.valid.x[:2])

    def _record(self, name: str, step: int, value: float) -> None:
        steps, values = self._probe_series.setdefault(name, ([], []))
        steps.append(step)
        values.append(value)

    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        series: dict[str, Series] = {}
        for name, s in context.history.items():
            series[display_name(name)] = s
        if "train_loss" in series:
            series["train_loss_epoch"] = epoch_means(series["train_loss"])
        if self.valid:
            for key, value in zip(self.valid.names, self.valid.evaluate(model), strict=True):
                self._record(key, context.step, value)
            for key, (steps, values) in self._probe_series.items():
                series[key] = Series(np.asarray(steps), np.zeros(len(steps), np.int64), np.asarray(values))
        frame: dict[str, Any] = {}
        for key, s in series.items():
            s = envelope(s, self.max_points)  # a frame's size stays bounded however long the run
            frame[f"series/{key}/steps"] = s.steps
            frame[f"series/{key}/values"] = s.values
        return frame

    def resume(self, frame) -> None:
        if self.valid:  # the valid-set series this probe scored itself
            self._probe_series = {
                key: (frame.data[f"series/{key}/steps"].tolist(), frame.data[f"series/{key}/values"].tolist())
                for key in self.valid.names
                if f"series/{key}/steps" in frame.data
            }

    def config(self) -> dict[str, Any]:
        return {
            "valid_samples": int(self.valid.x.shape[0]) if self.valid else 0,
            "metrics": sorted(self.valid.metrics),
        }


def frame_series(
    data: Mapping[str, np.ndarray], lr: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A LossProbe frame's series, ``{name: (steps, values)}`` by name (the learning rate left
    out unless ``lr``)."""
    names = sorted(
        {key.split("/")[1] for key in data if key.startswith("series/")} - (set() if lr else {"lr"})
    )
    return {name: (data[f"series/{name}/steps"], data[f"series/{name}/values"]) for name in names}


def first_nonfinite(series: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[str, int, float] | None:
    """Where a run diverged: the earliest NaN or infinity of ``series`` (``frame_series``'s),
    as ``(name, step, value)``, or None. (A frame keeps each series' first NaN however long
    the run: see ``envelope``.)"""
    found = []
    for name, (steps, values) in series.items():
        bad = np.flatnonzero(~np.isfinite(np.asarray(values, np.float64)))
        if len(bad):
            found.append((int(steps[bad[0]]), name, float(values[bad[0]])))
    if not found:
        return None
    step, name, value = min(found, key=lambda f: (f[0], f[1]))
    return name, step, value


def own_series(config: Mapping[str, Any]) -> set[str]:
    """The series a LossProbe of ``config`` makes itself (the rest of its frames' series are
    the run's history): the epoch means, and its valid loss and metrics when it scores them."""
    scored = {"valid_loss", *config.get("metrics", [])} if config.get("valid_samples") else set()
    return {"train_loss_epoch"} | scored


def frame_history(frame, config: Mapping[str, Any]) -> dict[str, Series]:
    """The run's scalar series a LossProbe ``frame`` holds, by display name (the batch losses
    as ``train_loss``): what the history held at its step, for a run whose history did not
    survive (a process killed before its journal's next write). The batch losses and logged
    values at their steps; their epochs from the frame's epoch means (an epoch ends at the step
    of each); the probe's own series (``train_loss_epoch``, its valid loss and metrics) are not
    the history's. A series longer than the probe's ``max_points`` comes as the frame kept it
    (its envelope)."""
    own = own_series(config)
    ends = frame.data.get("series/train_loss_epoch/steps")
    series = {}
    for name, (steps, values) in frame_series(frame.data, lr=True).items():
        if name not in own:
            epochs = np.searchsorted(ends, steps, side="left") if ends is not None else np.zeros_like(steps)
            series[name] = Series(steps, epochs, values)
    return series
