"""What work on the probe thread costs a Python-bound training loop on the CPU (a diagnostic).

``python -m benchmarks.contention [--seconds 6] [--period 0.1] [--resolution 256] [--only NAME]``:
a 2-64-64-7 MLP trains (batch 64, Adam, one torch thread: a step of ~0.5-1 ms that holds the GIL
nearly all the time, as a framework's loop does) while a probe worker thread (one torch and one
Numba thread, as the Monitor sets it up) alternates between ``period`` seconds of one kind of
work, call after call, and ``period`` seconds of rest. Every step is labelled by the phase it ran
in from start to end (steps across a phase change are dropped), so the on and off steps come from
the same seconds and this machine's drift (±25 % between runs of a minute) falls out of the
comparison. Per kind of work: a call's own time, the median step off and on, and what one call
costs training: the training time lost in the on phases (their length x (1 - off/on step time,
means)) divided by the calls made in them.

What it separates: time the probe thread holds the GIL (pure Python: training loses all of it)
from time it runs GIL-free kernels (a long Numba or torch call: training loses next to nothing)
and from handing the GIL back and forth (each short GIL-free call ends in a GIL request that
the training thread, asking for the GIL at every torch call, pays for).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from probescope import GridProbe, LossProbe
from probescope.datasets import make_dataset
from probescope.history import History
from probescope.kernels import GridSpec, grid_mlp
from probescope.probes.base import ProbeContext
from probescope.ring import Frame
from probescope.run import RunWriter
from probescope.worker import ProbeWorker


@dataclass
class Contention:
    """One kind of work beside the loop: its calls, and the loop's steps off and on."""

    calls: int
    call_s: float  # a call's own mean time on the probe thread
    on_s: float  # total length of the on phases
    off_steps: list[float]
    on_steps: list[float]

    @property
    def ratio(self) -> float:
        """Median step on / median step off."""
        return statistics.median(self.on_steps) / statistics.median(self.off_steps)

    def row(self, name: str) -> str:
        """A row of the table under :func:`header`."""
        off, on = statistics.median(self.off_steps), statistics.median(self.on_steps)
        return (
            f"| {name} | {self.call_s * 1e3:.3f} | {off * 1e3:.3f} | {on * 1e3:.3f} | {self.ratio:.3f} "
            f"| {self.cost_per_call_s * 1e3:.3f} |"
        )

    @property
    def cost_per_call_s(self) -> float:
        """Training time lost per call: the on phases' length x the share of it lost, per call."""
        lost = self.on_s * (1.0 - statistics.fmean(self.off_steps) / statistics.fmean(self.on_steps))
        return lost / max(self.calls, 1)


class Alternating:
    """A probe worker thread that alternates ``period`` seconds of calling ``work`` (call after
    call) with ``period`` seconds of rest, while the ``with`` block runs.

    ``phase`` is odd while work runs; it changes only between calls, so a step that saw the
    same phase when it started and when it ended ran entirely beside work or entirely without.
    """

    def __init__(self, work: Callable[[], object], period: float):
        self.work, self.period = work, period
        self.phase = 0
        self.calls = 0
        self.busy_s = 0.0  # the calls' own time
        self.on_s = 0.0  # total length of the on phases
        self._stop = threading.Event()
        self._worker: ProbeWorker | None = None

    def __enter__(self) -> Alternating:
        self.work()  # compiled and warm before timing
        self._worker = ProbeWorker(threads=1)  # the probe thread's own torch and Numba settings
        self._worker.submit(self._alternate)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._worker.close()

    def _alternate(self) -> None:
        while not self._stop.is_set():
            start = now = time.perf_counter()
            end = start + self.period
            self.phase += 1
            while now < end:
                self.work()
                self.calls += 1
                after = time.perf_counter()
                self.busy_s += after - now
                now = after
            self.phase += 1
            self.on_s += now - start
            self._stop.wait(self.period)

    def result(self, ticks: list[tuple[float, int]]) -> Contention:
        """The steps between consecutive ``(time, phase)`` ticks (one at the end of each step),
        sorted by :func:`by_phase`, with this worker's calls."""
        off, on = by_phase(ticks)
        return Contention(self.calls, self.busy_s / max(self.calls, 1), self.on_s, off, on)


def by_phase(ticks: list[tuple[float, int]]) -> tuple[list[float], list[float]]:
    """The durations of the steps between consecutive ``(time, phase)`` ticks, off (even
    phase) and on (odd); a step across a phase change counts as neither, nor does one next to
    a tick of negative phase (a pause that is no step, such as a framework's epoch end)."""
    off: list[float] = []
    on: list[float] = []
    for (t0, p0), (t1, p1) in itertools.pairwise(ticks):
        if p0 == p1 >= 0:
            (on if p0 % 2 else off).append(t1 - t0)
    if not on or not off:
        raise RuntimeError(f"contention: too few steps in a phase ({len(off)} off, {len(on)} on)")
    return off, on


def header(loop: str) -> str:
    return (
        f"| beside {loop} | call ms | step ms off | step ms on | on / off (medians) "
        "| training ms lost per call |\n|---|---|---|---|---|---|"
    )


