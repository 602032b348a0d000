"""The Lightning callback: a Monitor driven by Trainer.fit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import probescope as ps

L = pytest.importorskip("lightning")  # in the dev extra: CI runs these
from probescope.integrations.lightning import ProbescopeCallback  # noqa: E402
from tests.conftest import gloo_exit_abort_allowed  # noqa: E402


class Blobs(L.LightningModule):
    def __init__(self, fail_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 7))
        self.fail_at = fail_at

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("training diverged")
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True)  # not the monitor's batch loss series
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("valid_loss", nn.functional.cross_entropy(logits, y))
        self.log("accuracy", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _fit(module, data, callback, epochs=2, accumulate=1, ckpt_path=None):
    x, y = data.x_train[:320], data.y_train[:320]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    valid = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:96], y[:96]), batch_size=48)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callback if isinstance(callback, list) else [callback],
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, valid, ckpt_path=ckpt_path)
    return trainer


def test_a_fit_is_monitored_step_by_step_with_its_validation_metrics(tmp_path, blobs):
    x, y = blobs.x_train, blobs.y_train
    callback = ProbescopeCallback(
        [
            ps.GridProbe(x, y, resolution=16, schedule=ps.Schedule.every(2)),
            ps.PredictionProbe(x[-50:], y[-50:], schedule=ps.Schedule.every_epoch()),
            ps.LossProbe(),
        ],
        run_dir=tmp_path / "run",
        snapshot="sync",
    )
    module = Blobs()
    trainer = _fit(module, blobs, callback, epochs=2, accumulate=2)  # 10 batches, 5 steps an epoch
    monitor = callback.monitor
    assert trainer.global_step == 10 and monitor.step_count == 10 and monitor.epoch == 2
    assert monitor.model is module
    for name, counters in monitor.summary()["probes"].items():
        assert counters["failed"] == 0 and counters["frames"] >= 2, (name, counters)

    run = ps.open_run(tmp_path / "run")
    assert run.meta["finished"]
    grid_steps = [f.step for f in run.probe("grid").frames()]
    assert grid_steps == [0, 2, 4, 6, 8, 10]  # every 2 optimizer steps, not batches
    # The LightningModule's forward calls its nn.Sequential: the map is the fused kernel's,
    # and it is the module's own map of its final weights.
    assert run.probe("grid").config["path"] == "numba"
    probe = monitor.probes["grid"]
    with torch.no_grad():
        own = torch.softmax(module(probe.grid.points()), -1).reshape(16, 16, 7)
    torch.testing.assert_close(
        torch.as_tensor(run.probe("grid").frame(-1).data["probs"]), own, atol=1e-5, rtol=0
    )
    state = torch.load(tmp_path / "run" / "model.pt")
    for key, value in module.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)

    final = run.probe("loss").frames()
    *_, last = final
    series = {k.split("/")[1] for k in last.data}
    assert {"valid_loss", "accuracy"} <= series  # validation metrics, not the sanity check's
    for name in ("valid_loss", "accuracy"):
        assert len(last.data[f"series/{name}/values"]) == 2  # one per validation run
    assert "train_loss" in series  # the batch loss from the training step's outputs
    steps = last.data["series/train_loss/steps"]
    assert len(steps) == 20 and np.all(np.diff(steps) >= 0)  # every batch, two per step


def test_a_failing_fit_closes_the_monitor_and_keeps_its_frames(tmp_path, blobs):
    x, y = blobs.x_train, blobs.y_train
    grid = ps.GridProbe(x, y, resolution=16, schedule=ps.Schedule.every(1))
    callback = ProbescopeCallback([grid], run_dir=tmp_path / "run", snapshot="sync")
    with pytest.raises(RuntimeError, match="training diverged"):
        _fit(Blobs(fail_at=3), blobs, callback)
    run = ps.open_run(tmp_path / "run")
    assert run.meta["finished"] and run.meta["status"] == "failed"
    assert run.meta["error"] == "RuntimeError: training diverged"
    steps = [f.step for f in run.probe("grid").frames()]
    assert steps == [0, 1, 2, 3]  # every step until the failure, the last one from close()


def test_unknown_monitor_arguments_are_refused_at_construction():
    with pytest.raises(TypeError, match=r"unknown Monitor arguments \['optimizer', 'run_directory'\]"):
        ProbescopeCallback([], run_directory="x", optimizer=None)


def test_under_ddp_one_rank_probes_and_writes_the_run(tmp_path, blobs):
    x, y = blobs.x_train, blobs.y_train
    callback = ProbescopeCallback(
        [ps.GridProbe(x, y, resolution=16), ps.LossProbe()], run_dir=tmp_path / "run"
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:256], y[:256]), batch_size=32)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=callback if isinstance(callback, list) else [callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with gloo_exit_abort_allowed():  # (then the run below must be whole)
        trainer.fit(Blobs(), loader)
    run = ps.open_run(tmp_path / "run")
    assert run.meta["finished"] and run.meta["distributed"]["world_size"] == 2
    assert run.meta["distributed"]["rank"] == 0
    assert run.meta["summary"]["steps"] == 4  # 256 samples, 32 a batch, split over two ranks
    assert run.meta["summary"]["probes"]["grid"]["failed"] == 0


def test_a_fit_from_a_checkpoint_goes_on_in_the_same_run_from_the_checkpoints_step(tmp_path, blobs):
    x, y = blobs.x_train, blobs.y_train

    def callback():
        probes = [ps.GridProbe(x, y, resolution=8, schedule=ps.Schedule.every(2)), ps.LossProbe()]
        return ProbescopeCallback(probes, run_dir=tmp_path / "run", snapshot="sync", resume=True)

    class SaveAfterEpoch3(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                trainer.save_checkpoint(tmp_path / "epoch3.ckpt")

    _fit(Blobs(), blobs, [callback(), SaveAfterEpoch3()], epochs=5)  # 10 steps an epoch: 50
    # The job starts again from the checkpoint of step 30: the frames after it go aside.
    resumed = callback()
    trainer = _fit(Blobs(), blobs, resumed, epochs=4, ckpt_path=tmp_path / "epoch3.ckpt")
    assert trainer.global_step == 40 and resumed.monitor.resumed_at == 30
    run = ps.open_run(tmp_path / "run")
    assert [r["step"] for r in run.meta["resumes"]] == [30]
    assert run.probe("grid").steps() == list(range(0, 42, 2))
    assert run.meta["summary"]["steps"] == 40 and run.meta["summary"]["epochs"] == 4
    superseded = sorted((tmp_path / "run" / "probes" / "grid" / "superseded").glob("*.npz"))
    assert [int(p.stem.split("_")[1]) for p in superseded] == list(range(32, 52, 2))


class ManualBlobs(Blobs):
    """Manual optimization: the module steps its optimizer itself, twice a batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        for _ in range(2):
            loss = nn.functional.cross_entropy(self(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss


def test_manual_optimization_is_monitored_at_every_optimizer_step(tmp_path, blobs):
    x, y = blobs.x_train, blobs.y_train
    grid = ps.GridProbe(x, y, resolution=8, schedule=ps.Schedule.every(4))
    callback = ProbescopeCallback([grid, ps.LossProbe()], run_dir=tmp_path / "run", snapshot="sync")
    trainer = _fit(ManualBlobs(), blobs, callback, epochs=2)  # 10 batches an epoch, 2 steps each
    monitor = callback.monitor
    assert trainer.global_step == 40 and monitor.step_count == 40 and monitor.epoch == 2
    run = ps.open_run(tmp_path / "run")
    assert run.probe("grid").steps() == list(range(0, 41, 4))
    losses = run.probe("loss").frame(-1).data
    assert len(losses["series/train_loss/values"]) == 20  # the loss each batch returned


def test_validating_after_the_fit_records_nothing_and_warns_nothing(tmp_path, blobs, caplog):
    callback = ProbescopeCallback([ps.LossProbe()], run_dir=tmp_path / "run")
    module = Blobs()
    trainer = _fit(module, blobs, callback, epochs=1)
    before = ps.open_run(tmp_path / "run").probe("loss").frame(-1).data
    caplog.clear()
    x, y = blobs.x_train[:96], blobs.y_train[:96]
    valid = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=48)
    with caplog.at_level(logging.WARNING):
        (metrics,) = trainer.validate(module, valid, verbose=False)
    assert "valid_loss" in metrics
    assert [r.getMessage() for r in caplog.records if r.name.startswith("probescope")] == []
    after = ps.open_run(tmp_path / "run").probe("loss").frame(-1).data
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_each_later_fit_with_the_same_callback_records_a_run_of_its_own(tmp_path, blobs):
    callback = ProbescopeCallback([ps.LossProbe()], run_dir=tmp_path / "run")
    module = Blobs()
    _fit(module, blobs, callback, epochs=1)
    first = callback.monitor
    _fit(module, blobs, callback, epochs=2)  # a new Trainer, the same callback and module
    assert callback.fits == 2 and callback.monitor is not first
    runs = ps.open_run(tmp_path / "run"), ps.open_run(tmp_path / "run-fit2")
    assert [r.meta["status"] for r in runs] == ["finished", "finished"]
    assert [r.meta["summary"]["steps"] for r in runs] == [10, 20]


def test_the_callback_pickles_after_a_fit_without_its_monitor(tmp_path, blobs):
    import pickle

    callback = ProbescopeCallback(
        [ps.GridProbe(blobs.x_train, blobs.y_train, resolution=8)], run_dir=tmp_path / "r"
    )
    _fit(ManualBlobs(), blobs, callback, epochs=1)  # manual optimization: hooks on the optimizer too
    copy = pickle.loads(pickle.dumps(callback))
    assert copy.monitor is None and copy._step_hooks == [] and copy.fits == 1
    assert copy.monitor_kwargs == {"run_dir": tmp_path / "r"} and type(copy.probes[0]).__name__ == "GridProbe"
    assert callback.monitor is not None


def test_a_steps_frames_see_the_validation_that_ran_after_it(tmp_path, blobs, caplog):
    """Validated every 5 batches (val_check_interval) and at each epoch's end: the frames of a
    validated step are taken after its validation, so CheckpointProbe scores every one of them
    and a LossProbe frame of that step holds its metrics."""
    import json

    x, y = blobs.x_train, blobs.y_train
    heard = []

    class Validations(ps.Callback):  # a Monitor callback hears each validation, at its step
        def after_validate(self, monitor, **values):
            heard.append((monitor.step_count, float(values["valid_loss"])))

    callback = ProbescopeCallback(
        [ps.CheckpointProbe(schedule=ps.Schedule.every(5)), ps.LossProbe(schedule=ps.Schedule.every(5))],
        run_dir=tmp_path / "run",
        snapshot="sync",
        callbacks=[Validations()],
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:320], y[:320]), batch_size=32)
    valid = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:96], y[:96]), batch_size=48)
    trainer = L.Trainer(
        max_epochs=2,
        val_check_interval=5,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with caplog.at_level(logging.WARNING, logger="probescope"):
        trainer.fit(Blobs(), loader, valid)
    assert not [r for r in caplog.records if "was logged" in r.getMessage()]
    run = ps.open_run(tmp_path / "run")
    loss = run.probe("loss")
    for frame in loss.frames():
        if frame.step:  # each frame of a validated step holds that step's validation
            assert frame.data["series/valid_loss/steps"][-1] == frame.step
    validated = loss.frame(-1).data
    steps, values = validated["series/valid_loss/steps"].tolist(), validated["series/valid_loss/values"]
    assert steps == [5, 10, 15, 20]
    assert [step for step, _ in heard] == steps and [v for _, v in heard] == pytest.approx(values.tolist())
    scored = {f.step: float(f.data["value"]) for f in run.probe("checkpoint").frames() if f.step}
    assert scored == pytest.approx(dict(zip(steps, values.tolist(), strict=True)))
    index = json.loads((tmp_path / "run" / "checkpoints" / "checkpoints.json").read_text())
    assert index["best"]["step"] == steps[int(np.argmin(values))]
