"""fastai: the Learner Callback, against what fastai itself computes and records."""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from probescope import Callback as ProbescopeEventCallback
from probescope import GridProbe, LossProbe, StatsProbe, open_run
from probescope.datasets import blobs7

fastai = pytest.importorskip("fastai")  # README: CPU machines install it with --no-deps (no torchvision)

from fastai.callback.core import Callback  # noqa: E402
from fastai.callback.progress import ProgressCallback  # noqa: E402
from fastai.callback.schedule import fit_one_cycle, lr_find  # noqa: E402, F401  (Learner methods)
from fastai.callback.training import GradientAccumulation  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.data.load import DataLoader  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402
from fastai.metrics import accuracy, error_rate  # noqa: E402
from fastai.optimizer import OptimWrapper  # noqa: E402
from fastai.torch_core import TensorBase, TensorCategory  # noqa: E402

from probescope.integrations.fastai import ProbescopeCallback  # noqa: E402


def blobs_dls(n=600, valid=200, bs=64, typed=False, seed=0):
    """7 Gaussian blobs in the plane; ``typed``: fastai's tensor types, as its pipelines give."""
    x, y = blobs7(n + valid, torch.Generator().manual_seed(seed))
    if typed:
        x, y = TensorBase(x), TensorCategory(y)
    items = list(zip(x, y, strict=True))
    torch.manual_seed(seed)  # the training DataLoader's shuffle
    train = DataLoader(items[:n], bs=bs, shuffle=True, drop_last=False)
    return DataLoaders(train, DataLoader(items[n:], bs=2 * bs), device="cpu")


def learner(dls, model, **kwargs) -> Learner:
    """A Learner without fastai's progress bars and epoch table (the tests' output stays quiet)."""
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), **kwargs)
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *_: None
    return learn


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 7))


class Seen(Callback):
    """What fastai computes: each training batch's loss and learning rate, and the model's
    probabilities on a batch when fitting ends."""

    order = 70
    run_valid = False

    def __init__(self, batch=None):
        self.batch, self.losses, self.lrs, self.steps, self.at_end = batch, [], [], 0, None
        self.loss_types = set()

    def after_loss(self):
        self.losses.append(self.learn.loss.item())
        self.loss_types.add(type(self.learn.loss))

    def after_step(self):
        self.steps += 1
        self.lrs.append(self.learn.opt.hypers[0]["lr"])

    def after_fit(self):
        if self.batch is not None:
            with torch.no_grad():
                self.at_end = torch.softmax(self.learn.model(self.batch), dim=1).numpy()


def last_frame(run, name):
    record = run.probe(name)
    return record.frame(len(record) - 1)


def test_a_fit_one_cycle_is_recorded_with_fastais_own_losses_metrics_and_predictions(tmp_path):
    dls = blobs_dls()
    x_valid = dls.valid.one_batch()[0]
    seen = Seen(x_valid)
    callback = ProbescopeCallback(run_dir=tmp_path / "run")  # default probes: prediction dynamics
    learn = learner(dls, mlp(), metrics=[accuracy, error_rate])
    learn.fit_one_cycle(3, 1e-2, cbs=[callback, seen])

    summary = callback.monitor.summary()
    assert summary["steps"] == seen.steps == 3 * 10  # 600 samples in batches of 64
    assert set(summary["probes"]) == {"prediction", "loss"}
    assert all(p["failed"] == 0 and p["run"] >= 1 for p in summary["probes"].values())  # busy: skipped
    run = open_run(tmp_path / "run")
    assert run.meta["status"] == "finished"

    # Each batch's own loss and the one-cycle learning rate, as fastai had them.
    series = last_frame(run, "loss").data
    assert np.allclose(series["series/train_loss/values"], seen.losses, rtol=1e-6)
    assert list(series["series/train_loss/steps"]) == list(range(1, 31))
    assert np.allclose(series["series/lr/values"], seen.lrs, rtol=1e-9)
    # The Recorder's epoch values under probescope's names.
    values = np.array(learn.recorder.values)  # per epoch: train_loss, valid_loss, accuracy, error_rate
    assert np.allclose(series["series/valid_loss/values"], values[:, 1], rtol=1e-6)
    assert np.allclose(series["series/valid_accuracy/values"], values[:, 2], rtol=1e-6)
    assert np.allclose(series["series/valid_error_rate/values"], values[:, 3], rtol=1e-6)
    assert list(series["series/valid_accuracy/steps"]) == [10, 20, 30]
    assert "series/train_train_loss/values" not in series and "series/train_loss_smooth/values" not in series

    # The PredictionProbe holds the first validation batch, and its last frame is the trained
    # model's own probabilities of each sample's true class.
    final = last_frame(run, "prediction")
    assert final.step == 30
    assert run.probe("prediction").config["samples"] == len(x_valid) == 128
    y_valid = dls.valid.one_batch()[1].numpy()
    assert np.array_equal(run.probe("prediction").static["y_true"], y_valid)
    assert np.allclose(final.data["prob_true"], seen.at_end[np.arange(len(y_valid)), y_valid], atol=1e-6)
    assert final.data["accuracy"] == pytest.approx((seen.at_end.argmax(1) == y_valid).mean())


