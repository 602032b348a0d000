"""What sending a run to TensorBoard costs a fast CPU training loop.

``python -m benchmarks.sinks [--steps 3000] [--rounds 3] [--resolution 64]``: a 2-64-64-7 MLP
trains on blobs (batch 64, SGD, one torch thread, a few thousand steps a second: the loop that
feels any per-step cost most) under a Monitor with a GridProbe map every 100 steps and a
LossProbe every 500, four ways, interleaved round by round so the machine's drift falls on
all of them alike:

- ``off``: no TensorBoard;
- ``sink``: ``TensorBoardSink`` (every batch loss, each frame's numbers, each map as an image,
  written on the recorder thread through probescope's event file);
- ``library sink``: the same sink writing through torch's ``SummaryWriter`` (tensorboard's
  writer, whose checksums run in pure Python on its writer thread);
- ``in the loop``: what a plain loop does, ``SummaryWriter.add_scalar("loss", loss.item(),
  step)`` on the training thread at every step (the loss scalars only).

Prints the median steps per second of each and its slowdown against ``off``, and what one
checksum of a 100 kB record (an image's) costs tensorboard's writer (pure Python) and
probescope's event file (google-crc32c).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from probescope import GridProbe, LossProbe, Monitor, Schedule
from probescope.datasets import make_dataset
from probescope.sinks import TensorBoardSink


class LibrarySink(TensorBoardSink):
    """TensorBoardSink writing through torch's SummaryWriter instead of its own event file."""

    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(log_dir)  # (its own event file is made at a first event, which never comes)
        self._writer = SummaryWriter(str(log_dir))

    def _add_scalar(self, tag, step, value):
        self._writer.add_scalar(tag, value, step)

    def _image(self, tag, step, rgba):
        self._writer.add_image(tag, rgba, step, dataformats="HWC")

    def close(self):
        self._writer.close()


def train(mode: str, steps: int, resolution: int, folder: Path) -> float:
    """Steps per second of one training run under ``mode``."""
    torch.manual_seed(0)
    data = make_dataset("blobs7", seed=0)
    x, y = data.x_train, data.y_train
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    probes = [
        GridProbe(x, y, resolution=resolution, schedule=Schedule.every(100)),
        LossProbe(schedule=Schedule.every(500)),
    ]
    sinks = {"sink": [TensorBoardSink(folder)], "library sink": [LibrarySink(folder)]}.get(mode, [])
    in_loop = None
    if mode == "in the loop":
        from torch.utils.tensorboard import SummaryWriter

        in_loop = SummaryWriter(str(folder))
    with Monitor(model, probes, sinks=sinks) as monitor:
        start = time.perf_counter()
        for step in range(steps):
            i = (step * 64) % (x.shape[0] - 64)
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss=loss)
            if in_loop is not None:
                in_loop.add_scalar("loss/train_loss", loss.item(), step + 1)
        elapsed = time.perf_counter() - start
    if in_loop is not None:
        in_loop.close()
    if mode != "off":
        check(folder, steps)
    return steps / elapsed


def check(folder: Path, steps: int) -> None:
    """Every batch loss reached the event files (a sink that failed would be dropped, with a
    warning, and then cost nothing)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    written = [e.step for e in events.Scalars("loss/train_loss")]
    if written != list(range(1, steps + 1)):
        raise RuntimeError(f"{folder.name}: {len(written)} of {steps} batch losses in the event files")


def checksum_ms(nbytes: int = 100_000, repeats: int = 3) -> dict[str, float]:
    """Median milliseconds of one masked CRC-32C of ``nbytes``: tensorboard's, probescope's."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from probescope.sinks import _masked_crc

    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    times = {}
    for name, crc in (("tensorboard (pure Python)", masked_crc32c), ("google-crc32c", _masked_crc)):
        if crc(data) != _masked_crc(data):
            raise RuntimeError(f"{name}: a different checksum")
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            crc(data)
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs) * 1e3
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sinks", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modes = ("off", "sink", "library sink", "in the loop")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for mode in modes:
                folder = Path(tmp) / f"{mode.replace(' ', '-')}-{round_}"
                rates[mode].append(train(mode, args.steps, args.resolution, folder))
    base = statistics.median(rates["off"])
    print(f"{args.steps} steps x {args.rounds} rounds, map {args.resolution}², one torch thread")
    print(f"{'mode':<14} {'steps/s':>9} {'slowdown':>9}")
    for mode in modes:
        rate = statistics.median(rates[mode])
        print(f"{mode:<14} {rate:>9.0f} {base / rate:>9.3f}")
    for name, ms in checksum_ms().items():
        print(f"checksum of 100 kB, {name}: {ms:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
