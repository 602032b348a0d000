"""How soon a shared budget's frames come, and what it measures them at (a diagnostic).

``python -m benchmarks.budget_start [--steps 3000] [--rounds 3] [--budget 0.05] [--hidden 256]
[--resolution 256] [--device cpu|cuda]``: a plain loop trains a 2-H-H-7 MLP on the blobs
(batch 64, Adam) with a GridProbe and a LossProbe on one shared budget (each probe half of it,
as ``Monitor(budget=...)`` sets up), in two variants taken in turn, round by round:

- ``measured``: ``Schedule.budget`` as it is. After the step-0 frame (which runs beside the first
  steps, before an idle step time is known, and is the coldest) the next frame comes within
  ``start`` steps and is measured beside training; a step in which both probes' frames ran is
  shared between them by their evaluation times.
- ``serial start``: the budget before those two changes (``TRIALS = 0``, steps not shared): the
  step-0 frame's whole evaluation counts until a frame is measured, and every frame is charged
  the whole excess of each step it ran in, other probes' frames included.

Per variant and probe, medians over rounds: the step of its second frame, frames taken, what
the budget measured a frame to cost training and its final interval; and the loop's steps/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from probescope import GridProbe, LossProbe, Monitor
from probescope.datasets import make_dataset
from probescope.schedule import Budget


class SerialStart(Budget):
    """The budget without trial frames and without shared steps."""

    TRIALS = 0

    def observe_steps(self, steps) -> None:
        super().observe_steps([s._replace(share=1.0) for s in steps])  # each frame charged in full


VARIANTS = {"measured": Budget, "serial start": SerialStart}


def _recording(probe):
    """The steps of the frames ``probe`` evaluates (its evaluate wrapped on this instance)."""
    steps: list[int] = []
    evaluate = probe.evaluate

    def recorded(model, context):
        steps.append(context.step)
        return evaluate(model, context)

    probe.evaluate = recorded
    return steps


def run_once(budget_cls, args, data, device: torch.device) -> dict:
    torch.manual_seed(0)
    h = args.hidden
    model = nn.Sequential(nn.Linear(2, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 7)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = data.x_train.to(device), data.y_train.to(device)
    probes = [GridProbe(data.x_train, data.y_train, resolution=args.resolution), LossProbe()]
    for p in probes:
        p.schedule = budget_cls(args.budget / len(probes), own_share=1.0 / len(probes))
    steps = {p.name: _recording(p) for p in probes}
    n = x.shape[0]
    with Monitor(model, probes, optimizer=optimizer, final_frame=False) as monitor:
        t0 = time.perf_counter()
        for step in range(args.steps):
            i = (step * 64) % (n - 64)
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            monitor.step(loss=loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        monitor.drain()
    result = {"steps_per_s": args.steps / elapsed, "probes": {}}
    for p in probes:
        state = p.schedule.state()
        result["probes"][p.name] = {
            "second_frame": steps[p.name][1] if len(steps[p.name]) > 1 else None,
            "frames": len(steps[p.name]),
            "cost_ms": state["cost_ms"],
            "probe_ms": state["probe_ms"],
            "interval": state["interval"],
            "step_ms": state["step_ms"],
            "own_ms": state["own_ms"],
        }
    return result


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for variant, results in runs.items():
        names = results[0]["probes"]
        out[variant] = {
            "steps_per_s": _median([r["steps_per_s"] for r in results]),
            "probes": {
                name: {
                    key: _median([r["probes"][name][key] for r in results])
                    for key in (
                        "second_frame",
                        "frames",
                        "cost_ms",
                        "probe_ms",
                        "interval",
                        "step_ms",
                        "own_ms",
                    )
                }
                for name in names
            },
        }
    return out


def table(summary: dict) -> str:
    columns = [  # (heading, key, format)
        ("2nd frame", "second_frame", ".0f"),
        ("frames", "frames", ".0f"),
        ("cost ms", "cost_ms", ".2f"),
        ("eval ms", "probe_ms", ".2f"),
        ("interval", "interval", ".0f"),
        ("step ms", "step_ms", ".3f"),
        ("own ms", "own_ms", ".4f"),
    ]
    lines = [f"{'variant':<13} {'probe':<6} " + " ".join(f"{h:>9}" for h, _, _ in columns) + "   steps/s"]
    for variant, s in summary.items():
        for name, p in s["probes"].items():
            cells = [format(p[k], f">9{f}") if p[k] is not None else f"{'-':>9}" for _, k, f in columns]
            lines.append(f"{variant:<13} {name:<6} " + " ".join(cells) + f" {s['steps_per_s']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.budget_start", description=__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.05, help="shared by the two probes")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="write the runs and their medians as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    data = make_dataset("blobs7", seed=0)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant, cls in VARIANTS.items():
            runs[variant].append(run_once(cls, args, data, device))
            print(f"round {r + 1}/{args.rounds} {variant}: {runs[variant][-1]}", file=sys.stderr)
    summary = summarise(runs)
    print(table(summary))
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {"args": vars(args) | {"out": str(args.out)}, "runs": runs, "summary": summary}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