def test_lr_find_is_not_recorded_and_each_later_fit_records_a_run_of_its_own(tmp_path):
    callback = ProbescopeCallback([LossProbe()], run_dir=tmp_path / "run")
    learn = learner(blobs_dls(), mlp(), cbs=callback)
    learn.lr_find(num_it=20, show_plot=False)
    assert callback.fits == 0 and not (tmp_path / "run").exists()
    learn.fit(1, 1e-2)
    first_monitor = callback.monitor
    learn.lr_find(num_it=20, show_plot=False)  # between fits: the last fit's Monitor stays
    assert callback.monitor is first_monitor and first_monitor.summary()["steps"] == 10
    learn.fit_one_cycle(2, 1e-2)
    assert callback.fits == 2
    first, second = open_run(tmp_path / "run"), open_run(tmp_path / "run-fit2")
    assert first.meta["status"] == second.meta["status"] == "finished"
    assert first.meta["summary"]["steps"] == 10 and second.meta["summary"]["steps"] == 20
    assert not (tmp_path / "run-fit3").exists()


def test_validate_and_get_preds_make_no_run_and_no_warning(tmp_path, caplog):
    """They run a fit's events (before_fit ... after_fit) around a validation pass and train
    nothing: no run directory, the fit's Monitor stays the callback's, and nothing to warn about."""
    callback = ProbescopeCallback(run_dir=tmp_path / "run")
    learn = learner(blobs_dls(), mlp(), metrics=accuracy, cbs=callback)
    learn.fit(1, 1e-2)
    fitted = callback.monitor
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        valid_loss, acc = learn.validate()
        preds, targets = learn.get_preds()
    assert len(targets) == 200 and valid_loss > 0
    assert preds.shape == (200, 7) and 0.0 <= acc <= 1.0
    assert callback.fits == 1 and callback.monitor is fitted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [r.getMessage() for r in caplog.records if "probescope" in r.name] == []
    learn.fit(1, 1e-2)  # the next fit is the next run
    assert callback.fits == 2 and open_run(tmp_path / "run-fit2").meta["summary"]["steps"] == 10


