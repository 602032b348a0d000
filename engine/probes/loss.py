"""LossProbe: train and valid loss per step and per epoch, plus metrics (after tsai's ShowGraph)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from probescope.history import History, Series, epoch_means
from probescope.probes.base import Probe, ProbeContext, as_float_tensor, batched_forward, check_forward
from probescope.schedule import Schedule

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


class LossProbe(Probe):
    """Every scalar series of the run, as of the frame's step.

    Series: ``train_loss`` (each batch's loss, from ``Monitor.step(loss=...)``),
    ``train_loss_epoch`` (its mean per epoch), everything passed to ``Monitor.log(...)``
    (e.g. ``valid_loss``, ``accuracy``), and, when ``valid=(x, y)`` is given, ``valid_loss``
    and each of ``metrics`` evaluated by this probe on that data at every frame.
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
        name: str | None = None,
        schedule: Schedule | None = None,
    ):
        super().__init__(name=name, schedule=schedule)
        owner = f"LossProbe {self.name!r}"
        metrics = dict(metrics or {})
        for key, fn in metrics.items():
            if not callable(fn):
                raise TypeError(f"{owner}: metric {key!r} must be callable(pred, target)")
        self.valid_x = self.valid_y = None
        if valid is not None:
            if len(valid) != 2:
                raise ValueError(f"{owner}: valid must be a pair (x, y)")
            self.valid_x = as_float_tensor("valid x", valid[0], ndim=(1, 2, 3, 4, 5), owner=owner)
            self.valid_y = (
                torch.as_tensor(np.asarray(valid[1]) if not isinstance(valid[1], torch.Tensor) else valid[1])
                .detach()
                .cpu()
            )
            if self.valid_y.shape[0] != self.valid_x.shape[0]:
                raise ValueError(
                    f"{owner}: valid x has {self.valid_x.shape[0]} samples, y has {self.valid_y.shape[0]}"
                )
            if loss_fn is None:
                raise ValueError(f"{owner}: valid data needs a loss_fn(pred, target)")
        elif metrics:
            raise ValueError(f"{owner}: metrics are evaluated on valid data; pass valid=(x, y)")
        self.loss_fn, self.metrics, self.batch_size = loss_fn, metrics, batch_size
        self._probe_series: dict[str, tuple[list[int], list[float]]] = {}

    def attach(self, model: nn.Module) -> None:
        if self.valid_x is not None:
            check_forward(f"LossProbe {self.name!r}", model, self.valid_x[:2])

    def _record(self, name: str, step: int, value: float) -> None:
        steps, values = self._probe_series.setdefault(name, ([], []))
        steps.append(step)
        values.append(value)

    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        series: dict[str, Series] = {}
        for name, s in context.history.items():
            series["train_loss" if name == History.BATCH_LOSS else name] = s
        if "train_loss" in series:
            series["train_loss_epoch"] = epoch_means(series["train_loss"])
        if self.valid_x is not None:
            pred = batched_forward(model, self.valid_x, self.batch_size)
            target = self.valid_y
            if pred.shape[1] == 1 and target.dim() == 1 and target.is_floating_point():
                pred = pred[:, 0]
            self._record("valid_loss", context.step, float(self.loss_fn(pred, target)))
            for key, fn in self.metrics.items():
                self._record(key, context.step, float(fn(pred, target)))
            for key, (steps, values) in self._probe_series.items():
                series[key] = Series(np.asarray(steps), np.zeros(len(steps), np.int64), np.asarray(values))
        frame: dict[str, Any] = {}
        for key, s in series.items():
            frame[f"series/{key}/steps"] = s.steps
            frame[f"series/{key}/values"] = s.values
        return frame

    def config(self) -> dict[str, Any]:
        return {
            "valid_samples": 0 if self.valid_x is None else int(self.valid_x.shape[0]),
            "metrics": sorted(self.metrics),
        }
