"""What a long export costs drawn in one process and in worker processes.

``python -m benchmarks.export [--frames 60] [--interpolate 3] [--jobs 1 2] [--rounds 2]``: a
2-64-64-7 MLP trains on blobs7 with a GridProbe map (128 x 128) every 5 steps until it holds
``--frames`` frames; then its MP4 and GIF are exported with ``--interpolate`` pictures between
recorded frames (``export_run``, 768 x 512), once per ``--jobs`` value and round, the values
taken in turn round by round so the machine's drift falls on all of them alike. Worker
processes are started inside each timed export (their start is part of its cost).

Prints each value's median seconds and pictures a second, its speed-up over one process, and
checks that every export wrote the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from probescope import GridProbe, Monitor, Schedule, open_run
from probescope.datasets import make_dataset
from probescope.export import export_run


def record_run(frames: int, folder: Path) -> Path:
    """A run whose GridProbe holds ``frames`` frames."""
    torch.manual_seed(0)
    data = make_dataset("blobs7", seed=0)
    x, y = data.x_train, data.y_train
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = GridProbe(x, y, resolution=128, schedule=Schedule.every(5))
    run_dir = folder / "run"
    with Monitor(model, [probe], run_dir=run_dir, final_frame=False) as monitor:
        for step in range(5 * (frames - 1)):
            i = (step * 64) % (x.shape[0] - 64)
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss=loss)
            monitor.drain()  # every due frame, none skipped
    return run_dir


def digest(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--interpolate", type=int, default=3)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = open_run(record_run(args.frames, folder))
        grid = run.probe("grid")
        pictures = len(grid) + (len(grid) - 1) * args.interpolate
        print(f"{len(grid)} frames, {pictures} pictures with {args.interpolate} between each pair")
        seconds: dict[int, list[float]] = {jobs: [] for jobs in args.jobs}
        digests: set[str] = set()
        for round_ in range(args.rounds):
            for jobs in args.jobs:
                out = folder / f"out-{jobs}-{round_}"
                start = time.perf_counter()
                files = export_run(
                    run, out, ["mp4", "gif"], probes=["grid"], interpolate=args.interpolate, jobs=jobs
                )
                seconds[jobs].append(time.perf_counter() - start)
                digests.add(digest(files["grid"]))
        if len(digests) != 1:
            raise RuntimeError(f"the exports wrote {len(digests)} different sets of files")
        base = statistics.median(seconds[args.jobs[0]])
        print(f"{'jobs':>5} {'seconds':>8} {'pictures/s':>11} {'speed-up':>9}")
        for jobs, times in seconds.items():
            median = statistics.median(times)
            print(f"{jobs:>5} {median:>8.2f} {pictures / median:>11.1f} {base / median:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