def test_a_learner_holding_the_callback_pickles_after_a_fit(tmp_path):
    """``learn.export()`` pickles the Learner with its callbacks: the callback goes without
    the last fit's Monitor (threads, locks), its probes and arguments with it."""
    import io

    from fastcore.basics import noop

    x, y = blobs7(300, torch.Generator().manual_seed(1))
    callback = ProbescopeCallback([GridProbe(x, y, resolution=8), LossProbe()], run_dir=tmp_path / "run")
    learn = learner(blobs_dls(), mlp(), cbs=callback)
    learn.fit(1, 1e-2)
    learn.logger, learn.dls, learn.opt = noop, None, None  # as export() leaves them (and no lambda)
    buffer = io.BytesIO()
    torch.save(learn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    (copy,) = [cb for cb in loaded.cbs if isinstance(cb, ProbescopeCallback)]
    assert copy.monitor is None and copy.fits == 1 and copy.monitor_kwargs == {"run_dir": tmp_path / "run"}
    assert [type(p).__name__ for p in copy.probes] == ["GridProbe", "LossProbe"]
    assert callback.monitor is not None  # the original keeps its Monitor


def test_with_resume_fine_tunes_two_fits_are_one_run(tmp_path):
    callback = ProbescopeCallback([LossProbe()], run_dir=tmp_path / "run", resume=True)
    learn = learner(blobs_dls(), mlp(), cbs=callback)
    learn.fit(1, 1e-2)
    learn.fit_one_cycle(2, 1e-2)  # as fine_tune does: a first fit, then a second on it
    assert callback.fits == 2 and not (tmp_path / "run-fit2").exists()
    run = open_run(tmp_path / "run")
    assert run.meta["status"] == "finished" and [r["step"] for r in run.meta["resumes"]] == [10]
    assert run.meta["summary"]["steps"] == 30 and run.meta["summary"]["epochs"] == 3
    assert run.probe("loss").frame(-1).data["series/train_loss/steps"].tolist() == list(range(1, 31))


def test_fine_tune_resumed_measures_the_bodys_gradients_once_it_is_unfrozen(tmp_path):
    """fine_tune's first fit trains the head alone (the body frozen), its second all of it: in
    one resumed run, the body's gradient columns are NaN in the first and measured in the second."""
    from fastai.torch_core import params

    probe = StatsProbe("*", targets=("weights", "grads"))
    callback = ProbescopeCallback([probe], run_dir=tmp_path / "run", resume=True)
    learn = learner(blobs_dls(), mlp(), cbs=callback, splitter=lambda m: [params(m[0]), params(m[2])])
    learn.fine_tune(1, 1e-2, freeze_epochs=1)
    assert callback.fits == 2 and not (tmp_path / "run-fit2").exists()
    table = open_run(tmp_path / "run").probe("stats").table().set_index("step")
    first, second = table.loc[1:10], table.loc[11:]
    assert len(first) and len(second)
    assert first["grad/0.weight/l2"].isna().all() and first["grad/2.weight/l2"].notna().all()
    assert second["grad/0.weight/l2"].notna().all() and second["grad/2.weight/l2"].notna().all()


def test_a_step_that_gradient_accumulation_cancels_is_no_step(tmp_path):
    seen = Seen()
    callback = ProbescopeCallback([LossProbe()], run_dir=tmp_path / "run")
    dls = blobs_dls(n=320, bs=16)
    learn = learner(dls, mlp())
    learn.fit(2, 1e-2, cbs=[GradientAccumulation(n_acc=64), callback, seen])
    # 20 batches of 16 an epoch, an optimizer step every 64 samples: 5 an epoch.
    assert seen.steps == 10 and callback.monitor.summary()["steps"] == 10
    series = last_frame(open_run(tmp_path / "run"), "loss").data
    assert len(series["series/train_loss/values"]) == 40  # every batch's loss, at its step
    assert list(series["series/train_loss/steps"][:5]) == [1, 1, 1, 1, 2]


def test_fastai_tensor_types_and_a_torch_optimizer_wrapper(tmp_path):
    dls = blobs_dls(typed=True)
    x, y = dls.valid.one_batch()
    assert isinstance(x, TensorBase) and isinstance(y, TensorCategory)  # as fastai's pipelines give
    grid = GridProbe(dls.train.one_batch()[0], dls.train.one_batch()[1], resolution=24)
    stats = StatsProbe(targets=["weights", "grads"], spectral=False)
    callback = ProbescopeCallback([grid, stats, LossProbe()], run_dir=tmp_path / "run")
    seen = Seen()
    opt_func = partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9)
    learn = learner(dls, mlp(), opt_func=opt_func)
    learn.fit(2, 0.05, cbs=[callback, seen])
    assert callback.monitor.optimizer is learn.opt.opt  # the torch optimizer, for its step hook
    assert all(p["failed"] == 0 for p in callback.monitor.summary()["probes"].values())
    run = open_run(tmp_path / "run")
    series = last_frame(run, "loss").data
    assert np.allclose(series["series/train_loss/values"], seen.losses, rtol=1e-6)
    assert np.allclose(series["series/lr/values"], 0.05)
    columns = list(run.probe("stats").static["columns"])
    weight = last_frame(run, "stats").data["values"][columns.index("weight/0.weight/l2")]
    assert weight == pytest.approx(torch.linalg.vector_norm(learn.model[0].weight.detach()).item(), rel=1e-5)
    probs = last_frame(run, "grid").data["probs"]
    assert probs.shape[-1] == 7 and np.allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_validation_batches_of_several_inputs_get_no_prediction_probe(tmp_path, caplog):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, a, b):
            return self.net(torch.cat([a, b], dim=1))

    x, y = blobs7(300, torch.Generator().manual_seed(0))
    items = list(zip(x[:, :1], x[:, 1:], y, strict=True))
    dls = DataLoaders(DataLoader(items[:200], bs=50), DataLoader(items[200:], bs=50), device="cpu")
    dls.n_inp = 2
    callback = ProbescopeCallback(run_dir=tmp_path / "run")
    learn = learner(dls, TwoInputs())
    with caplog.at_level(logging.WARNING, logger="probescope.integrations.fastai"):
        learn.fit(1, 1e-2, cbs=callback)
    assert "no PredictionProbe" in caplog.text and "2 input(s)" in caplog.text
    assert set(callback.monitor.summary()["probes"]) == {"loss"}
    assert open_run(tmp_path / "run").meta["summary"]["steps"] == 4


