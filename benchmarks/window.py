"""What the viewer's window costs a training loop: drawn in a render process, or by the loop.

``python -m benchmarks.window [--steps 10000] [--rounds 3] [--fps 30]`` (needs a display; on
a headless machine ``xvfb-run -a python -m benchmarks.window``): a 2-64-64-7 MLP trains on
blobs (batch 64, SGD, one torch thread) under a Monitor with a GridProbe map every 20 steps, a
PredictionProbe and a LossProbe every 100, three ways, interleaved round by round:

- ``off``: no window;
- ``window``: ``Monitor(viewer=True)``, the window in a render process of its own;
- ``drawn by the loop``: the same window made in the training process and drawn from the
  loop, ``viewer.pump()`` after each step (what ``viewer=True`` did before the render
  process: each redraw, vispy's Python and its GL calls, on the training thread).

Prints the median steps per second of each and its slowdown against ``off``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from probescope import GridProbe, LossProbe, Monitor, PredictionProbe, Schedule
from probescope.datasets import make_dataset

MODES = ("off", "window", "drawn by the loop")


def train(mode: str, steps: int, fps: float, data) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7))
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    probes = [
        GridProbe(data.x_train, data.y_train, resolution=192, schedule=Schedule.every(20)),
        PredictionProbe(data.x_valid, data.y_valid, schedule=Schedule.every(100)),
        LossProbe(schedule=Schedule.every(100)),
    ]
    n = len(data.x_train) - 64
    with Monitor(model, probes, optimizer=opt, viewer=mode == "window", viewer_fps=fps) as monitor:
        viewer = None
        if mode == "drawn by the loop":
            from probescope.viewers.viewer import MonitorSource, Viewer

            viewer = Viewer(MonitorSource(monitor), fps=fps)
            viewer.canvas.show()
        elif mode == "window" and type(monitor.viewer).__name__ != "WindowView":
            raise RuntimeError("the window did not open (no display? run under xvfb-run -a)")
        t0 = time.perf_counter()
        for step in range(steps):
            i = (step * 64) % n
            loss = F.cross_entropy(model(data.x_train[i : i + 64]), data.y_train[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss=loss)
            if viewer is not None:
                viewer.pump()
        seconds = time.perf_counter() - t0
        if viewer is not None:
            viewer.close()
    if monitor.summary()["nonfinite"]:
        raise RuntimeError(f"training diverged: {monitor.summary()['nonfinite']}")
    return steps / seconds


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="python -m benchmarks.window", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fps", type=float, default=30.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = make_dataset("blobs7", seed=0, n=4000)
    train("off", min(args.steps, 300), args.fps, data)  # warm-up
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tqdm(total=args.rounds * len(MODES), desc="window", unit="run") as bar:
        for _ in range(args.rounds):
            for mode in MODES:
                rates[mode].append(train(mode, args.steps, args.fps, data))
                bar.update()
    base = statistics.median(rates["off"])
    print(f"2-64-64-7 MLP, batch 64, {args.steps} steps per run, {args.rounds} rounds, {args.fps:g} fps")
    print(f"{'mode':<18} {'steps/s':>8} {'slowdown':>9}")
    for mode in MODES:
        rate = statistics.median(rates[mode])
        print(f"{mode:<18} {rate:8.0f} {base / rate:8.3f}x")
    return rates


if __name__ == "__main__":
    main()
