"""What one GridProbe frame costs the probe thread, from the model to the ring, three ways.

``python -m benchmarks.grid_frame [--device cpu|cuda] [--rounds 7] [--sizes 512,1024,2048]``

Per grid size and MLP, in rounds that take the variants in turn on the same probe and model:

- ``ring slot``: as the Monitor makes a frame, the kernels writing probabilities and colours
  straight into the ring's next slot, the finiteness check one min-max pass;
- ``copied``: the kernels writing into tensors of their own, which the ring copies into its slot;
- ``copied, f64 check``: that, with the finiteness check a float64 sum (probescope before
  2026-11-24).

The frames of the three are checked equal before timing. Median milliseconds per frame
(evaluation and ring write; on CUDA up to the host copy the ring makes) and each variant's
time over the ``ring slot`` one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.timing import device_name
from probescope import GridProbe
from probescope.probes import grid as grid_module
from probescope.probes.base import ProbeContext, all_finite
from probescope.ring import FrameRing

VARIANTS = ("ring slot", "copied", "copied, f64 check")
MLPS = ((2, 32, 32, 3), (2, 64, 64, 7))


def _f64_check(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t.sum(dtype=torch.float64))


def mlp(widths: tuple[int, ...], device: torch.device) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device)


class Frames:
    """One probe and model, a ring per variant; ``frame(variant)`` makes and stores one frame."""

    def __init__(self, widths: tuple[int, ...], resolution: int, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.model = mlp(widths, device).eval()
        data = torch.randn(500, 2)
        self.probe = GridProbe(data, torch.randint(0, widths[-1], (500,)), resolution=resolution)
        self.probe.attach(self.model)
        self.rings = {v: FrameRing("grid", capacity=4) for v in VARIANTS}
        self.device, self.step = device, 0

    def frame(self, variant: str) -> None:
        ring = self.rings[variant]
        context = ProbeContext(self.step, 0, claim=ring.claim if variant == "ring slot" else None)
        grid_module.all_finite = _f64_check if variant.endswith("f64 check") else all_finite
        try:
            with torch.no_grad():
                ring.write(self.probe.evaluate(self.model, context), self.step, 0)
        finally:
            grid_module.all_finite = all_finite
        self.step += 1

    def check(self) -> None:
        """Every variant's frame is the same map."""
        for variant in VARIANTS:
            self.frame(variant)
        frames = [self.rings[v].latest().data for v in VARIANTS]
        for other in frames[1:]:
            np.testing.assert_array_equal(other["probs"], frames[0]["probs"])
            np.testing.assert_array_equal(other["rgba"], frames[0]["rgba"])


def measure(widths: tuple[int, ...], resolution: int, device: torch.device, rounds: int) -> list[dict]:
    frames = Frames(widths, resolution, device)
    frames.check()
    for variant in VARIANTS:  # warm: every slot of every ring allocated
        for _ in range(frames.rings[variant].capacity):
            frames.frame(variant)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            frames.frame(variant)  # the ring's host copy waits for the frame's kernels
            times[variant].append(time.perf_counter() - t0)
    base = statistics.median(times["ring slot"])
    case = f"{'-'.join(map(str, widths))} at {resolution}²"
    return [
        {
            "case": case,
            "variant": v,
            "median_ms": statistics.median(times[v]) * 1e3,
            "min_ms": min(times[v]) * 1e3,
            "over_ring_slot": statistics.median(times[v]) / base,
            "rounds": rounds,
        }
        for v in VARIANTS
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.grid_frame", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", default="512,1024,2048", help="grid sizes per axis, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"{device_name(device)} · torch {torch.__version__} · {args.rounds} rounds")
    print(f"| {'case':24} | {'variant':18} | median ms | min ms | over ring slot |")
    for widths in MLPS:
        for size in (int(s) for s in args.sizes.split(",")):
            for row in measure(widths, size, device, args.rounds):
                rows.append(row)
                print(
                    f"| {row['case']:24} | {row['variant']:18} | {row['median_ms']:9.2f} | "
                    f"{row['min_ms']:6.2f} | {row['over_ring_slot']:13.3f}x |",
                    flush=True,
                )
    if args.out is not None:
        meta = {"device": device_name(device), "torch": torch.__version__, "rounds": args.rounds}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