def label_dls(y_of, n=300, valid=128, seed=0):
    """Five features; targets ``y_of(x)``."""
    x = torch.randn(n + valid, 5, generator=torch.Generator().manual_seed(seed))
    items = list(zip(x, y_of(x), strict=True))
    return DataLoaders(DataLoader(items[:n], bs=50), DataLoader(items[n:], bs=valid), device="cpu")


def test_a_multilabel_learner_gets_a_prediction_probe_of_its_labels(tmp_path):
    from fastai.losses import BCEWithLogitsLossFlat

    dls = label_dls(lambda x: (x[:, :3] > 0).float())
    torch.manual_seed(0)
    learn = learner(dls, nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)))
    learn.loss_func = BCEWithLogitsLossFlat()
    learn.fit(2, 1e-2, cbs=ProbescopeCallback(run_dir=tmp_path / "run", snapshot="sync"))
    record = open_run(tmp_path / "run").probe("prediction")
    assert record.config["task"] == "multilabel" and record.config["num_classes"] == 3
    x, y = dls.valid.one_batch()
    with torch.no_grad():
        p = torch.sigmoid(learn.model(x)).double().numpy()
    np.testing.assert_allclose(
        last_frame(open_run(tmp_path / "run"), "prediction").data["prob_true"],
        np.where(y.numpy() == 1, p, 1 - p),
        rtol=1e-5,
    )


def test_targets_a_prediction_probe_cannot_score_cost_the_fit_that_probe_only(tmp_path, caplog):
    class Masks(nn.Module):  # a 2x2 mask of 3 classes per sample
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(5, 12)

        def forward(self, x):
            return self.net(x).reshape(-1, 3, 2, 2)

    dls = label_dls(lambda x: (x[:, :4] > 0).long().reshape(-1, 2, 2))
    callback = ProbescopeCallback(run_dir=tmp_path / "run")
    learn = learner(dls, Masks())
    learn.loss_func = CrossEntropyLossFlat(axis=1)  # (fastai's loss for masks)
    with caplog.at_level(logging.WARNING, logger="probescope.integrations.fastai"):
        learn.fit(1, 1e-2, cbs=callback)
    assert "no PredictionProbe" in caplog.text and "got shape (128, 2, 2)" in caplog.text
    assert set(callback.monitor.summary()["probes"]) == {"loss"}
    assert open_run(tmp_path / "run").meta["summary"]["steps"] == 6


def test_a_failing_fit_closes_the_monitor_and_keeps_its_frames(tmp_path):
    class Boom(Callback):
        def after_batch(self):
            if self.training and self.iter == 4:
                raise RuntimeError("data loader failed")

    callback = ProbescopeCallback([LossProbe()], run_dir=tmp_path / "run")
    learn = learner(blobs_dls(), mlp())
    with pytest.raises(RuntimeError, match="data loader failed"), callback:
        learn.fit(2, 1e-2, cbs=[callback, Boom()])
    run = open_run(tmp_path / "run")
    assert run.meta["status"] == "failed" and run.meta["summary"]["steps"] == 5
    assert run.meta["error"].startswith("RuntimeError: ") and "data loader failed" in run.meta["error"]
    assert len(run.probe("loss")) >= 1


def test_the_callback_rejects_arguments_the_monitor_does_not_take():
    with pytest.raises(TypeError, match="unknown Monitor arguments \\['optimizer', 'snapshots'\\]"):
        ProbescopeCallback([], optimizer=None, snapshots="copy")


