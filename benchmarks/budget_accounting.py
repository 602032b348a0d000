"""Where a budget's share of training time goes, and how much of it the budget sees (a diagnostic).

``python -m benchmarks.budget_accounting [--steps 6000] [--rounds 4] [--budget 0.05]
[--resolution 512] [--work-us 20] [--device cpu|cuda] [--out FILE]``: the overhead suite's MLP workload
(2-64-64-7 on the blobs, batch 256, Adam, a GridProbe) trains in rounds of windows of
``--steps`` steps each, taken in turn:

- ``off``: no Monitor (timed before and after the others; the round's reference is their mean);
- ``attached``: a Monitor whose probe never runs: the Monitor's work at every step alone;
- ``budget``: the probe on ``Schedule.budget(--budget)``, the budgets told the steps
  ``Monitor.STEP_BATCH`` at a time;
- ``budget, told per step``: the same with every step told at once (``STEP_BATCH = 1``).
- ``python work``: no Monitor, but ``--work-us`` microseconds of interpreter work unrelated
  to training after every step (a loop on the clock): what any Python work of the Monitor's
  size costs the steps around it, beyond its own time (``idle med``: the median step, timed
  without the work, against ``off``'s).

Denormal floats are flushed (``--denormals keep`` leaves them): as Adam's state decays towards
zero, denormal arithmetic makes this loop's step slower minute by minute, a drift that would
fall on whichever window comes later.

Per mode, medians over rounds: the slowdown (time per step against the round's ``off``) and,
for the budgets, what the slowdown is made of, per step and as a fraction of ``off``'s step:
the Monitor's own work (``monitor.step`` timed around the call, steps without a launch), the
idle steps' excess over ``off`` (steps beside no frame, as the budget times them: without the
Monitor's own work), and the frames' (the steps beside a frame, over the idle steps' mean);
beside what the budget believes it spends (its own work plus its frames at its measured cost,
over its idle step). ``idle med``: how much slower the median idle step is than the median
step of ``off`` (each timed end to end), which a few long steps (a collection, the machine's
other work) cannot move.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.overhead import _sync, _train, leave_a_core_to_probes, mlp_workload, train_step
from probescope import Monitor, Schedule
from probescope.schedule import Budget, StepTime

MODES = ("off", "attached", "budget", "budget, told per step", "python work")


class Recorded(Budget):
    """A budget that keeps every step it is told."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.told: list[StepTime] = []

    def observe_steps(self, steps) -> None:
        self.told.extend(steps)
        super().observe_steps(steps)


def _flushing() -> bool:
    """Whether this thread flushes denormal floats to zero (torch has a setter, no getter)."""
    return torch.tensor([1e-40]).mul(1.0).item() == 0.0


def _off(w, device: torch.device, steps: int) -> tuple[float, list[float]]:
    """A window without a Monitor: its time per step, and each step's (end to end)."""
    _train(w, None, 20)
    _sync(device)
    ends = [time.perf_counter()]
    _train(w, None, steps, ends=ends)
    _sync(device)
    elapsed = time.perf_counter() - ends[0]
    return elapsed / steps, [b - a for a, b in itertools.pairwise(ends)]


def _python_work(w, device: torch.device, steps: int, seconds: float) -> dict:
    """A window without a Monitor but with ``seconds`` of interpreter work after every step:
    its time per step, each step's time without the work, and the work's mean time."""
    clock = time.perf_counter
    _train(w, None, 20)
    _sync(device)
    t_start = t_last = clock()
    own, work = [], 0.0
    for _ in range(steps):
        train_step(w)
        t = clock()
        own.append(t - t_last)
        end = t + seconds
        while clock() < end:
            pass
        t_last = clock()
        work += t_last - t
    _sync(device)
    return {"step_s": (clock() - t_start) / steps, "steps": own, "work_s": work / steps}


def _monitored(w, device: torch.device, steps: int, schedule, batch: int) -> dict:
    """One window under a Monitor: its time per step, each monitor.step call's time, and the
    schedule's state."""
    calls: list[float] = []
    monitor = Monitor(w.model, w.probes(lambda: schedule), optimizer=w.optimizer, final_frame=False)
    monitor.STEP_BATCH = batch
    monitor.start()
    try:
        _train(w, monitor, 20)
        monitor.drain()
        (name,) = monitor.probes
        written = monitor.ring(name).written
        _sync(device)
        t0 = time.perf_counter()
        _train(w, monitor, steps, calls)
        _sync(device)
        elapsed = time.perf_counter() - t0
        frames = monitor.ring(name).written - written
    finally:
        monitor.close()
    return {"step_s": elapsed / steps, "calls": calls, "frames": frames, "state": schedule.state()}


