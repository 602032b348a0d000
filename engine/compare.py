"""Many runs, one table: what each run trained and what its probes saw last, side by side.

For benchmark suites (many models x probes): ``compare_runs(["runs/a", "runs/b", ...])`` reads
each run directory (finished or still running) and returns a pandas DataFrame with one row
per run: how it stands (``stopped``: its process died without closing it), the model, its
size, steps and epochs, the step of its newest frame, how many times it was resumed
(``Monitor(resume=...)``: a preempted job), the monitored wall time, a digest of
its probe spec (equal digests: the runs were probed the same way), the first series to go NaN
or infinite and where (``nonfinite``: a run that diverged), the last value of every loss and
metric series (the run's history once it is closed, with or without a LossProbe; before,
LossProbe's last frame or StatsProbe's table), each PredictionProbe's last accuracy (labels:
also exact match and F1; or MSE and R²), each CurveProbe's last sample loss, each
CheckpointProbe's best value, every number of the last frame of a probe of the user's own
kind, and each probe's frames, milliseconds per frame and failures.
``probescope compare RUN [RUN ...]`` prints it and writes it as CSV, JSON or Markdown.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from probescope.probes.loss import frame_series
from probescope.probes.views import frame_layout, is_own_kind
from probescope.run import Run, open_run
from probescope.spec import spec_digest

SCALARS = {
    "prediction": ("accuracy", "exact_match", "f1", "mse", "r2"),
    "curve": ("total_loss",),
    "checkpoint": ("best",),
}


def compare_runs(runs: Iterable[str | os.PathLike | Run]):
    """One row per run (see the module's doc); columns absent from a run are NaN."""
    import pandas as pd

    rows = [run_row(r if isinstance(r, Run) else open_run(r)) for r in runs]
    if not rows:
        raise ValueError("compare_runs: give at least one run")
    frame = pd.DataFrame(rows)
    return frame.set_index("run")


def run_row(run: Run) -> dict[str, Any]:
    """The comparison row of one run."""
    meta = run.meta
    model = meta.get("model", {})
    summary = meta.get("summary", {})
    row: dict[str, Any] = {
        "run": str(run.path),
        "status": run.status,
        "model": str(model.get("class", "")).rsplit(".", 1)[-1],
        "parameters": model.get("parameters"),
        "steps": summary.get("steps"),
        "last_step": run.last_step(),
        "resumes": len(meta.get("resumes", [])),
        "epochs": summary.get("epochs"),
        "wall_seconds": summary.get("wall_seconds"),
        "probe_spec": _spec_digest(run),
        "nonfinite": _first_nonfinite(summary.get("nonfinite") or {}),
    }
    metrics: dict[str, float] = {}
    costs: dict[str, Any] = {}
    for name, record in run.probes.items():
        stats = summary.get("probes", {}).get(name, {})
        costs[f"{name}/frames"] = len(record)
        costs[f"{name}/ms_per_frame"] = stats.get("mean_ms", math.nan)
        costs[f"{name}/failed"] = stats.get("failed", 0)
        if not len(record):
            continue
        if record.kind == "loss":
            metrics.update(_last_series(record.frame(len(record) - 1).data))
        elif record.kind == "stats":
            table = record.table()
            diverged = summary.get("nonfinite") or {}
            for column in table.columns:
                # NaN in a frame before anything was logged; after that a NaN is the series' own
                # (a loss that diverged; every frame taken after it may hold NaN only) and stays
                name = column.removeprefix("loss/")
                if column.startswith("loss/") and (table[column].notna().any() or name in diverged):
                    metrics.setdefault(name, float(table[column].iloc[-1]))
        elif record.kind in SCALARS:
            data = record.frame(len(record) - 1).data
            for key in SCALARS[record.kind]:
                if key in data:
                    row[f"{name}/{key}"] = float(data[key])
        elif is_own_kind(record.kind):  # the numbers of its last frame
            layout = frame_layout(record.frame(len(record) - 1).data, record.config.get("views"))
            row.update({f"{name}/{key}": value for key, value in layout.scalars.items()})
    for series_name, series in run.history().items():  # whole at close, or journaled: newer than any frame
        if series_name != "lr" and len(series.values):
            metrics[series_name] = float(series.values[-1])
    return {**row, **{k: metrics[k] for k in sorted(metrics)}, **costs}


def _first_nonfinite(found: dict[str, dict]) -> str:
    """The first series of a run to go NaN or infinite, as ``"train_loss nan at step 122"``
    (empty when none did)."""
    if not found:
        return ""
    name, first = min(found.items(), key=lambda item: item[1].get("step", 0))
    return f"{name} {first.get('value')} at step {first.get('step')}"


def _spec_digest(run: Run) -> str:
    """The first digits of the run's probe spec digest: equal when runs were probed the same way
    (empty for a run recorded without a spec)."""
    if "spec" not in run.meta:
        return ""
    try:
        return spec_digest(run.path)[:12]
    except (OSError, ValueError):
        return ""


def _last_series(data: dict[str, np.ndarray]) -> dict[str, float]:
    """The last value of every series of a LossProbe frame (the learning rate left out)."""
    return {name: float(values[-1]) for name, (_, values) in frame_series(data).items() if len(values)}


def write_table(table, path: str | os.PathLike) -> None:
    """Write the comparison as CSV, JSON (records) or Markdown, by the file's suffix."""
    path = os.fspath(path)
    if path.endswith(".csv"):
        table.to_csv(path)
    elif path.endswith(".json"):
        table.reset_index().to_json(path, orient="records", indent=2)
    elif path.endswith(".md"):
        with open(path, "w") as f:
            f.write(_markdown(table))
    else:
        raise ValueError(f"compare: write .csv, .json or .md, got {path!r}")


def _markdown(table) -> str:
    """A Markdown table without the optional tabulate package."""
    columns = ["run", *table.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for run, row in table.iterrows():
        cells = [str(run)] + [_cell(row[c]) for c in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)
