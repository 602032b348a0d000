"""CheckpointProbe: the best weights so far, scored on held-out data and saved off the training
path (tsai's SaveModel, without stopping training to save)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from probescope.probes.base import Probe, ProbeContext, ValidSet, check_forward
from probescope.run import atomic_write, save_state
from probescope.schedule import Schedule

KEEP = ("best", "all", "last")
COMPARE = ("min", "max")
INDEX = "checkpoints.json"


class CheckpointProbe(Probe):
    """Saves the snapshot's weights when ``metric`` improves (``keep="best"``: ``<fname>.pt``),
    at every frame (``"all"``: ``<fname>_<step>.pt``), or the newest only (``"last"``).

    ``metric`` is ``valid_loss`` or one of ``metrics``, scored by this probe on ``valid=(x, y)``
    from the very snapshot it saves: the weights saved are exactly the weights scored. Without
    ``valid`` it is a value the training loop logged (``Monitor.log``, ``after_validate``) at
    the snapshot's step; a frame whose step has no such value is not scored (one warning after
    step 0) and with ``keep="best"`` saves nothing.
    ``comp`` is ``"min"`` or ``"max"`` (default: min when the name holds "loss" or "error", as
    tsai); a value must beat the best by more than ``min_delta`` to count as better.

    Files are plain state_dicts (``model.load_state_dict(torch.load(path))``) in ``directory``
    (default ``RUN/checkpoints``), with ``checkpoints.json`` naming each file's step, epoch and
    value and the best so far. ``load_best=True`` loads the best weights into the model when
    the Monitor closes (tsai's behaviour; the run's ``model.pt`` is then the best model).
    Scoring and writing run in the probe worker: training pays for the snapshot only.
    tsai's ``every_epoch=N`` is ``keep="all", schedule=Schedule.every_epoch(N)``; its
    ``at_end=True`` is ``keep="last", schedule=Schedule.never()`` (saved by the final frame).
    """

    kind = "checkpoint"
    default_schedule = Schedule.every_epoch()

    def __init__(
        self,
        metric: str = "valid_loss",
        *,
        valid: tuple | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metrics: Mapping[str, Callable[[torch.Tensor, torch.Tensor], Any]] | None = None,
        comp: str | None = None,
        min_delta: float = 0.0,
        keep: str = "best",
        fname: str = "model",
        directory: str | Path | None = None,
        load_best: bool = False,
        batch_size: int = 65536,
        name: str | None = None,
        schedule: Schedule | None = None,
    ):
        super().__init__(name=name, schedule=schedule)
        owner = f"CheckpointProbe {self.name!r}"
        self.valid = ValidSet(owner, valid, loss_fn, metrics, batch_size)
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"{owner}: metric must be the name of a value, got {metric!r}")
        if self.valid and metric not in self.valid.names:
            raise ValueError(
                f"{owner}: metric {metric!r} is not scored on valid; it scores {self.valid.names}"
            )
        if comp is None:
            comp = "min" if "loss" in metric or "error" in metric else "max"
        if comp not in COMPARE:
            raise ValueError(f"{owner}: comp must be one of {COMPARE} or None, got {comp!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise ValueError(f"{owner}: min_delta must be a number >= 0, got {min_delta!r}")
        if keep not in KEEP:
            raise ValueError(f"{owner}: keep must be one of {KEEP}, got {keep!r}")
        if load_best and keep == "last":
            raise ValueError(f"{owner}: load_best needs the best weights kept (keep='best' or 'all')")
        if not isinstance(fname, str) or not fname or "/" in fname or fname.startswith("."):
            raise ValueError(f"{owner}: fname must be a plain file name, got {fname!r}")
        self.metric, self.comp, self.min_delta = metric, comp, float(min_delta)
        self.keep, self.fname, self.load_best = keep, fname, load_best
        self.directory = Path(directory) if directory is not None else None
        self.best: dict[str, Any] | None = None  # file, step, epoch, value of the best so far
        self.files: list[dict[str, Any]] = []  # what is on disk now, oldest first

    def attach(self, model: nn.Module) -> None:
        if self.valid:
            check_forward(f"CheckpointProbe {self.name!r}", model, self.valid.x[:2])

    def before_fit(self, monitor, **kwargs) -> None:
        owner = f"CheckpointProbe {self.name!r}"
        if self.directory is None:
            if monitor.writer is None:
                raise ValueError(f"{owner}: give directory=... or run the Monitor with a run_dir")
            self.directory = monitor.writer.path / "checkpoints"
        snapshot = monitor.snapshot_detail
        if snapshot["strategy"] == "live" or (
            snapshot["strategy"] == "copy" and snapshot["copied_elements"] < snapshot["model_elements"]
        ):
            raise ValueError(
                f"{owner}: a checkpoint needs the weights of one step; the {snapshot['strategy']} "
                "snapshot (partial or live) would mix steps"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        if monitor.resumed_at is not None and (self.directory / INDEX).exists():
            self._continue(monitor.resumed_at)

    def _continue(self, step: int) -> None:
        """A resumed run: keep the checkpoints up to ``step`` and the best among them; those of
        later steps (a timeline the run goes back on) move to ``superseded/``."""
        index = json.loads((self.directory / INDEX).read_text())
        files = index.get("files", [])
        self.files = [f for f in files if f["step"] <= step]
        for entry in files:
            if entry["step"] > step and (self.directory / entry["file"]).exists():
                (self.directory / "superseded").mkdir(exist_ok=True)
                os.replace(self.directory / entry["file"], self.directory / "superseded" / entry["file"])
        best = index.get("best")
        if best is not None and best["step"] > step:
            scored = [f for f in self.files if math.isfinite(f["value"])]
            pick = min if self.comp == "min" else max
            best = pick(scored, key=lambda f: f["value"]) if scored else None
        self.best = best
        self._write_index()

    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        value = self._value(model, context)
        better = self._better(value)
        saved = better if self.keep == "best" else True
        entry = {"step": context.step, "epoch": context.epoch, "value": value}
        if saved:
            suffix = f"_{context.step:07d}" if self.keep == "all" else ""
            entry["file"] = f"{self.fname}{suffix}.pt"
            save_state(model, self.directory / entry["file"])
            self.files = [*self.files, entry] if self.keep == "all" else [entry]
        if better:
            self.best = entry
        if saved:
            self._write_index()
        best = self.best or {"value": math.nan, "step": -1}
        return {
            "value": np.float64(value),
            "best": np.float64(best["value"]),
            "best_step": np.int64(best["step"]),
            "saved": np.bool_(saved),
        }

    def _better(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta`` (NaN never does)."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.comp == "min":
            return value < self.best["value"] - self.min_delta
        return value > self.best["value"] + self.min_delta

    def _value(self, model: nn.Module, context: ProbeContext) -> float:
        """The metric of this snapshot: scored on the valid set, or as logged at its step."""
        if self.valid:
            return self.valid.evaluate(model)[self.valid.names.index(self.metric)]
        series = context.history.get(self.metric)
        at_step = np.flatnonzero(series.steps == context.step) if series is not None else []
        if not len(at_step):
            if self.keep != "best" or context.step == 0:  # (nothing is validated before training)
                return math.nan
            self.warn_once(
                "no value",
                f"no {self.metric!r} was logged at step {context.step} (the snapshot's step), so "
                "frames like it are not scored and never count as the best. Log it before the "
                f"probe runs (Monitor.step(loss, {self.metric}=...) with the step; Monitor.log or "
                "after_validate, then end_epoch) or give valid=(x, y)",
            )
            return math.nan
        return float(series.values[at_step[-1]])

    def _write_index(self) -> None:
        index = {
            "metric": self.metric,
            "comp": self.comp,
            "keep": self.keep,
            "best": self.best,
            "files": self.files,
        }
        atomic_write(self.directory / INDEX, lambda f: f.write(json.dumps(index, indent=2).encode()))

    def after_fit(self, monitor, **kwargs) -> None:
        if not self.load_best or self.best is None or "file" not in self.best:
            return
        state = torch.load(self.directory / self.best["file"], weights_only=True)
        monitor.model.load_state_dict(state)

    def config(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "comp": self.comp,
            "min_delta": self.min_delta,
            "keep": self.keep,
            "fname": self.fname,
            "directory": str(self.directory) if self.directory is not None else None,
            "load_best": self.load_best,
            "valid_samples": int(self.valid.x.shape[0]) if self.valid else 0,
        }
