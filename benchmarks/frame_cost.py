"""The frames suite: what one GridProbe frame costs a launch-bound training loop, and why.

The overhead suite's MLP steps take 1-2 ms and are bound by the host (Python and kernel
launches), so a frame costs training the host time the probe thread takes from it, more than
GPU time. This suite trains that MLP with a GridProbe (1024² on CUDA, 512² on the CPU) in
variants interleaved round by round on one model: every 10 steps with the frame launched
kernel by kernel (eager) and replayed as one CUDA graph; every 16 and every 20 steps (30-40
frames/s on an H100) replayed, training on the default or a high-priority stream; budgets of
2 % and 5 % with graph frames; and an empty probe every 20 steps (the Monitor's own share:
snapshot copy, hand-off, ring). Every window with probes follows a window with probes off
(paired), five rounds. Per variant: the slowdown (median of the pairs' ratios), frames/s,
probe latency.
"""

from __future__ import annotations

import torch

from benchmarks.overhead import Mode, leave_a_core_to_probes, measure_modes, mlp_workload
from probescope import Probe, Schedule


def variants(device: torch.device) -> dict[str, Mode | None]:
    if device.type != "cuda":  # no graphs, no streams: the CPU's thread path
        return {
            "off": None,
            "every 10": Mode(lambda: Schedule.every(10)),
            "every 20": Mode(lambda: Schedule.every(20)),
            "budget 5%": Mode(lambda: Schedule.budget(0.05)),
        }
    eager, graphs = {"cuda_graphs": False}, {"cuda_graphs": True}
    high = {"cuda_graphs": True, "high_priority_training": True}
    return {
        "off": None,
        "every 10, eager": Mode(lambda: Schedule.every(10), eager),
        "every 10, graph": Mode(lambda: Schedule.every(10), graphs),
        "every 16, graph": Mode(lambda: Schedule.every(16), graphs),
        "every 20, graph": Mode(lambda: Schedule.every(20), graphs),
        "every 20, graph, high-priority training": Mode(lambda: Schedule.every(20), high),
        "every 20, empty probe": Mode(lambda: Schedule.every(20), graphs, _empty),
        "budget 2%, graph": Mode(lambda: Schedule.budget(0.02), graphs),
        "budget 5%, graph": Mode(lambda: Schedule.budget(0.05), graphs),
    }


def _empty(schedule):
    return [EmptyProbe(schedule=schedule())]


class EmptyProbe(Probe):
    """A probe whose frame is empty: what is left is the Monitor's own cost per frame."""

    kind = "empty"

    def evaluate(self, model, context):
        return {}


def run(device: torch.device, quick: bool, peaks: dict):
    leave_a_core_to_probes(device)
    w = mlp_workload(device, 512 if quick or device.type != "cuda" else 1024, quick)
    results = measure_modes(w, device, rounds=5, modes=variants(device), paired=True)
    yield {"op": "frame cost", "case": w.name, "results": results, "ours": "off", "reference": "off"}


def count(device: torch.device, quick: bool) -> int:
    return 1
