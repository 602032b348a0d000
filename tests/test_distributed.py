"""Wrapped and distributed models: probes run the module inside the wrappers, one rank probes.

The two-rank tests start real processes with torch.distributed's gloo backend (CPU), so they
hold the Monitor to what a ``torchrun`` job does: every rank runs the same script.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import os
import signal
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
from probescope import gather
from probescope.cli import main
from probescope.distributed import sharding

STEPS = 12
TENSORBOARD = all(importlib.util.find_spec(name) for name in ("tensorboard", "google_crc32c"))


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
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                pytest.fail(f"a rank still ran after {timeout:.0f} s (a collective not every rank joined?)")
    except mp.ProcessExitedException as err:
        # torch 2.13's gloo aborts a process at exit now and then (GLOO_EXIT_ABORT), after its
        # work and the ranks' final barrier: every rank's result is written by then.
        written = all((out / f"rank{r}.json").exists() for r in range(world))
        if not (written and err.exit_code == -signal.SIGABRT):
            raise
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


def _aborting_job(rank: int, world: int, store: str, out: str, write_first: bool) -> None:
    """Rank 1 aborts as gloo's exit does (SIGABRT), after writing its result or before."""
    _join(rank, world, store)
    if write_first or rank == 0:
        Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank}))
    _leave()
    if rank == 1:
        os.abort()


