"""Wrapped and distributed models: probes run the module inside the wrappers, one rank probes.

The two-rank tests start real processes with torch.distributed's gloo backend (CPU), so they
hold the Monitor to what a ``torchrun`` job does: every rank runs the same script.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import probescope as ps
from probescope.distributed import sharding

STEPS = 12


def run_ranks(fn, tmp_path: Path, *args, world: int = 2, timeout: float = 120.0) -> list[dict]:
    """Run ``fn(rank, world, store, out, *args)`` in ``world`` processes joined by a gloo
    process group; each writes ``out/rank<r>.json``, returned in rank order. A rank that
    hangs (a collective the others never join) fails the test instead of hanging it."""
    out = tmp_path / "out"
    out.mkdir()
    context = mp.start_processes(
        fn,
        args=(world, str(tmp_path / "store"), str(out), *args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"a rank still ran after {timeout:.0f} s (a collective that not every rank joined?)")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _join(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _leave() -> None:
    """Leave the group together: a rank that tears gloo down while its peer still works aborts
    at exit now and then (torch 2.13's gloo threads outlive the interpreter: "terminate called
    without an active exception", in plain DDP too), so the ranks meet first; a rank that
    failed before it came makes the barrier raise after 60 s instead of hanging."""
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    finally:
        dist.destroy_process_group()


def _ddp_job(rank: int, world: int, store: str, out: str, probe_rank: int) -> None:
    """One rank of a DDP job with every probe kind, the same script on every rank."""
    _join(rank, world, store)
    try:
        torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
        model = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        # broadcast_buffers (the default): every forward of the wrapper broadcasts BatchNorm's
        # statistics from rank 0, a collective that a probe on one rank would start alone.
        ddp = nn.parallel.DistributedDataParallel(model)
        forwards = []
        wrapped_forward = nn.parallel.DistributedDataParallel.forward

        def counting_forward(self, *args, **kwargs):
            forwards.append(threading.current_thread().name)
            return wrapped_forward(self, *args, **kwargs)

        nn.parallel.DistributedDataParallel.forward = counting_forward
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as in DDP
        x = torch.randn(400, 2, generator=g)
        y = torch.randint(0, 3, (400,), generator=g)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        probes = [
            ps.GridProbe(x, y, resolution=24, schedule=ps.Schedule.every(2)),
            ps.PredictionProbe(x[:40], y[:40], schedule=ps.Schedule.budget(0.5, start=2)),
            ps.StatsProbe(["0", "3"], batch=x[:32], schedule=ps.Schedule.every(3)),  # the inner names
            ps.LossProbe(),
        ]
        threads_before = threading.active_count()
        monitor = ps.Monitor(
            ddp, probes, optimizer=optimizer, run_dir=Path(store).parent / "run", probe_rank=probe_rank
        )
        with monitor:
            threads_during = threading.active_count()
            for step in range(STEPS):
                i = (step * 32) % 368
                loss = nn.functional.cross_entropy(ddp(x[i : i + 32]), y[i : i + 32])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                monitor.step(loss=loss)
        latest = monitor.latest("grid")  # after close: the final frame is of the last step
        summary = monitor.summary()
        result = {
            "probing": monitor.probing,
            "summary": summary,
            "probes": sorted(monitor.probes),
            "model_is_inner": monitor.model is model,
            "wrappers": monitor.wrappers,
            "snapshot_bytes": monitor.snapshot_bytes,
            "latest_step": None if latest is None else latest.step,
            "threads_added": threads_during - threads_before,
            "forwards": forwards,
            "params": [p.detach().double().sum().item() for p in model.parameters()],
            "state_keys": sorted(model.state_dict()),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        _leave()


@pytest.mark.parametrize("probe_rank", [0, 1])
def test_one_rank_of_a_ddp_job_probes_and_the_others_do_nothing(tmp_path, probe_rank):
    results = run_ranks(_ddp_job, tmp_path, probe_rank)
    prober, other = results[probe_rank], results[1 - probe_rank]
    assert prober["probing"] and not other["probing"]

    # The probing rank: every probe ran on the module inside the wrapper, none failed.
    assert prober["model_is_inner"] and prober["wrappers"] == ["DistributedDataParallel"]
    assert prober["probes"] == ["grid", "loss", "prediction", "stats"]
    for name, counters in prober["summary"]["probes"].items():
        assert counters["failed"] == 0 and counters["frames"] >= 2, (name, counters)
    assert prober["latest_step"] == STEPS  # the final frame
    assert prober["snapshot_bytes"] > 0 and prober["threads_added"] >= 1

    # The other rank: no probe, no frame, no copy, no thread.
    assert other["probes"] == [] and other["summary"]["probes"] == {}
    assert other["latest_step"] is None and other["snapshot_bytes"] == 0
    assert other["threads_added"] == 0
    assert other["summary"]["steps"] == STEPS

    # No probe called the DDP wrapper's forward: only training did, once a step, on each rank.
    for r in results:
        assert r["forwards"] == ["MainThread"] * STEPS
    # DDP kept the replicas equal.
    np.testing.assert_allclose(results[0]["params"], results[1]["params"], rtol=0, atol=1e-6)

    # One run directory, written by the probing rank only, with the inner module's names.
    run = ps.open_run(tmp_path / "run")
    assert run.meta["distributed"] == {"rank": probe_rank, "world_size": 2, "backend": "gloo"}
    assert run.meta["model"]["wrappers"] == ["DistributedDataParallel"]
    assert sorted(torch.load(tmp_path / "run" / "model.pt")) == prober["state_keys"]
    assert len(list(run.probe("grid").frames())) == prober["summary"]["probes"]["grid"]["frames"]
    stats = run.probe("stats").table()
    assert any(c.startswith("act/0/") for c in stats.columns) and any(
        c.startswith("act/3/") for c in stats.columns
    )


def _sharded_job(rank: int, world: int, store: str, out: str) -> None:
    _join(rank, world, store)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        found = {}
        fsdp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
        fully_shard(fsdp)
        found["fsdp2"] = sharding(fsdp)
        try:
            ps.Monitor(fsdp, [ps.LossProbe()])
        except ValueError as err:
            found["refused"] = str(err)
        mesh = init_device_mesh("cpu", (world,))
        tensor_parallel = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        weight = tensor_parallel[0].weight
        tensor_parallel[0].weight = nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0)]))
        found["dtensor"] = sharding(tensor_parallel)
        found["plain"] = sharding(nn.Sequential(nn.Linear(2, 3)))
        Path(out, f"rank{rank}.json").write_text(json.dumps(found))
    finally:
        _leave()


def test_sharded_models_are_refused_on_every_rank_with_the_reason(tmp_path):
    for found in run_ranks(_sharded_job, tmp_path):
        assert "fully_shard" in found["fsdp2"]
        assert (
            "sharded across the job's 2 ranks" in found["refused"]
            and "DistributedDataParallel" in found["refused"]
        )
        assert "'0.weight' is a DTensor" in found["dtensor"]
        assert found["plain"] is None


# ---- wrappers in one process --------------------------------------------------------------


def _grid_frame(model, blobs, tmp_path, name):
    x, y = blobs.x_train, blobs.y_train
    with ps.Monitor(
        model, [ps.GridProbe(x, y, resolution=20)], snapshot="sync", run_dir=tmp_path / name
    ) as m:
        pass
    return m, m.latest("grid").data


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "both"])
def test_wrapped_models_are_probed_through_the_module_inside(tmp_path, mlp, blobs, wrap):
    wrapped = {
        "compile": lambda m: torch.compile(m),
        "data_parallel": lambda m: nn.DataParallel(m),
        "both": lambda m: torch.compile(nn.DataParallel(m)),
    }[wrap](mlp)
    _, plain = _grid_frame(mlp, blobs, tmp_path, "plain")
    monitor, frame = _grid_frame(wrapped, blobs, tmp_path, "wrapped")
    assert monitor.model is mlp
    expected = {"compile": ["OptimizedModule"], "data_parallel": ["DataParallel"]}
    assert monitor.wrappers == expected.get(wrap, ["OptimizedModule", "DataParallel"])
    assert frame.keys() == plain.keys()
    for key in plain:
        np.testing.assert_array_equal(frame[key], plain[key], err_msg=key)
    # model.pt holds the inner module's state_dict: it loads into the model as defined.
    state = torch.load(tmp_path / "wrapped" / "model.pt")
    nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 7)).load_state_dict(state)


def test_hook_patterns_name_the_module_inside_the_wrapper(mlp, blobs):
    probe = ps.StatsProbe("0", batch=blobs.x_train[:16])
    with ps.Monitor(nn.DataParallel(mlp), [probe], snapshot="sync") as monitor:
        pass
    assert monitor.stats["stats"].failed == 0
    assert probe.parameters == ["0.weight", "0.bias"] and probe.modules == ["0"]


@pytest.mark.parametrize("probe_rank", [1, -1, True, "0"])
def test_a_probe_rank_outside_the_job_is_refused(mlp, probe_rank):
    with pytest.raises(ValueError, match="probe_rank"):
        ps.Monitor(mlp, [], probe_rank=probe_rank)


def test_outside_a_distributed_job_the_one_process_probes(mlp):
    monitor = ps.Monitor(mlp, [ps.LossProbe()])
    assert monitor.probing and monitor.placement.world_size == 1 and not monitor.placement.distributed
    with pytest.raises(KeyError, match="no probe named 'grid'"):
        monitor.latest("grid")