def account(budget: dict, off_s: float, steps: int, off_median_s: float | None = None) -> dict:
    """What a budget window's slowdown is made of, per step, in seconds; with ``off_median_s``
    (the median step without a Monitor) also how much the median idle step is slower."""
    told = budget["told"]
    idle = [t.step_s for t in told if t.frame is None and t.quiet]
    beside = [t.step_s for t in told if t.frame is not None]
    idle_mean = statistics.fmean(idle) if idle else off_s
    state = budget["state"]
    # monitor.step calls that launched a frame also paid its snapshot: the frames' part.
    own = statistics.median(budget["calls"])
    believed = None
    if state["step_ms"] and state["cost_ms"] is not None:
        believed = (state["own_ms"] + budget["frames"] * state["cost_ms"] / steps) / state["step_ms"]
    return {
        "slowdown": budget["step_s"] / off_s,
        "own_s": own,
        "idle_excess_s": (idle_mean - off_s) * len(idle) / steps,
        "idle_median_excess": (
            statistics.median(idle) / off_median_s - 1.0 if idle and off_median_s else None
        ),
        "frames_s": sum(s - idle_mean for s in beside) / steps,
        "frames": budget["frames"],
        "believed": believed,
        "interval": state["interval"],
        "cost_ms": state["cost_ms"],
    }


def run_round(w, device: torch.device, args) -> dict:
    before, off_steps = _off(w, device, args.steps)
    attached = _monitored(w, device, args.steps, Schedule.never(), Monitor.STEP_BATCH)
    batched = Recorded(args.budget)
    batched_run = _monitored(w, device, args.steps, batched, Monitor.STEP_BATCH)
    per_step = Recorded(args.budget)
    per_step_run = _monitored(w, device, args.steps, per_step, 1)
    work = _python_work(w, device, args.steps, args.work_us * 1e-6)
    after, more = _off(w, device, args.steps)
    off_s, off_median = (before + after) / 2, statistics.median(off_steps + more)
    out = {
        "off": {"step_s": off_s, "median_s": off_median},
        "attached": {"slowdown": attached["step_s"] / off_s},
    }
    out["attached"]["own_s"] = statistics.median(attached["calls"])
    out["python work"] = {
        "slowdown": work["step_s"] / off_s,
        "own_s": work["work_s"],
        "idle_median_excess": statistics.median(work["steps"]) / off_median - 1.0,
    }
    for mode, run, schedule in (
        ("budget", batched_run, batched),
        ("budget, told per step", per_step_run, per_step),
    ):
        # Every step timed is told once, the last ones at close: the window's are the last.
        told = schedule.told[-args.steps :]
        out[mode] = account({**run, "told": told}, off_s, args.steps, off_median)
    return out


def summarise(rounds: list[dict]) -> dict:
    off = statistics.median(r["off"]["step_s"] for r in rounds)
    summary = {"off": {"step_s": off}}
    for mode in MODES[1:]:
        keys = [k for k in rounds[0][mode] if isinstance(rounds[0][mode][k], (int, float))]
        summary[mode] = {
            k: statistics.median(r[mode][k] for r in rounds if r[mode][k] is not None)
            for k in keys
            if any(r[mode][k] is not None for r in rounds)
        }
    return summary


def table(summary: dict) -> str:
    off = summary["off"]["step_s"]
    lines = [
        f"off: {off * 1e3:.3f} ms a step",
        f"{'mode':<22} {'slowdown':>8} {'own µs':>7} {'own':>6} {'idle':>6} {'frames':>6} "
        f"{'sum':>6} {'believed':>8} {'frames n':>8} {'interval':>8} {'idle med':>8}",
    ]
    for mode in MODES[1:]:
        s = summary[mode]
        parts = [s.get("own_s"), s.get("idle_excess_s"), s.get("frames_s")]
        pct = [f"{p / off:>6.1%}" if p is not None else f"{'-':>6}" for p in parts]
        total = f"{sum(parts) / off:>6.1%}" if None not in parts else f"{'-':>6}"
        believed = f"{s['believed']:>8.1%}" if "believed" in s else f"{'-':>8}"
        frames = f"{s['frames']:>8.0f}" if "frames" in s else f"{'-':>8}"
        interval = f"{s['interval']:>8.0f}" if "interval" in s else f"{'-':>8}"
        median = f"{s['idle_median_excess']:>8.1%}" if "idle_median_excess" in s else f"{'-':>8}"
        lines.append(
            f"{mode:<22} {s['slowdown']:>8.3f} {s['own_s'] * 1e6:>7.1f} {' '.join(pct)} {total} "
            f"{believed} {frames} {interval} {median}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.budget_accounting", description=__doc__)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--work-us", type=float, default=20.0, help="the python work mode's work per step")
    parser.add_argument("--denormals", choices=("flush", "keep"), default="flush")
    parser.add_argument("--out", type=Path, help="write the rounds and their medians as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    leave_a_core_to_probes(device)
    flushing = _flushing()
    torch.set_flush_denormal(args.denormals == "flush")
    try:
        w = mlp_workload(device, args.resolution, quick=True)
        rounds = []
        for r in range(args.rounds):
            rounds.append(run_round(w, device, args))
            print(f"round {r + 1}/{args.rounds}: {json.dumps(rounds[-1])}", file=sys.stderr)
    finally:
        torch.set_flush_denormal(flushing)
    summary = summarise(rounds)
    print(table(summary))
    if args.out is not None:
        record = {"args": vars(args) | {"out": str(args.out)}, "rounds": rounds, "summary": summary}
        args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