def test_run_ranks_takes_an_abort_at_exit_after_the_results_and_no_other(tmp_path):
    # (the helper's own test: an abort at exit is torch's; an abort before a result is a failure)
    (tmp_path / "after").mkdir(), (tmp_path / "before").mkdir()
    assert run_ranks(_aborting_job, tmp_path / "after", True) == [{"rank": 0}, {"rank": 1}]
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(_aborting_job, tmp_path / "before", False)


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
        # Every rank makes the sink (the same script): only the probing rank's writes a file.
        sinks = [ps.TensorBoardSink(Path(store).parent / "tb")] if TENSORBOARD else []
        monitor = ps.Monitor(
            ddp,
            probes,
            optimizer=optimizer,
            run_dir=Path(store).parent / "run",
            probe_rank=probe_rank,
            sinks=sinks,
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
    if TENSORBOARD:  # one event file (before: one a rank, the other's empty and never closed)
        assert len(list((tmp_path / "tb").glob("*tfevents*"))) == 1
    stats = run.probe("stats").table()
    assert any(c.startswith("act/0/") for c in stats.columns) and any(
        c.startswith("act/3/") for c in stats.columns
    )


class _Warnings(logging.Handler):
    """The warnings a rank logs, as text."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(rank: int):
    """Rank ``rank``'s batches (each rank its own data, as a data-parallel job has)."""
    g = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(STEPS * 16, 2, generator=g)
    return x, (x[:, 0] > x[:, 1]).long() + (x[:, 0] > 1).long()


def _fsdp_net() -> tuple[nn.Module, torch.optim.Optimizer]:
    """``_net()`` (seeded) sharded as one unit by fully_shard, and its SGD."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _net()
    fully_shard(model)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _train_beside(monitor, model, reference, optimizers, rank: int, held) -> tuple[dict, dict]:
    """Train the sharded ``model`` (each rank on its batches) and, beside it, the unsharded
    ``reference`` on the batches of every rank: the same updates. The reference's
    probabilities on ``held`` and the norm of its last weight's gradient at each step."""
    data = [_batches(r) for r in range(2)]
    x, y = data[rank]
    optimizer, ref_optimizer = optimizers
    expected = {0: torch.softmax(reference(held), 1).tolist()}
    grad_norms = {}
    for step in range(STEPS):
        i = step * 16
        loss = nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        xs = torch.cat([d[0][i : i + 16] for d in data])
        ys = torch.cat([d[1][i : i + 16] for d in data])
        ref_optimizer.zero_grad()
        nn.functional.cross_entropy(reference(xs), ys).backward()
        grad_norms[step + 1] = reference[4].weight.grad.norm().item()
        ref_optimizer.step()
        with torch.no_grad():
            expected[step + 1] = torch.softmax(reference(held), 1).tolist()
        monitor.step(loss=loss)
        if step == STEPS // 2 - 1:
            monitor.end_epoch()
    monitor.end_epoch()
    return expected, grad_norms


def _fsdp_job(
    rank: int, world: int, store: str, out: str, snapshot: str, built: str, probe_rank: int
) -> None:
    """An FSDP2 job (fully_shard, every rank the same script) with probes that evaluate the
    model, and beside it, on every rank, the same model unsharded, trained on the whole
    batch: the frames must be that model's at their steps."""
    _join(rank, world, store)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = _net()
        reference = _net()
        reference.load_state_dict(model.state_dict())
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.2)
        x, y = _batches(rank)
        held = torch.linspace(-2, 2, 24).reshape(12, 2)
        probes = [
            ps.GridProbe(x, y, resolution=12, domain=(-3, 3, -3, 3), schedule=ps.Schedule.every(3)),
            ps.PredictionProbe(held, torch.arange(12) % 3, schedule=ps.Schedule.every(2)),
            ps.StatsProbe(["0", "4"], batch=held, schedule=ps.Schedule.every_epoch()),
            ps.StatsProbe("4", targets=("grads",), schedule=ps.Schedule.every(4), name="grads"),
            ps.LossProbe(),
        ]
        unsharded = _net if built == "callable" else _net()
        with ps.Monitor(
            model,
            probes,
            optimizer=optimizer,
            run_dir=Path(store).parent / "run",
            snapshot=snapshot,
            unsharded=unsharded,
            probe_rank=probe_rank,
        ) as monitor:
            expected, grad_norms = _train_beside(
                monitor, model, reference, (optimizer, ref_optimizer), rank, held
            )
        result = {
            "probing": monitor.probing,
            "summary": monitor.summary(),
            "detail": monitor.snapshot_detail,
            "expected": expected,
            "grad_norms": grad_norms,
            "reference": {k: v.tolist() for k, v in reference.state_dict().items()},
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        _leave()


@pytest.mark.parametrize(
    ("snapshot", "built", "probe_rank"), [("copy", "callable", 0), ("sync", "module", 1)]
)
def test_a_sharded_model_is_probed_through_weights_every_rank_gathers(
    tmp_path, capsys, snapshot, built, probe_rank
):
    results = run_ranks(_fsdp_job, tmp_path, snapshot, built, probe_rank)
    prober, other = results[probe_rank], results[1 - probe_rank]
    assert prober["probing"] and not other["probing"]
    for name, counters in prober["summary"]["probes"].items():
        assert counters["failed"] == 0 and counters["frames"] >= 2, (name, counters)
    # Steps 0, 2, 3, 4, 6, 8, 9, 10, 12 (every 2 or 3), two epoch ends, the final frames, model.pt.
    assert prober["detail"]["sharded"] and prober["detail"]["gathers"] == 13
    assert prober["summary"]["gathers"]["count"] == 13 and prober["summary"]["gathers"]["seconds"] > 0

    run = ps.open_run(tmp_path / "run")
    assert run.meta["model"]["sharded"].endswith("was sharded by fully_shard (FSDP2)")
    frames = list(run.probe("prediction").frames())
    assert [f.step for f in frames] == [0, 2, 4, 6, 8, 10, 12]
    for frame in frames:  # the unsharded model's probabilities at the frame's step
        probs = np.asarray(prober["expected"][str(frame.step)])
        np.testing.assert_allclose(
            frame.data["prob_true"], probs[np.arange(12), np.arange(12) % 3], rtol=0, atol=1e-5
        )
    assert [f.step for f in run.probe("grid").frames()] == [0, 3, 6, 9, 12]
    assert [f.step for f in run.probe("stats").frames()] == [0, 6, 12]
    stats = run.probe("stats").table()
    last = stats[stats.step == 12].iloc[0]
    weight = np.asarray(prober["reference"]["4.weight"])
    np.testing.assert_allclose(last["weight/4.weight/l2"], np.linalg.norm(weight), rtol=1e-5)
    assert main(["info", str(tmp_path / "run")]) == 0
    info = capsys.readouterr().out
    assert "sharded   module '(root)' was sharded by fully_shard (FSDP2); 13 gathers" in info
    elements = prober["summary"]["gathers"]["elements"]
    whole = sum(len(np.ravel(v)) for v in prober["reference"].values())
    assert elements == (13 + 11) * whole  # the weights each time, the gradients but at step 0 and model.pt
    assert f"{elements:,} elements" in info
    # The gradients of the step, gathered with its weights (none at step 0: no backward yet).
    grads = run.probe("grads").table().set_index("step")
    assert list(grads.index) == [0, 4, 8, 12] and np.isnan(grads.loc[0, "grad/4.weight/l2"])
    for step in (4, 8, 12):
        assert grads.loc[step, "grad/4.weight/l2"] == pytest.approx(prober["grad_norms"][str(step)], rel=1e-5)
    # model.pt: the whole model, gathered at close.
    state = torch.load(tmp_path / "run" / "model.pt")
    assert sorted(state) == sorted(prober["reference"])
    for key, value in prober["reference"].items():
        np.testing.assert_allclose(state[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)


def _frozen_job(rank: int, world: int, store: str, out: str) -> None:
    """An FSDP2 model whose first layer is frozen (a fine-tune's backbone), probed with
    snapshot_params="trainable": the frozen weights are gathered once, into tensors every
    shadow shares; the frames must still be the model's at their steps."""
    _join(rank, world, store)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model, reference = _net(), _net()
        reference.load_state_dict(model.state_dict())
        for m in (model, reference):
            m[0].requires_grad_(False)
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        fully_shard(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.2)
        ref_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.2)
        held = torch.linspace(-2, 2, 24).reshape(12, 2)
        probes = [
            ps.PredictionProbe(held, torch.arange(12) % 3, schedule=ps.Schedule.every(2)),
            ps.PredictionProbe(held, torch.arange(12) % 3, schedule=ps.Schedule.every(3), name="other"),
            # The frozen layer's parameters have no gradients: the shadow asks the sharded model.
            ps.StatsProbe(["0", "4"], targets=("grads",), schedule=ps.Schedule.every(4), name="grads"),
        ]
        monitor = ps.Monitor(
            model,
            probes,
            optimizer=optimizer,
            run_dir=Path(store).parent / "run",
            unsharded=_net,
            snapshot_params="trainable",
        )
        warned = _Warnings()
        logging.getLogger("probescope").addHandler(warned)
        with monitor:
            expected, grad_norms = _train_beside(
                monitor, model, reference, (optimizer, ref_optimizer), rank, held
            )
        pool = monitor._pool
        shadows = list(pool._targets.values())
        result = {
            "probing": monitor.probing,
            "expected": expected,
            "detail": monitor.snapshot_detail,
            "shared": monitor.probing
            and all(a is b for a, b in zip(shadows[0][:2], shadows[1][:2], strict=True)),
            "own": monitor.probing and shadows[0][2] is not shadows[1][2],
            "sizes": [sum(t.numel() for t in model.parameters()), sum(t.numel() for t in trainable)],
            "grad_norms": grad_norms,
            "warnings": warned.messages,
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        _leave()


def test_a_sharded_models_frozen_weights_are_gathered_once_with_snapshot_params_trainable(tmp_path):
    prober, _ = run_ranks(_frozen_job, tmp_path)
    run = ps.open_run(tmp_path / "run")
    for name in ("prediction", "other"):
        record = run.probe(name)
        assert len(record) >= 4
        for i in range(len(record)):  # the frozen layer's weights are there in every shadow
            frame = record.frame(i)
            probs = np.asarray(prober["expected"][str(frame.step)])
            np.testing.assert_allclose(
                frame.data["prob_true"], probs[np.arange(12), np.arange(12) % 3], atol=1e-5
            )
    assert prober["shared"] and prober["own"]  # layer 0's weight and bias shared, layer 2's not
    grads = run.probe("grads").table().set_index("step")
    assert prober["warnings"] == []  # the frozen layer's gradients: NaN, not blamed on the loop
    assert list(grads.index)[:3] == [0, 4, 8] and np.isnan(grads.loc[0, "grad/4.weight/l2"])
    assert grads["grad/0.weight/l2"].isna().all() and grads["grad/0.bias/l2"].isna().all()
    for step in grads.index[1:]:
        assert grads.loc[step, "grad/4.weight/l2"] == pytest.approx(prober["grad_norms"][str(step)], rel=1e-5)
    every, trainable = prober["sizes"]
    gathers = prober["detail"]["gathers"]
    # The first gather and model.pt bring every weight; every other gather the trainable ones
    # and their gradients (the first, at the Monitor's start, finds none yet).
    assert prober["detail"]["gathered_elements"] == 2 * every + (gathers - 2) * 2 * trainable
    assert prober["detail"]["copied_elements"] == trainable


def _thawed_job(rank: int, world: int, store: str, out: str) -> None:
    """snapshot_params="trainable" gathered the frozen first layer once; unfrozen at step 6,
    it would stay at its first values in the shadows: the probes that read the model stop,
    with a warning that names it, and training goes on."""
    _join(rank, world, store)
    warned = _Warnings()
    logging.getLogger("probescope").addHandler(warned)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = _net()
        model[0].requires_grad_(False)
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
        x, y = _batches(rank)
        probe = ps.PredictionProbe(x[:8], y[:8], schedule=ps.Schedule.every(2))
        run_dir = Path(store).parent / "run"
        kwargs = {"unsharded": _net, "snapshot_params": "trainable", "snapshot": "sync"}
        with ps.Monitor(model, [probe, ps.LossProbe()], run_dir=run_dir, **kwargs) as monitor:
            for step in range(STEPS):
                if step == 6:
                    model[0].requires_grad_(True)
                loss = nn.functional.cross_entropy(model(x[:8]), y[:8])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                monitor.step(loss=loss)
        result = {"steps": monitor.step_count, "warnings": warned.messages}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        _leave()


def test_a_parameter_gathered_once_frozen_that_trains_later_stops_the_probes(tmp_path):
    prober, other = run_ranks(_thawed_job, tmp_path)
    assert prober["steps"] == other["steps"] == STEPS  # training went on
    run = ps.open_run(tmp_path / "run")
    assert run.probe("prediction").steps() == [0, 2, 4, 6]
    (warning,) = [w for w in prober["warnings"] if "the model changed" in w]
    assert "its parameter '0.weight' trains now, frozen when the Monitor started" in warning
    assert "seen at step 8" in warning and "PredictionProbe 'prediction'" in warning
    assert run.probe("loss").frame(-1).data["series/train_loss/steps"].tolist() == list(range(1, STEPS + 1))


def _failing_job(rank: int, world: int, store: str, out: str) -> None:
    """Training raises on every rank at step 5: the Monitors close with the error, gather
    nothing (no final frame of a probe that reads the model, no model.pt) and do not hang."""
    _join(rank, world, store)
    try:
        model, optimizer = _fsdp_net()
        x, y = _batches(rank)
        probes = [ps.PredictionProbe(x[:8], y[:8], schedule=ps.Schedule.every(2)), ps.LossProbe()]
        try:
            with ps.Monitor(model, probes, run_dir=Path(store).parent / "run", unsharded=_net) as monitor:
                for step in range(STEPS):
                    if step == 5:
                        raise RuntimeError("the loss went NaN")
                    loss = nn.functional.cross_entropy(model(x[:8]), y[:8])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    monitor.step(loss=loss)
        except RuntimeError as err:
            error = str(err)
        Path(out, f"rank{rank}.json").write_text(
            json.dumps({"error": error, "gathers": monitor._pool.gathers})
        )
    finally:
        _leave()


def test_a_sharded_run_that_fails_on_every_rank_closes_without_gathering(tmp_path):
    prober, other = run_ranks(_failing_job, tmp_path)
    assert prober["error"] == other["error"] == "the loss went NaN"
    assert prober["gathers"] == other["gathers"] == 3  # steps 0, 2 and 4 only
    run = ps.open_run(tmp_path / "run")
    assert run.meta["status"] == "failed" and not (tmp_path / "run" / "model.pt").exists()
    assert run.probe("prediction").frame(-1).step == 4
    assert run.probe("loss").frame(-1).step == 5  # its final frame needs no gather


def _hsdp_job(rank: int, world: int, store: str, out: str) -> None:
    """FSDP2 over a 2-D mesh (HSDP: replicated across two groups, sharded within each): its
    parameters are (Replicate(), Shard(0)) DTensors, gathered whole one by one."""
    _join(rank, world, store)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        torch.manual_seed(0)
        model, reference = _net(), _net()
        reference.load_state_dict(model.state_dict())
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.2)
        held = torch.linspace(-2, 2, 24).reshape(12, 2)
        probe = ps.PredictionProbe(held, torch.arange(12) % 3, schedule=ps.Schedule.every(2))
        monitor = ps.Monitor(
            model, [probe], optimizer=optimizer, run_dir=Path(store).parent / "run", unsharded=_net
        )
        data = [_batches(r) for r in range(world)]
        with monitor:
            for step in range(6):
                i = step * 16
                loss = nn.functional.cross_entropy(
                    model(data[rank][0][i : i + 16]), data[rank][1][i : i + 16]
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ref_optimizer.zero_grad()
                sum(
                    nn.functional.cross_entropy(reference(d[0][i : i + 16]), d[1][i : i + 16]) for d in data
                ).div(world).backward()
                ref_optimizer.step()
                monitor.step(loss=loss)
        with torch.no_grad():
            expected = torch.softmax(reference(held), 1)[torch.arange(12), torch.arange(12) % 3]
        placements = [str(p.placements) for p in model.parameters()]
        result = {"expected": expected.tolist(), "placements": placements, "probing": monitor.probing}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        _leave()


def test_a_model_sharded_over_a_2d_mesh_is_gathered_whole(tmp_path):
    results = run_ranks(_hsdp_job, tmp_path, world=4)
    assert [r["probing"] for r in results] == [True, False, False, False]
    assert results[0]["placements"][0] == "(Replicate(), Shard(dim=0))"
    run = ps.open_run(tmp_path / "run")
    last = run.probe("prediction").frame(-1)
    assert last.step == 6 and len(run.probe("prediction")) == 4  # steps 0, 2, 4, 6
    np.testing.assert_allclose(last.data["prob_true"], results[0]["expected"], rtol=0, atol=1e-5)


def _resume_job(rank: int, world: int, store: str, out: str, kind: str) -> None:
    """Six steps, closed; then a Monitor with resume=True (the run's step known to the probing
    rank only) for six more: every rank takes resume=True, and with a sharded model every
    rank must gather at the same steps of the one count."""
    _join(rank, world, store)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = _net()
        if kind == "fsdp":
            fully_shard(model)
        else:
            model = nn.parallel.DistributedDataParallel(model)
        unsharded = _net if kind == "fsdp" else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _batches(rank)
        steps = []
        for resume in (False, True):
            probe = ps.PredictionProbe(x[:8], y[:8], schedule=ps.Schedule.every(4))
            run_dir = Path(store).parent / "run"
            with ps.Monitor(model, [probe], run_dir=run_dir, unsharded=unsharded, resume=resume) as monitor:
                for step in range(6):
                    loss = nn.functional.cross_entropy(
                        model(x[step * 8 : step * 8 + 8]), y[step * 8 : step * 8 + 8]
                    )
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    monitor.step(loss=loss)
            steps.append(monitor.step_count)
        Path(out, f"rank{rank}.json").write_text(
            json.dumps({"steps": steps, "gathers": monitor.summary().get("gathers")})
        )
    finally:
        _leave()


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_a_run_resumed_on_every_rank_counts_on_from_the_probing_ranks_step(tmp_path, kind):
    # Every rank but the probing one refused resume=True before ("give run_dir": the Monitor
    # drops run_dir there); a sharded model's ranks would then gather at different steps.
    prober, other = run_ranks(_resume_job, tmp_path, kind)
    assert prober["steps"] == [6, 12] and other["steps"] == ([6, 12] if kind == "fsdp" else [6, 6])
    frames = ps.open_run(tmp_path / "run").probe("prediction")
    assert [frames.frame(i).step for i in range(len(frames))] == [0, 4, 6, 8, 12]
    if kind == "fsdp":  # steps 8 and 12, the final frames (none due), model.pt
        assert prober["gathers"]["count"] == 4


def _fsdp_budget_job(rank: int, world: int, store: str, out: str, snapshot: str) -> None:
    """Budget probes of a sharded model: the probing rank announces their next step at each
    gather; every rank records the steps at which it gathered."""
    _join(rank, world, store)
    try:
        model, optimizer = _fsdp_net()
        x, y = _batches(rank)
        probes = [
            ps.PredictionProbe(x[:64], y[:64], schedule=ps.Schedule.budget(0.3, start=3)),
            ps.StatsProbe("4", schedule=ps.Schedule.every(7)),
            ps.LossProbe(schedule=ps.Schedule.budget(0.5, start=2)),  # reads no weights: no gathers
        ]
        monitor = ps.Monitor(
            model,
            probes,
            optimizer=optimizer,
            run_dir=Path(store).parent / "run",
            unsharded=_net,
            snapshot=snapshot,
        )
        gathered, gather = [], monitor._pool._gather

        def noting(shadow):
            gathered.append(monitor.step_count)
            gather(shadow)

        monitor._pool._gather = noting
        with monitor:
            for step in range(STEPS * 4):
                i = (step * 8) % 180
                loss = nn.functional.cross_entropy(model(x[i : i + 8]), y[i : i + 8])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                monitor.step(loss=loss)
        result = {"summary": monitor.summary(), "gathered": gathered, "probing": monitor.probing}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        _leave()


@pytest.mark.parametrize("snapshot", ["sync", "copy"])
def test_budget_probes_of_a_sharded_model_frame_at_steps_every_rank_gathers(tmp_path, snapshot):
    prober, other = run_ranks(_fsdp_budget_job, tmp_path, snapshot)
    assert prober["gathered"] == other["gathered"]  # the same steps (and close's), in order
    steps = set(prober["gathered"])
    counters = prober["summary"]["probes"]["prediction"]
    assert counters["failed"] == 0 and counters["frames"] >= 4
    if snapshot == "sync":  # nothing is ever busy: a budget frame not gathered for would be skipped
        assert counters["skipped"] == 0
        # The LossProbe reads no weights: its frames need no gather (before: skipped unless one ran).
        assert prober["summary"]["probes"]["loss"]["skipped"] == 0
    run = ps.open_run(tmp_path / "run")
    for name in ("prediction", "stats"):
        record = run.probe(name)
        assert {record.frame(i).step for i in range(len(record))} <= steps, name
    # The budget decided where the frames fell: not every step, not only the stats' every 7.
    frames = {run.probe("prediction").frame(i).step for i in range(len(run.probe("prediction")))}
    assert frames - set(range(0, STEPS * 4 + 1, 7))


def _sharded_job(rank: int, world: int, store: str, out: str) -> None:
    _join(rank, world, store)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        found = {}
        fsdp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
        fully_shard(fsdp)
        found["fsdp2"] = sharding(fsdp)
        x = torch.randn(16, 2)
        asks = {
            "no_unsharded": ([ps.PredictionProbe(x, torch.zeros(16))], {}),
            "live": ([ps.StatsProbe()], {"snapshot": "live"}),
            "other_model": ([ps.StatsProbe()], {"unsharded": lambda: nn.Sequential(nn.Linear(2, 9))}),
        }
        unsharded = lambda: nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))  # noqa: E731
        for name, (probes, kwargs) in asks.items():
            kwargs = {"unsharded": unsharded, **kwargs} if name != "no_unsharded" else {}
            try:
                ps.Monitor(fsdp, probes, **kwargs)
            except ValueError as err:
                found[name] = str(err)
        # A model of the loop's series alone needs no unsharded copy.
        with ps.Monitor(fsdp, [ps.LossProbe()]) as monitor:
            monitor.step(loss=1.0)
        found["loss_only"] = monitor.summary()["steps"]
        # Rows fewer than ranks (rank 1 holds none of a 1-row weight), in buckets of one
        # parameter each: model.pt is the model, exactly.
        torch.manual_seed(2)
        narrow = nn.Sequential(nn.Linear(3, 1), nn.Linear(1, 5), nn.Linear(5, 5))
        whole = {k: v.clone() for k, v in narrow.state_dict().items()}
        for layer in narrow:
            fully_shard(layer)
        gather.BUCKET_BYTES = 16
        with ps.Monitor(narrow, [ps.LossProbe()], run_dir=Path(store).parent / "narrow") as monitor:
            pass
        found["buckets"] = len(monitor._pool._plan.buckets)
        if monitor.probing:
            saved = torch.load(Path(store).parent / "narrow" / "model.pt")
            found["narrow_equal"] = sorted(saved) == sorted(whole) and all(
                torch.equal(saved[k], whole[k]) for k in whole
            )
        gather.BUCKET_BYTES = 256 * 2**20
        # Tensor parallelism: a DTensor weight sharded by rows (gathered in a bucket) and one
        # by columns (whole on every rank) are gathered into the unsharded model.
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(1)
        tensor_parallel = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        plain.load_state_dict(tensor_parallel.state_dict())
        for layer, shard in ((tensor_parallel[0], Shard(0)), (tensor_parallel[2], Shard(1))):
            layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [shard]))
        found["dtensor"] = sharding(tensor_parallel)
        held = torch.randn(5, 4)
        probe = ps.PredictionProbe(held, torch.zeros(5, dtype=torch.long))
        with ps.Monitor(tensor_parallel, [probe], unsharded=plain, snapshot="sync") as monitor:
            pass
        latest = monitor.latest("prediction")
        found["tp_probs"] = None if latest is None else latest.data["prob_true"].tolist()
        found["plain_probs"] = torch.softmax(plain(held), 1)[:, 0].tolist()
        found["plain"] = sharding(nn.Sequential(nn.Linear(2, 3)))
        Path(out, f"rank{rank}.json").write_text(json.dumps(found))
    finally:
        _leave()