def measure(
    work: Callable[[], object], step: Callable[[], object], *, seconds: float, period: float
) -> Contention:
    """Run ``step`` for ``seconds`` beside :class:`Alternating` ``work``."""
    with Alternating(work, period) as alternating:
        ticks = [(time.perf_counter(), alternating.phase)]
        deadline = ticks[0][0] + seconds
        while ticks[-1][0] < deadline:
            step()
            ticks.append((time.perf_counter(), alternating.phase))
    return alternating.result(ticks)


def training_step() -> Callable[[], None]:
    """One optimizer step of a 2-64-64-7 MLP on a batch of 64 (torch's own ops, one thread)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(64, 2), torch.randint(0, 7, (64,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


@numba.njit(nogil=True, fastmath=True, cache=True)
def _spin(values, n):
    """``n`` rounds of 64 multiply-adds in registers: GIL-free work of a chosen length."""
    acc = np.zeros(64, np.float32)
    for _ in range(n):
        for j in range(64):
            acc[j] = acc[j] * values[j] + values[j]
    return acc.sum()


def _python_then_sleep(seconds: float, sleep: float) -> None:
    """``seconds`` of pure Python (the GIL held), then ``sleep`` (released), as a probe's glue
    before and after its kernels."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(i * i for i in range(100))
    time.sleep(sleep)


def works(resolution: int, history_steps: int) -> dict[str, Callable[[], object]]:
    """The kinds of work, built lazily (each returns a zero-argument callable)."""
    data = make_dataset("blobs7", seed=0)

    def model() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7)
        ).eval()

    def spin(ms: float):
        values = np.full(64, 0.999, np.float32)
        _spin(values, 10)
        t0 = time.perf_counter()
        _spin(values, 100_000)
        rounds = max(1, int(100_000 * ms * 1e-3 / (time.perf_counter() - t0)))
        return lambda: _spin(values, rounds)

    def fused_grid():
        m, grid = model(), GridSpec.rectangle((-3.0, 3.0, -3.0, 3.0), resolution, resolution)
        return lambda: grid_mlp(m, grid)

    def matmul():
        a = torch.randn(512, 512)
        return lambda: a @ a

    def grid_frame(written: str | None):
        m, probe = model(), GridProbe(data.x_train, data.y_train, resolution=resolution)
        probe.attach(m)
        return _frame(probe, m, ProbeContext(0, 0, {}), written)

    def loss_frame(written: str | None):
        history = History()
        rng = np.random.default_rng(0)
        for s in range(history_steps):
            history.append(History.BATCH_LOSS, s + 1, s // 75, float(rng.random()))
            if s % 75 == 74:
                history.append("valid_loss", s + 1, s // 75, float(rng.random()))
        probe = LossProbe()
        context = functools.partial(lambda h: ProbeContext(0, 0, read=h.read), history)
        return _frame(probe, None, context, written)

    return {
        "pure Python 1 ms (holds the GIL), 4 ms asleep": lambda: functools.partial(
            _python_then_sleep, 1e-3, 4e-3
        ),
        "Numba, 0.1 ms calls (GIL released)": lambda: spin(0.1),
        "Numba, 1 ms calls": lambda: spin(1.0),
        "Numba, 20 ms calls": lambda: spin(20.0),
        f"fused grid kernel {resolution}²": fused_grid,
        "torch matmul 512²": matmul,
        f"GridProbe {resolution}² frame": lambda: grid_frame(None),
        f"GridProbe {resolution}² frame, written": lambda: grid_frame("ours"),
        f"GridProbe {resolution}² frame, written by np.savez": lambda: grid_frame("np.savez"),
        f"LossProbe frame ({history_steps} steps)": lambda: loss_frame(None),
        f"LossProbe frame ({history_steps} steps), written": lambda: loss_frame("ours"),
        f"LossProbe frame ({history_steps} steps), written by np.savez": lambda: loss_frame("np.savez"),
    }


def _frame(probe, model, context, written: str | None) -> Callable[[], object]:
    """A probe's frame as the Monitor makes it: evaluate, and with ``written`` its npz too,
    written by the recorder's writer (``"ours"``) or by ``np.savez`` (the naive way)."""
    folder = tempfile.TemporaryDirectory(prefix="probescope-contention-")
    writer = RunWriter(folder.name)
    writer.add_probe(probe.name, probe.kind, {}, {})
    if written == "np.savez":  # the same files in the same folder, through np.savez
        writer.write_arrays = lambda f, arrays: np.savez(f, **arrays)
    seq = [0]

    def frame() -> None:
        ctx = context() if callable(context) else context
        data = probe.evaluate(model, ctx)
        if written:
            arrays = {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
            writer.write_frame(Frame(probe.name, seq[0], 0, 0, time.time(), arrays))
            seq[0] += 1  # new files, as in a run (replacing old ones would free their pages too)

    frame.folder = folder  # kept alive with the callable
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.contention", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="per kind of work")
    parser.add_argument("--period", type=float, default=0.1, help="seconds on, then seconds off")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--history", type=int, default=10_000, help="steps in the LossProbe's history")
    parser.add_argument("--only", action="append", help="run the kinds of work whose name contains this")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    step = training_step()
    for _ in range(50):
        step()
    print(header("the loop"))
    for name, build in works(args.resolution, args.history).items():
        if args.only and not any(o in name for o in args.only):
            continue
        result = measure(build(), step, seconds=args.seconds, period=args.period)
        print(result.row(name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