def test_batch_losses_reach_the_monitor_as_plain_tensors(monkeypatch):
    """fastai's losses are TensorBase, whose every op goes through Python; the Monitor gets
    plain tensors, so neither it nor the probe worker pays for that."""
    from probescope.monitor import Monitor

    given, record = [], Monitor.after_loss

    def spy(self, loss=None):
        given.append(loss)
        record(self, loss)

    monkeypatch.setattr(Monitor, "after_loss", spy)
    callback = ProbescopeCallback([LossProbe()])
    learn = learner(blobs_dls(typed=True), mlp())
    seen = Seen()
    learn.fit(1, 1e-2, cbs=[callback, seen])
    assert seen.loss_types == {TensorBase}  # what fastai computed
    assert len(given) == 10 and all(type(t) is torch.Tensor and not t.requires_grad for t in given)
    assert [t.item() for t in given] == pytest.approx(seen.losses, rel=1e-6)


def test_an_epochs_last_step_is_taken_after_its_validation(tmp_path, caplog):
    """A CheckpointProbe on steps that end epochs (10 steps an epoch): each frame is taken
    after the epoch's validation and scored by its valid_loss, with no warning."""
    import json

    from probescope import CheckpointProbe, Schedule

    dls = blobs_dls()
    heard = Validations()
    callback = ProbescopeCallback(
        [CheckpointProbe(schedule=Schedule.every(10)), LossProbe(schedule=Schedule.every(10))],
        run_dir=tmp_path / "run",
        snapshot="sync",
        callbacks=[heard],
    )
    learn = learner(dls, mlp(), metrics=[accuracy])
    with caplog.at_level(logging.WARNING, logger="probescope"):
        learn.fit(3, 1e-2, cbs=[callback])
    assert not [r for r in caplog.records if "was logged" in r.getMessage()]
    run = open_run(tmp_path / "run")
    valid = [row[1] for row in learn.recorder.values]  # per epoch: train_loss, valid_loss, accuracy
    scored = {f.step: float(f.data["value"]) for f in run.probe("checkpoint").frames() if f.step}
    assert scored == pytest.approx({10: valid[0], 20: valid[1], 30: valid[2]})
    for frame in run.probe("loss").frames():
        if frame.step:
            assert frame.data["series/valid_loss/steps"][-1] == frame.step
    index = json.loads((tmp_path / "run" / "checkpoints" / "checkpoints.json").read_text())
    assert index["best"]["step"] == 10 * (1 + int(np.argmin(valid)))
    # Monitor callbacks still hear each validation, after the step it belongs to.
    assert [step for step, _ in heard.calls] == [10, 20, 30]
    assert [values["valid_loss"] for _, values in heard.calls] == pytest.approx(valid)


class Validations(ProbescopeEventCallback):
    """A Monitor callback: the step and values of each after_validate it hears."""

    def __init__(self):
        self.calls = []

    def after_validate(self, monitor, **values):
        self.calls.append((monitor.step_count, values))


def test_the_default_prediction_probe_names_the_classes_by_the_dataloaders_vocab(tmp_path):
    """A DataBlock's CategoryBlock gives the classes names (its vocab, sorted): the default
    PredictionProbe draws them by those names; a vocab of another length names nothing."""
    from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
    from fastai.data.transforms import RandomSplitter

    from probescope.integrations.fastai import vocab_names

    colours = ["red", "green", "blue", "cyan", "magenta", "yellow", "black"]
    x, y = blobs7(700, torch.Generator().manual_seed(0))
    block = DataBlock(blocks=(TransformBlock, CategoryBlock), get_x=lambda i: x[i],
                      get_y=lambda i: colours[int(y[i])], splitter=RandomSplitter(seed=0))  # fmt: skip
    dls = block.dataloaders(list(range(700)), bs=64, device="cpu")
    learn = learner(dls, mlp())
    learn.fit(1, 1e-2, cbs=ProbescopeCallback(run_dir=tmp_path / "run", snapshot="sync"))
    record = open_run(tmp_path / "run").probe("prediction")
    assert record.config["class_names"] == sorted(colours) == list(dls.vocab)
    # The probe's classes are the vocab's indices: a sample's named class is its own colour.
    items = dls.valid.items[:10]  # the first validation batch's samples, in order
    named = [record.config["class_names"][int(c)] for c in record.static["y_true"][:10]]
    assert named == [colours[int(y[i])] for i in items]
    assert vocab_names(dls, 6) is None and vocab_names(dls, None) is None
    assert vocab_names(blobs_dls(), 7) is None  # DataLoaders of plain items: no vocab