def test_sharded_models_are_refused_on_every_rank_where_they_cannot_be_probed(tmp_path):
    for rank, found in enumerate(run_ranks(_sharded_job, tmp_path)):
        assert "fully_shard" in found["fsdp2"]
        assert "sharded across the job's 2 ranks" in found["no_unsharded"]
        assert "unsharded=lambda: MyModel(...)" in found["no_unsharded"]
        assert "PredictionProbe 'prediction'" in found["no_unsharded"]
        assert "snapshot='live'" in found["live"]
        if rank == 0:  # only the probing rank builds the unsharded model
            assert "its '0.weight' is (9, 2)" in found["other_model"]
        assert found["loss_only"] == 1
        assert "'0.weight' is a DTensor" in found["dtensor"]
        assert found["buckets"] == 5  # 12 + 4 bytes, then 20, 20, 100, 20: one each
        if rank == 0:
            assert found["narrow_equal"]
            np.testing.assert_allclose(found["tp_probs"], found["plain_probs"], rtol=0, atol=1e-6)
        else:
            assert found["tp_probs"] is None
        assert found["plain"] is None


def test_unsharded_is_refused_for_a_model_that_is_whole(mlp):
    with pytest.raises(ValueError, match="unsharded= is for a model sharded across ranks"):
        ps.Monitor(mlp, [ps.LossProbe()], unsharded=mlp)


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


