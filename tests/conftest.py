"""Shared fixtures: small generated data, small models, and a recording probe."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

# Before any Triton kernel module is imported: without a GPU, Triton kernels run in its
# interpreter on CPU tensors, so the CPU suite still holds them to the references.
if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
from torch import nn

from probescope import Probe, Schedule
from tests.kernel_cases import poisoned  # noqa: F401  (a fixture for every test module)


@pytest.fixture
def blobs():
    from probescope.datasets import make_dataset

    return make_dataset("blobs7", seed=3, n=700)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 7))


class RecordingProbe(Probe):
    """Records the step of every evaluation; can block until released, or raise."""

    kind = "recording"

    def __init__(self, *, schedule=None, name=None, block: threading.Event | None = None, raise_at=None):
        super().__init__(name=name, schedule=schedule or Schedule.every(1))
        self.steps: list[int] = []
        self.block, self.raise_at = block, raise_at
        self.started = threading.Event()

    def evaluate(self, model, context):
        self.started.set()
        if self.block is not None:
            assert self.block.wait(10), "test never released the probe"
        if self.raise_at is not None and context.step >= self.raise_at:
            raise RuntimeError("probe exploded")
        self.steps.append(context.step)
        return {"step": np.int64(context.step)}


class WrappedModule(nn.Module):
    """A model behind a custom forward that is not a chain of layers (the ``+ 0.0``: an
    operation of its own), so grids take the fallback path through its forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 0.0


@pytest.fixture
def recording_probe():
    return RecordingProbe


def train_steps(monitor, model, x, y, steps: int, *, batch: int = 50, wait: bool = True, epoch_every=None):
    """Plain SGD steps under ``monitor``; ``wait`` lets the probe worker finish after each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if wait:
        monitor._worker.wait_idle(10)  # the step-0 frames, taken at start()
    for s in range(steps):
        i = (s * batch) % max(1, x.shape[0] - batch)
        loss = nn.functional.cross_entropy(model(x[i : i + batch]), y[i : i + batch])
        _sgd_step(monitor, optimizer, loss, wait)
        if epoch_every and (s + 1) % epoch_every == 0:
            monitor.end_epoch()
            if wait:
                monitor._worker.wait_idle(10)


def regression_steps(monitor, model, x, y, steps: int, *, output: int = 0, lr: float = 0.1):
    """Full-batch SGD steps under ``monitor`` fitting output ``output`` of ``model`` to ``y``
    (the worker finishes after each step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    monitor._worker.wait_idle(10)
    for _ in range(steps):
        _sgd_step(monitor, optimizer, nn.functional.mse_loss(model(x)[:, output], y), True)


def _sgd_step(monitor, optimizer, loss, wait: bool) -> None:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    monitor.step(loss=loss.detach())
    if wait:
        monitor._worker.wait_idle(10)


def fit_curve(monitor, model, x, y, steps: int, *, wait: bool = True):
    """Full-batch gradient descent on MSE for a 1-feature model under ``monitor``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        _sgd_step(monitor, optimizer, nn.functional.mse_loss(model(x[:, None])[:, 0], y), wait)


def record_blobs_run(path, *, grid_every: int, other_every: int, steps: int, epoch_every: int):
    """A recorded run of a small MLP on blobs7 with a GridProbe, a PredictionProbe and a
    LossProbe; returns the run directory."""
    from probescope import GridProbe, LossProbe, Monitor, PredictionProbe
    from probescope.datasets import make_dataset

    data = make_dataset("blobs7", seed=1, n=400)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 7))
    probes = [
        GridProbe(data.x_train, data.y_train, resolution=24, schedule=Schedule.every(grid_every)),
        PredictionProbe(data.x_valid, data.y_valid, schedule=Schedule.every(other_every)),
        LossProbe(schedule=Schedule.every(other_every)),
    ]
    with Monitor(model, probes, run_dir=path) as monitor:
        train_steps(monitor, model, data.x_train, data.y_train, steps, epoch_every=epoch_every)
    return path


#: What torch 2.13's gloo prints when a rank's process aborts at exit, after the job's work and
#: its ranks' final barrier, now and then (plain DDP without probescope too): a C++ thread of
#: the process group destroyed while still joinable.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def torchrun(script: Path, *args: str, ranks: int = 2, timeout: float = 300.0, attempts: int = 2):
    """Run ``script`` under ``torch.distributed.run`` on ``ranks`` CPU processes, on a free
    port, in a fresh folder beside it per attempt (its working directory); the completed
    process and that folder. An attempt that fails only by gloo's abort at exit
    (``GLOO_EXIT_ABORT``) is run again, in a folder of its own, up to ``attempts`` times."""
    for attempt in range(attempts):
        folder = script.parent / f"attempt{attempt}"
        folder.mkdir()
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
        command = [*launch, "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", str(script), *args]
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 or GLOO_EXIT_ABORT not in done.stderr:
            break
    return done, folder


@contextlib.contextmanager
def gloo_exit_abort_allowed():
    """Around spawned ranks (Lightning's ``ddp_spawn``) whose work the test checks after: a
    rank killed by SIGABRT (torch 2.13 gloo's abort at exit, ``GLOO_EXIT_ABORT``) passes, any
    other failure does not. The test's own checks of the finished run tell whether the abort
    came after the work."""
    import torch.multiprocessing as mp

    try:
        yield
    except mp.ProcessExitedException as err:
        if err.exit_code != -signal.SIGABRT:
            raise