def test_the_gather_plan_asks_the_schedules_from_the_step_and_epoch_alone(caplog):
    def by_history(info):
        return info.monitor.history is not None  # needs the Monitor, which no rank is given here

    plan = gather.GatherPlan(
        {
            "grid": ps.Schedule.every(3),
            "stats": ps.Schedule.every_epoch(2),
            "odd": ps.Schedule.when(lambda info: info.step == 5),
            "history": ps.Schedule.when(by_history),
        }
    )
    with caplog.at_level("WARNING", logger="probescope"):
        steps = [s for s in range(10) if plan.at_step(s, 0)]
    assert steps == [0, 3, 5, 6, 9]
    assert [e for e in range(6) if plan.at_epoch_end(e)] == [1, 3, 5]  # every_epoch(2): ends 1, 3, 5
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "schedule of 'history' raised" in warning and "StepInfo.step and .epoch" in warning


def test_spawned_ranks_may_abort_at_exit_and_fail_otherwise():
    from tests.conftest import gloo_exit_abort_allowed

    with gloo_exit_abort_allowed():
        raise mp.ProcessExitedException("abort", error_index=1, error_pid=1, exit_code=-signal.SIGABRT)
    with pytest.raises(mp.ProcessExitedException), gloo_exit_abort_allowed():
        raise mp.ProcessExitedException("exit 1", error_index=1, error_pid=1, exit_code=1)
