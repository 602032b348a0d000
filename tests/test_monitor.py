"""The Monitor keeps probes off the training path: skipping, failures, snapshots, events."""

import logging
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from probescope import EVENTS, Callback, GridProbe, LossProbe, Monitor, Probe, Schedule, open_run
from tests.conftest import train_steps


def test_skips_probe_while_previous_still_running(mlp, blobs, recording_probe):
    release = threading.Event()
    probe = recording_probe(schedule=Schedule.every(1), block=release)
    monitor = Monitor(mlp, [probe], final_frame=False).start()
    assert probe.started.wait(5)  # the step-0 evaluation is now blocked in the worker
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 6, wait=False)
    assert monitor.stats[probe.name].skipped == 6
    release.set()
    monitor._worker.wait_idle(5)
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 2)
    monitor.close()
    assert probe.steps == [0, 7, 8]
    stats = monitor.stats[probe.name]
    assert (stats.run, stats.skipped, stats.failed) == (3, 6, 0)
    assert stats.mean_ms > 0


def test_training_loop_does_not_wait_for_a_slow_probe(mlp, blobs, recording_probe):
    release = threading.Event()
    probe = recording_probe(block=release)
    monitor = Monitor(mlp, [probe], final_frame=False).start()
    finished = threading.Event()

    def loop():
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 20, wait=False)
        finished.set()

    threading.Thread(target=loop).start()
    assert finished.wait(10), "training blocked behind a probe that never finished"
    release.set()
    monitor.close()


def test_probe_exception_disables_it_with_one_warning_and_training_goes_on(
    mlp, blobs, recording_probe, caplog
):
    bad = recording_probe(name="bad", raise_at=3)
    good = recording_probe(name="good", schedule=Schedule.every(2))
    with caplog.at_level(logging.WARNING, logger="probescope"), Monitor(mlp, [bad, good]) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 8)
    assert bad.steps == [0, 1, 2]
    assert good.steps == [0, 2, 4, 6, 8]
    assert monitor.stats["bad"].failed == 1
    messages = [r.getMessage() for r in caplog.records if "'bad'" in r.getMessage()]
    assert len(messages) == 1 and "probe exploded" in messages[0] and "disabled" in messages[0]


class StepReader(Probe):
    """Reads back every weight and buffer of the snapshot it is given."""

    kind = "weights"

    def evaluate(self, model, context):
        values = torch.cat([t.detach().reshape(-1).float() for t in [*model.parameters(), *model.buffers()]])
        return {"values": values.numpy().copy()}


@pytest.mark.parametrize("snapshot", ["copy", "sync"])
def test_every_frame_sees_the_weights_of_one_single_step(snapshot):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    frames = []
    probe = StepReader(schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], snapshot=snapshot, ring_capacity=256).start()
    ring = monitor.ring(probe.name)
    seen = -1
    for step in range(1, 5000):  # until enough frames were taken while training ran
        if len(frames) >= 20:
            break
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))  # a model whose every weight is its step number
        monitor.step()
        time.sleep(0.0005)  # a training step takes time; without it the loop outruns the worker
        for frame in ring.read_since(seen):
            seen = frame.seq
            frames.append(frame)
    monitor.close()
    frames += ring.read_since(seen)
    assert len(frames) >= 3
    trained = [f for f in frames if f.step > 0]  # step 0 holds the random initial weights
    assert len(trained) >= 5
    for frame in trained:
        values = frame.data["values"]
        assert np.all(values == values[0]), f"frame at step {frame.step} mixes weights of several steps"
        assert values[0] == frame.step


def test_closing_mid_probe_neither_deadlocks_nor_loses_written_frames(tmp_path, mlp, blobs, recording_probe):
    release = threading.Event()
    blocker = recording_probe(name="slow", schedule=Schedule.steps([3]), block=release)
    quick = recording_probe(name="quick")
    monitor = Monitor(mlp, [quick, blocker], run_dir=tmp_path / "run", close_timeout=0.5).start()
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 3, wait=False)
    assert blocker.started.wait(5)
    monitor.close()  # the slow probe is still blocked: close gives up waiting after 0.5 s
    release.set()
    from probescope import open_run

    run = open_run(tmp_path / "run")
    assert run.meta["status"] == "finished"
    assert len(run.probe("quick")) == monitor.stats["quick"].run >= 1


def test_calls_after_close_are_ignored_with_one_warning_and_a_closed_monitor_does_not_restart(
    tmp_path, mlp, blobs, recording_probe, caplog
):
    probe = recording_probe(schedule=Schedule.every(1))
    monitor = Monitor(mlp, [probe], run_dir=tmp_path / "run").start()
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 3)
    monitor.close()
    with caplog.at_level(logging.WARNING, logger="probescope"):
        for _ in range(3):  # each would launch a frame on the stopped worker
            monitor.step(loss=1.0)
            monitor.log(accuracy=0.5)
            monitor.end_epoch()
    assert len([r for r in caplog.records if "after close() is ignored" in r.getMessage()]) == 1
    assert probe.steps == [0, 1, 2, 3] and monitor.step_count == 3 and monitor.epoch == 0
    assert monitor.history.lengths() == {"batch_loss": 3}
    with pytest.raises(RuntimeError, match="cannot start again"):
        monitor.start()


def test_fastai_event_names_reach_callbacks_in_order(mlp, blobs):
    trace = []

    class Recorder(Callback):
        pass

    for event in EVENTS:
        setattr(Recorder, event, lambda self, monitor, _e=event, **kw: trace.append(_e))
    monitor = Monitor(mlp, [], callbacks=[Recorder()])
    x, y = blobs.x_train[:20], blobs.y_train[:20]
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    monitor.before_fit()
    monitor.before_epoch()
    monitor.before_train()
    monitor.before_batch()
    out = mlp(x)
    monitor.after_pred()
    loss = nn.functional.cross_entropy(out, y)
    monitor.after_loss(loss=loss)
    monitor.before_backward()
    loss.backward()
    monitor.after_backward()
    opt.step()
    monitor.after_step()
    monitor.after_batch()
    monitor.after_train()
    monitor.before_validate()
    monitor.after_validate(valid_loss=0.5)
    monitor.after_epoch()
    monitor.event("after_fit")
    assert trace == list(EVENTS)
    assert monitor.step_count == 1 and monitor.epoch == 1
    history = monitor.history.read()
    assert history["batch_loss"].steps.tolist() == [1]
    assert history["valid_loss"].values.tolist() == [0.5]


def test_an_event_reaches_every_callback_that_handles_it_and_skips_the_no_op_ones(mlp):
    calls = []

    class Subclass(Callback):
        def after_step(self, monitor, **kwargs):
            calls.append(("subclass", kwargs))

        def after_epoch(self, monitor, **kwargs):
            calls.append(("subclass epoch", kwargs))

    on_instance, untouched = Callback(), Callback()
    on_instance.after_step = lambda monitor, **kwargs: calls.append(("instance", kwargs))
    callbacks = [Subclass(), on_instance, untouched]
    monitor = Monitor(mlp, [], callbacks=callbacks)
    monitor.after_step(tag=1)
    monitor.after_step(tag=2)
    monitor.end_epoch()
    assert calls == [
        *[(who, {"tag": t}) for t in (1, 2) for who in ("subclass", "instance")],
        ("subclass epoch", {}),
    ]
    assert monitor._handlers("after_step") == callbacks[:2]  # the untouched one is not called
    assert monitor._handlers("after_epoch") == callbacks[:1]
    assert monitor._handlers("before_batch") == []
    monitor.close()


def test_unknown_event_name_is_rejected(mlp):
    with pytest.raises(ValueError, match="unknown event"):
        Monitor(mlp).event("after_everything")


def test_duplicate_probe_names_are_rejected(mlp, blobs):
    with pytest.raises(ValueError, match="unique"):
        Monitor(mlp, [GridProbe(blobs.x_train), GridProbe(blobs.x_train)])


def test_one_probe_is_taken_as_a_list_of_one_and_anything_else_is_refused(mlp, blobs):
    probe = GridProbe(blobs.x_train, resolution=5, schedule=Schedule.every(1))
    with Monitor(mlp, probe) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 2)
    assert list(monitor.probes) == ["grid"] and monitor.stats["grid"].run == 3
    with pytest.raises(TypeError, match="probes must be Probe instances, got function"):
        Monitor(mlp, [lambda model, context: {}])


def test_counters_and_ring_are_exposed(mlp, blobs):
    probe = GridProbe(blobs.x_train, resolution=8, schedule=Schedule.every(2))
    with Monitor(mlp, [probe]) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 4)
        latest = monitor.latest("grid")
    assert latest.step == 4 and latest.data["rgba"].shape == (8, 8, 4)
    assert monitor.stats["grid"].run == 3
    assert monitor.snapshot_bytes == 2 * sum(p.numel() * 4 for p in mlp.parameters())


def _steps_set_to_their_number(monitor, model, steps):
    """Steps of a model whose every weight and buffer is set to the step number before the step."""
    for step in range(1, steps):
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.fill_(float(step))
        monitor.step()
        time.sleep(0.0005)  # a training step takes time; without it the loop outruns the worker


def test_a_parameter_subset_snapshot_copies_only_the_chosen_tensors(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    probe = StepReader(schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], snapshot_params=["1.*"], ring_capacity=256, run_dir=tmp_path / "run")
    shadow = monitor._pool._free[0]
    assert shadow[0].weight is model[0].weight and shadow[0].bias is model[0].bias  # shared, live
    assert shadow[1].weight is not model[1].weight
    assert all(p.requires_grad for p in model.parameters())  # training's parameters untouched
    layer1 = sum(p.numel() * p.element_size() for p in model[1].parameters())
    assert monitor.snapshot_bytes == 2 * layer1  # two shadows, layer 1 only
    monitor.start()
    _steps_set_to_their_number(monitor, model, 40)
    monitor.close()
    frames = [f for f in monitor.ring(probe.name).read_since(-1) if f.step > 0]
    copied = 64 * 64 + 64  # StepReader lists layer 0's tensors first, then layer 1's
    assert len(frames) >= 3
    for frame in frames:
        assert np.all(frame.data["values"][copied:] == frame.step)  # the copied layer: one step
    detail = open_run(tmp_path / "run").meta["snapshot_detail"]
    assert detail["copied_elements"] == 64 * 4 + 4 and detail["bytes"] == 2 * layer1


def _frozen_backbone() -> nn.Sequential:
    """A frozen first layer (most of the model), a batch norm and a head that train."""
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 4))
    model[0].requires_grad_(False)
    return model


def test_a_trainable_snapshot_shares_the_frozen_parameters_and_copies_the_rest(tmp_path):
    model = _frozen_backbone()
    probe = StepReader(schedule=Schedule.every(1))
    monitor = Monitor(
        model, [probe], snapshot_params="trainable", ring_capacity=256, run_dir=tmp_path / "run"
    )
    shadow = monitor._pool._free[0]
    assert shadow[0].weight is model[0].weight and shadow[0].bias is model[0].bias  # shared
    copied = [*model[1].parameters(), *model[1].buffers(), *model[2].parameters()]
    own = [*shadow[1].parameters(), *shadow[1].buffers(), *shadow[2].parameters()]
    assert all(a is not b for a, b in zip(copied, own, strict=True))  # the running statistics too
    assert monitor.snapshot_bytes == 2 * sum(t.numel() * t.element_size() for t in copied)
    monitor.start()
    _steps_set_to_their_number(monitor, model, 40)
    monitor.close()
    frames = [f for f in monitor.ring(probe.name).read_since(-1) if f.step > 0]
    frozen = 64 * 64 + 64  # StepReader lists layer 0's parameters first
    buffers = 64 + 64 + 1  # then every parameter, then the buffers
    assert len(frames) >= 3
    for frame in frames:
        values = frame.data["values"]
        assert np.all(values[frozen:] == frame.step)  # what trains and the buffers: one step
    assert open_run(tmp_path / "run").meta["snapshot_detail"]["copied_elements"] == len(values) - frozen
    assert buffers == sum(b.numel() for b in model.buffers())
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="'trainable': no parameter of the model requires gradients"):
        Monitor(model, [StepReader()], snapshot_params="trainable")


def test_a_whole_copy_that_is_mostly_frozen_parameters_gets_one_warning(monkeypatch, caplog):
    from probescope import snapshot

    model = _frozen_backbone()
    monkeypatch.setattr(snapshot, "FROZEN_HINT_BYTES", 16 * 1024)
    with caplog.at_level(logging.WARNING, logger="probescope"):
        Monitor(model, [StepReader()])
        Monitor(model, [StepReader()], snapshot_params="trainable")
        Monitor(model, [StepReader()], snapshot="sync")
        model[0].requires_grad_(True)
        Monitor(model, [StepReader()])
    hints = [r.getMessage() for r in caplog.records if "do not train" in r.getMessage()]
    assert hints == [
        "snapshot: 16.2 KiB of the model's 17.8 KiB of parameters do not train (requires_grad=False) "
        "and are copied into each of the snapshot's 2 copies at every frame; "
        "snapshot_params='trainable' copies the trainable ones and the buffers and shares the frozen ones"
    ]


def test_a_tied_weight_is_copied_once_and_stays_tied_in_the_snapshot():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.Tanh(), shared)  # one weight under two state_dict names
    probe = StepReader(schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], ring_capacity=256)
    shadow = monitor._pool._free[0]
    assert shadow[0] is shadow[2] and shadow[0].weight is not shared.weight
    assert monitor.snapshot_bytes == 2 * (8 * 8 + 8) * 4
    assert monitor.snapshot_detail["model_elements"] == 8 * 8 + 8
    monitor.start()
    _steps_set_to_their_number(monitor, model, 20)
    monitor.close()
    frames = [f for f in monitor.ring(probe.name).read_since(-1) if f.step > 0]
    assert frames and all(np.all(f.data["values"] == f.step) for f in frames)


class Tempered(nn.Module):
    """A linear layer under a temperature the loop sets: a buffer no state_dict holds."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("temperature", torch.ones(()), persistent=False)

    def forward(self, x):
        return self.fc(x) / self.temperature


def test_a_buffer_left_out_of_the_state_dict_is_copied_with_the_step_it_belongs_to():
    model = Tempered()
    probe = StepReader(schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], ring_capacity=256)
    assert monitor.snapshot_detail["copied_elements"] == 8 * 4 + 4 + 1
    monitor.start()
    _steps_set_to_their_number(monitor, model, 40)
    monitor.close()
    frames = [f for f in monitor.ring(probe.name).read_since(-1) if f.step > 0]
    assert len(frames) >= 3
    for frame in frames:  # the last value read is the temperature
        assert np.all(frame.data["values"] == frame.step), f"frame at step {frame.step} holds another step"


class FineTuned(nn.Module):
    """A backbone kept in eval mode (its batch norm frozen) under a head that trains."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 7))

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize("snapshot", ["copy", "sync"])
def test_probes_leave_every_module_of_the_live_model_in_its_own_mode(blobs, snapshot):
    from probescope import PredictionProbe

    model = FineTuned()
    model.backbone.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    assert modes["backbone.1"] is False and modes["head.0"] is True
    stats = model.backbone[1].running_mean.clone()
    probe = PredictionProbe(blobs.x_valid[:10], blobs.y_valid[:10], schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], snapshot=snapshot).start()  # attach ran the model once
    train_steps(monitor, model, blobs.x_train, blobs.y_train, 3)
    monitor.close()
    assert monitor.stats[probe.name].run >= 3
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(model.backbone[1].running_mean, stats)  # frozen: no forward updated it


def _train_with_noise(monitor_kwargs=None, probes=(), *, curve=False):
    """Steps of a model that draws from the global generator (dropout) and keeps running
    statistics (batch norm), a classifier of blobs or (``curve``) a 1-D regression; its final
    state, the generator's next draws (what training used of it) and the probes' counters,
    with or without a Monitor around it."""
    from probescope.datasets import make_dataset

    torch.manual_seed(0)
    if curve:
        x = torch.linspace(-2, 2, 300)[:, None]
        data, loss_fn = (x, torch.sin(2 * x)), nn.functional.mse_loss
    else:
        blobs = make_dataset("blobs7", seed=3, n=700)
        data, loss_fn = (blobs.x_train, blobs.y_train), nn.functional.cross_entropy
    noisy = (nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
    model = nn.Sequential(nn.Linear(data[0].shape[1], 16), *noisy, nn.Linear(16, 1 if curve else 7))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, list(probes), **monitor_kwargs).start() if monitor_kwargs is not None else None
    for step in range(12):
        batch = slice(step * 25, step * 25 + 25)
        loss = loss_fn(model(data[0][batch]), data[1][batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(loss=loss.detach())
            monitor._worker.wait_idle(10)
    if monitor is not None:
        monitor.close()
    stats = monitor.stats if monitor is not None else {}
    return model.state_dict(), torch.rand(3), stats


@pytest.mark.parametrize("snapshot", ["copy", "sync"])
def test_probes_do_not_change_training_by_one_bit(snapshot, blobs, tmp_path):
    from probescope import CheckpointProbe, LossProbe, NeuronProbe, PredictionProbe, StatsProbe

    every = Schedule.every(1)
    valid = (blobs.x_valid, blobs.y_valid)
    probes = [
        GridProbe(blobs.x_train, blobs.y_train, resolution=16, smoothing=0.5, schedule=every),
        NeuronProbe(blobs.x_train, "1", units=4, resolution=8, schedule=every),
        PredictionProbe(*valid, schedule=every),
        StatsProbe(targets=["weights", "grads", "activations"], batch=blobs.x_valid, schedule=every),
        LossProbe(valid=valid, loss_fn=nn.functional.cross_entropy, schedule=every),
        CheckpointProbe(valid=valid, loss_fn=nn.functional.cross_entropy, schedule=every),
    ]
    alone, draws, _ = _train_with_noise()
    monitored, monitored_draws, stats = _train_with_noise({"snapshot": snapshot, "run_dir": tmp_path}, probes)
    assert all(s.run >= 12 and not s.failed for s in stats.values()) and len(stats) == len(probes)
    for key, value in alone.items():
        assert torch.equal(monitored[key], value), key  # weights and batch norm statistics
    assert torch.equal(monitored_draws, draws)


@pytest.mark.parametrize("snapshot", ["copy", "sync"])
def test_a_curve_probe_does_not_change_training_by_one_bit(snapshot):
    from probescope import CurveProbe

    probe = CurveProbe(torch.linspace(-2, 2, 40)[:, None], torch.zeros(40, 1), loss_smoothing=5)
    probe.schedule = Schedule.every(1)
    alone, draws, _ = _train_with_noise(curve=True)
    monitored, monitored_draws, stats = _train_with_noise({"snapshot": snapshot}, [probe], curve=True)
    assert stats["curve"].run >= 12 and not stats["curve"].failed
    assert all(torch.equal(monitored[k], v) for k, v in alone.items()) and torch.equal(monitored_draws, draws)


def test_a_live_snapshot_of_a_model_that_trains_differently_in_train_mode_gets_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="probescope"):
        Monitor(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)), [StepReader()], snapshot="live")
        assert not caplog.records
        model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Dropout(0.1), nn.Linear(4, 2))
        Monitor(model, [StepReader()], snapshot="live")
    (record,) = caplog.records
    assert "1 (BatchNorm1d), 2 (Dropout)" in record.getMessage() and "snapshot='copy'" in record.getMessage()


class ActivationLog:
    """A user's activation logger: a hook owned by an object that a deepcopy cannot copy."""

    def __init__(self, module: nn.Module):
        self.lock = threading.Lock()
        self.batches: list[int] = []
        module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        with self.lock:
            self.batches.append(inputs[0].shape[0])


def test_the_snapshots_run_without_the_models_hooks_so_a_logger_sees_training_only(
    mlp, blobs, tmp_path, caplog
):
    from probescope import PredictionProbe

    log = ActivationLog(mlp[0])
    probe = PredictionProbe(blobs.x_valid[:10], blobs.y_valid[:10], schedule=Schedule.every(1))
    with caplog.at_level(logging.INFO, logger="probescope"):
        monitor = Monitor(mlp, [probe], run_dir=tmp_path / "run").start()  # once: a lock's deepcopy
    log.batches.clear()  # the probe's check of the model at attach ran it on the live model
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 4, batch=50)
    monitor.close()
    assert monitor.stats[probe.name].run >= 5  # step 0 and four steps
    assert log.batches == [50] * 4
    assert any("run without its hooks (0: forward hook)" in r.getMessage() for r in caplog.records)
    assert open_run(tmp_path / "run").meta["snapshot_detail"]["dropped_hooks"] == ["0: forward hook"]


def test_with_snapshot_hooks_the_snapshots_keep_them(mlp, blobs):
    from probescope import PredictionProbe

    calls = []
    mlp[0].register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    probe = PredictionProbe(blobs.x_valid[:10], blobs.y_valid[:10], schedule=Schedule.every(1))
    monitor = Monitor(mlp, [probe], snapshot_hooks=True)
    calls.clear()  # the probe's check of the model at attach ran it on the live model
    monitor.start()
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 2, batch=50)
    monitor.close()
    assert sorted(calls) == [10] * monitor.stats[probe.name].run + [50] * 2
    assert monitor.snapshot_detail["dropped_hooks"] == []


def test_the_snapshots_keep_torchs_hooks_that_compute_the_forward():
    import warnings

    from torch.nn.utils import prune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's newer API is a parametrization
        normed = nn.utils.weight_norm(nn.Linear(3, 8))
    model = nn.Sequential(normed, nn.Tanh(), prune.l1_unstructured(nn.Linear(8, 2), "weight", 0.5))
    monitor = Monitor(model, [StepReader()], final_frame=False)
    assert monitor.snapshot_detail["dropped_hooks"] == []
    with torch.no_grad():  # the hooks recompute each weight from these at every forward
        model[0].weight_g.mul_(2.0)
        model[2].weight_mask[0].zero_()
    shadow = monitor._pool.acquire()
    x = torch.randn(5, 3)
    torch.testing.assert_close(shadow(x), model(x), rtol=0, atol=0)
    assert torch.all(shadow(x)[:, 0] == model[2].bias[0])
    monitor.close()


class Rebuilt(nn.Linear):
    """A module whose deepcopy builds a new one from its state (as Keras's copy does)."""

    def __deepcopy__(self, memo):
        copy = Rebuilt(self.in_features, self.out_features)
        copy.load_state_dict(self.state_dict())
        return copy


class Guarded(nn.Linear):
    """A module holding something no deepcopy can copy."""

    def __init__(self):
        super().__init__(2, 3)
        self.lock = threading.Lock()


def test_a_model_that_cannot_be_copied_is_refused_clearly_and_sync_still_works():
    with pytest.raises(ValueError, match=r"cannot copy a Guarded \(TypeError: .*lock.*snapshot='sync'"):
        Monitor(Guarded(), [StepReader()])
    Monitor(Guarded(), [StepReader()], snapshot="sync").start().close()


def test_a_model_whose_copy_cannot_be_paired_tensor_by_tensor_is_refused_clearly():
    with pytest.raises(ValueError, match=r"does not copy its tensors one by one.*snapshot='sync' or 'live'"):
        Monitor(Rebuilt(2, 3), [StepReader()])
    monitor = Monitor(Rebuilt(2, 3), [StepReader()], snapshot="sync")  # no copy: fine
    monitor.close()


def test_a_host_snapshot_evaluates_consistent_frames(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    probe = StepReader(schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], snapshot_host=True, ring_capacity=256).start()
    _steps_set_to_their_number(monitor, model, 30)
    monitor.close()
    frames = [f for f in monitor.ring(probe.name).read_since(-1) if f.step > 0]
    assert len(frames) >= 3 and all(np.all(f.data["values"] == f.step) for f in frames)
    assert monitor._pool.describe()["host"] is True


def _replace_head(model):
    model[1] = nn.Linear(16, 4)


@pytest.mark.parametrize(
    ("snapshot", "change", "seen"),
    [
        ("copy", _replace_head, "parameter '1.weight' was replaced by another"),
        ("copy", nn.Module.double, "parameter '0.weight' went from float32 on cpu to float64 on cpu"),
        ("sync", nn.Module.double, "parameter '0.weight' is float64 on cpu, not float32 on cpu"),
        ("live", nn.Module.double, "parameter '0.weight' is float64 on cpu, not float32 on cpu"),
    ],
)
def test_a_model_changed_after_the_monitor_stops_the_probes_that_read_it_with_one_warning(
    snapshot, change, seen, caplog
):
    from probescope import LossProbe

    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    reader, losses = StepReader(schedule=Schedule.every(1)), LossProbe(schedule=Schedule.every(1))
    monitor = Monitor(model, [reader, losses], snapshot=snapshot, ring_capacity=64).start()
    monitor.drain(10)
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        monitor.step()
        monitor.drain(10)
    with caplog.at_level(logging.WARNING, logger="probescope"):
        change(model)  # a copy snapshot would go on copying the old tensors: stale frames
        x = torch.randn(8, 16, dtype=next(model.parameters()).dtype)
        for _ in range(4):
            loss = model(x).square().mean()
            loss.backward()
            monitor.step(loss=loss)
            monitor.drain(10)
    monitor.close()
    warnings = [r.getMessage() for r in caplog.records if "model changed" in r.getMessage()]
    assert len(warnings) == 1 and seen in warnings[0] and "StepReader 'weights'" in warnings[0]
    assert "LossProbe" not in warnings[0]
    assert not monitor.summary()["probes"]["weights"]["enabled"]
    assert [f.step for f in monitor.ring("weights").read_since(-1)] == [0, 1, 2, 3]  # none after
    assert monitor.stats["loss"].run == 1 + 3 + 4  # step 0, then every step: it reads no model
    assert monitor.latest("loss").data["series/train_loss/steps"].tolist() == [4, 5, 6, 7]


def test_a_sync_probe_reads_a_replaced_or_added_layer_and_goes_on(caplog):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    probe = StepReader(schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], snapshot="sync", ring_capacity=64).start()
    with caplog.at_level(logging.WARNING, logger="probescope"):
        _replace_head(model)
        model.append(nn.Linear(4, 4))
        _steps_set_to_their_number(monitor, model, 4)
    monitor.close()
    assert not [r for r in caplog.records if "model changed" in r.getMessage()]
    assert monitor.latest("weights").data["values"].tolist() == [3.0] * (
        16 * 16 + 16 + 16 * 4 + 4 + 4 * 4 + 4
    )


def test_a_model_with_lazy_modules_not_yet_initialized_is_refused_with_the_way_out():
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"0.weight, 0.bias, 2.weight, 2.bias are not initialized.*model\(x"):
        Monitor(model, [StepReader()])
    model(torch.randn(1, 5))
    Monitor(model, [StepReader()]).close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"snapshot_params": ["decoder.*"]}, "match no tensor"),
        ({"snapshot_params": ["0.*"], "snapshot_host": True}, "copies the whole model"),
        ({"snapshot_params": ["0.*"], "snapshot": "sync"}, "'copy' snapshot only"),
    ],
)
def test_snapshot_options_that_cannot_work_are_refused(kwargs, message):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=message):
        Monitor(model, [StepReader()], **kwargs)


def test_cuda_graphs_on_a_cpu_model_fall_back_with_one_reason(mlp, blobs, caplog):
    from probescope import PredictionProbe

    probe = PredictionProbe(blobs.x_valid, blobs.y_valid, schedule=Schedule.every(1))
    grid = GridProbe(blobs.x_train, resolution=24, smoothing=0.5, schedule=Schedule.every(1))
    with (
        caplog.at_level(logging.WARNING, logger="probescope"),
        Monitor(mlp, [probe, grid], cuda_graphs=True) as monitor,
    ):
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 3)
    messages = [r.getMessage() for r in caplog.records if "CUDA graphs are off" in r.getMessage()]
    assert sorted(messages) == [
        "grid: CUDA graphs are off (the model is not on a CUDA device); it runs eagerly",
        "prediction: CUDA graphs are off (the model is not on a CUDA device); it runs eagerly",
    ]
    for name in ("prediction", "grid"):
        assert monitor.stats[name].failed == 0 and monitor.stats[name].run >= 4
    expected = probe.evaluate(mlp, None)["prob_true"].numpy()  # the final frame: final weights
    np.testing.assert_allclose(monitor.latest("prediction").data["prob_true"], expected, rtol=1e-6)
    assert grid.graphs.replays == 0 and monitor.latest("grid").data["rgba"].shape == (24, 24, 4)


def test_history_is_converted_only_for_probes_that_read_it(mlp, blobs):
    from probescope import LossProbe

    grid = GridProbe(blobs.x_train, resolution=8, schedule=Schedule.every(2))
    with Monitor(mlp, [grid]) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 6)
        monitor.drain(30)
        assert monitor.stats["grid"].run >= 3
        assert monitor.history._columns["batch_loss"]._done == 0  # no frame paid for the losses
    assert monitor.history._columns["batch_loss"]._done == 6  # close reads them once, for the summary

    losses = LossProbe(schedule=Schedule.every(2))
    with Monitor(mlp, [losses]) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 6)
    assert monitor.history._columns["batch_loss"]._done == 6


def test_a_cpu_model_whose_training_threads_leave_no_core_to_the_probes_gets_a_warning(mlp, caplog):
    import os

    from probescope import LossProbe

    cores, before = os.cpu_count() or 1, torch.get_num_threads()
    evaluates = [GridProbe(torch.randn(20, 2), resolution=4)]
    series = [LossProbe()]  # the loop's series only: next to nothing to compute, no hint
    try:
        for threads, probes, warned in [
            (cores, evaluates, True),
            (max(1, cores - 1), evaluates, cores == 1),
            (cores, series, False),
            (cores, [], False),
        ]:
            torch.set_num_threads(threads)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="probescope"):
                Monitor(mlp, probes, final_frame=False).start().close()
            hints = [r for r in caplog.records if "oversubscription" in r.message]
            assert len(hints) == int(warned)
            for record in hints:
                assert record.levelno == logging.WARNING and "training waits for a core" in record.message
    finally:
        torch.set_num_threads(before)


def test_the_probe_threads_count_stays_with_the_probes_threads():
    """torch keeps a process-wide thread count that a thread takes as its own the first time it
    runs parallel work, and ``torch.set_num_threads`` sets both. The probe worker's
    ``torch.set_num_threads(1)`` once became the training thread's count when it had set its
    own but run no parallel op yet (as the Monitor's oversubscription hint advises), and the
    count of every thread started later. A fresh interpreter, so that no thread ran parallel
    work before, with a recorder, the Monitor's other thread."""
    import subprocess
    import sys

    code = """
import tempfile, threading
import torch
torch.set_num_threads(3)
from torch import nn
from probescope import Monitor, Probe

class ThreadsProbe(Probe):
    def evaluate(self, model, context):
        return {"threads": torch.tensor(torch.get_num_threads())}

model = nn.Linear(2, 3)
seen = {}
with tempfile.TemporaryDirectory() as run_dir:
    monitor = Monitor(model, [ThreadsProbe(name="threads")], run_dir=run_dir, final_frame=False).start()
    seen["caller"] = torch.get_num_threads()
    later = threading.Thread(target=lambda: seen.setdefault("later", torch.get_num_threads()))
    later.start()
    later.join()
    monitor.close()
    seen["recorder"] = monitor.writer.frames_written
    seen["probe"] = int(monitor.latest("threads").data["threads"])
print(seen["caller"], seen["later"], seen["probe"], seen["recorder"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-4:] == ["3", "3", "1", "1"]  # caller, a later thread, probe, recorder


def test_a_torch_profile_shows_the_monitors_snapshots_and_frames(mlp, blobs, recording_probe):
    from torch.profiler import ProfilerActivity, profile

    import probescope.monitor as monitor_module

    try:
        config = {"experimental_config": torch._C._profiler._ExperimentalConfig(profile_all_threads=True)}
    except (AttributeError, TypeError):
        pytest.skip("this torch's profiler records one thread only")
    probe = recording_probe(name="grid", schedule=Schedule.every(2))
    assert isinstance(monitor_module._traced("x"), type(monitor_module.contextlib.nullcontext()))
    with Monitor(mlp, [probe], final_frame=False) as monitor:
        monitor.drain()  # the frame of step 0, launched at start, ends before the profile starts
        with profile(activities=[ProfilerActivity.CPU], **config) as prof:
            assert not isinstance(monitor_module._traced("x"), type(monitor_module.contextlib.nullcontext()))
            train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 6)
            monitor.drain()
    names = [e.name for e in prof.events()]
    assert names.count("probescope.snapshot") == 3  # steps 2, 4, 6 (step 0 came before)
    assert names.count("probescope.frame:grid") == 3
    assert probe.steps == [0, 2, 4, 6]


def test_values_given_with_a_step_are_recorded_at_it_before_its_frames():
    from probescope import LossProbe

    model = nn.Linear(2, 2)
    probe = LossProbe(schedule=Schedule.every(2))
    with Monitor(model, [probe], snapshot="sync") as monitor:
        for step in range(1, 5):
            monitor.step(loss=torch.tensor(1.0 / step), grad_norm=10.0 * step)
        monitor.log(after=1.0)  # log(): at the step that ended
    frame = monitor.latest("loss")
    assert frame.step == 4
    assert frame.data["series/grad_norm/steps"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(frame.data["series/grad_norm/values"], [10.0, 20.0, 30.0, 40.0])
    assert frame.data["series/train_loss/steps"].tolist() == [1, 2, 3, 4]
    history = monitor.history.read()
    assert history["after"].steps.tolist() == [4]
    monitor.step(grad_norm=1.0)  # after close: ignored, as log() is
    assert monitor.history.read()["grad_norm"].steps.tolist() == [1, 2, 3, 4]


class WrappedOptimizer(torch.optim.Optimizer):
    """As accelerate's AcceleratedOptimizer: a torch Optimizer by class, never initialised as
    one, stepping the optimizer it holds."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_the_monitor_takes_the_torch_optimizer_a_wrapper_holds():
    model = nn.Linear(2, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.25)
    wrapper = WrappedOptimizer(inner)
    with pytest.raises(AttributeError):  # what a step hook on the wrapper itself does
        wrapper.register_step_pre_hook(lambda *_: None)
    monitor = Monitor(model, [], optimizer=wrapper)
    assert monitor.optimizer is inner
    calls = []
    monitor.optimizer.register_step_pre_hook(lambda *_: calls.append(1))  # as the CUDA path does
    model(torch.ones(1, 2)).sum().backward()
    wrapper.step()
    assert calls == [1]
    with monitor:
        monitor.step()
    assert monitor.history.read()["lr"].values.tolist() == [0.25]
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert Monitor(model, [], optimizer=plain).optimizer is plain


def test_copies_are_planned_against_the_devices_free_memory():
    from probescope.snapshot import plan_copies

    mib = 2**20
    assert plan_copies(100 * mib, 2, None, whole=True) == (2, False, None)  # no limit known
    assert plan_copies(100 * mib, 2, 400 * mib, whole=True) == (2, False, None)  # half the free
    size, host, why = plan_copies(100 * mib, 2, 399 * mib, whole=True)
    assert (size, host) == (1, False)
    assert why == (
        "2 copies of 100.0 MiB would take over half of the device's 399.0 MiB free; it keeps one "
        "(a frame is skipped while the one before still runs)"
    )
    size, host, why = plan_copies(100 * mib, 2, 150 * mib, whole=True)
    assert (size, host) == (2, True) and "they are kept in host memory (snapshot_host=True)" in why
    size, host, why = plan_copies(100 * mib, 2, 150 * mib, whole=False)  # a part: not on the host
    assert (size, host) == (1, False) and why.endswith("it keeps one, which may not fit")


def test_copies_to_the_host_are_planned_against_its_available_memory():
    from probescope.snapshot import plan_copies

    mib = 2**20
    # From a full device to a host with room for one: one copy there.
    size, host, why = plan_copies(100 * mib, 2, 150 * mib, whole=True, host_free=250 * mib)
    assert (size, host) == (1, True)
    assert why.startswith(
        "2 copies of 100.0 MiB would take over half of the device's 150.0 MiB free; one is kept"
    )
    assert "over half of the host's 250.0 MiB free; it keeps one" in why
    # Room for none anywhere: no copy (the snapshot probes between steps).
    size, host, why = plan_copies(100 * mib, 2, 150 * mib, whole=True, host_free=150 * mib)
    assert (size, host) == (0, False) and why == (
        "2 copies of 100.0 MiB would take over half of the device's 150.0 MiB free, and 2 copies "
        "of 100.0 MiB would take over half of the host's 150.0 MiB free; not one copy fits"
    )
    # A model on the CPU (or a host snapshot): one copy, else none; the host has no host to go to.
    assert plan_copies(100 * mib, 2, 399 * mib, whole=True, on_host=True)[:2] == (1, False)
    size, host, why = plan_copies(100 * mib, 2, 199 * mib, whole=False, on_host=True)
    assert (size, host) == (0, False) and why.endswith("the host's 199.0 MiB free; not one copy fits")


@pytest.mark.parametrize(
    ("device_free", "host_free", "host", "expected"),
    [(250, 1000, False, (1, False)), (150, 1000, False, (2, True)), (150, 250, False, (1, True)),
     (150, 150, False, (0, False)), (10, 450, True, (2, True)), (10, 250, True, (1, True))],
)  # fmt: skip
def test_copies_of_a_cuda_model_go_by_the_devices_memory_then_the_hosts(
    monkeypatch, device_free, host_free, host, expected
):
    from probescope import snapshot

    mib = 2**20
    monkeypatch.setattr(snapshot, "device_free_memory", lambda device: device_free * mib)
    monkeypatch.setattr(snapshot, "host_free_memory", lambda: host_free * mib)
    copies, held, _ = snapshot.place_copies(100 * mib, 2, torch.device("cuda", 0), host, whole=True)
    assert (copies, held) == expected


def test_a_large_maps_ring_keeps_the_slots_the_hosts_memory_has_room_for(monkeypatch, caplog):
    from probescope import monitor as monitor_module
    from probescope.ring import RING_SHARE

    frame = 64 * 64 * (4 * 3 + 4)  # a 64 x 64 map of three classes: probabilities and colours
    monkeypatch.setattr(monitor_module, "host_free_memory", lambda: int(4 * frame / RING_SHARE))
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    grid = GridProbe(torch.randn(50, 2), resolution=64, schedule=Schedule.every(1))
    with caplog.at_level(logging.WARNING, logger="probescope"):
        monitor = Monitor(model, [grid, LossProbe()], snapshot="sync")
    assert monitor.ring(grid.name).capacity == 4 and monitor.ring("loss").capacity == 8
    assert "their rings keep 4 slots" in caplog.text
    with monitor:
        for _ in range(6):
            monitor.step()
    assert monitor.latest(grid.name).step == 6
    assert monitor.ring(grid.name).nbytes["host"] == 4 * frame  # four slots, full


def test_host_memory_is_what_linux_has_available_or_less_under_a_control_groups_limit(monkeypatch, tmp_path):
    import os

    from probescope import snapshot

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(snapshot, "_CGROUPS", ())  # no control group to read
    available = snapshot.host_free_memory()
    assert available is not None and 0 < available <= total
    mib = 2**20
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{1024 * mib}\n")
    (v2 / "memory.current").write_text(f"{600 * mib}\n")
    (v2 / "memory.stat").write_text(f"anon 1\ninactive_file {100 * mib}\nactive_file 5\n")
    group = (str(v2 / "memory.max"), str(v2 / "memory.current"), str(v2 / "memory.stat"), "inactive_file")
    monkeypatch.setattr(snapshot, "_CGROUPS", (group,))
    assert snapshot.host_free_memory() == min(available, 524 * mib)  # limit - usage + inactive cache
    (v2 / "memory.max").write_text("max\n")  # no limit: the host's
    assert abs(snapshot.host_free_memory() - available) < 512 * mib


@pytest.mark.parametrize(("free_copies", "copies", "strategy"), [(3, 1, "copy"), (1, 0, "sync")])
def test_copies_of_a_cpu_model_take_at_most_half_the_hosts_memory(
    monkeypatch, caplog, free_copies, copies, strategy
):
    from probescope import snapshot

    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    per_copy = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(snapshot, "host_free_memory", lambda: free_copies * per_copy)
    with caplog.at_level(logging.WARNING, logger="probescope"):
        monitor = Monitor(model, [StepReader(schedule=Schedule.every(1))], ring_capacity=64)
    assert (monitor._pool.strategy, len(monitor._pool._free), monitor._pool.host) == (strategy, copies, False)
    assert sum("would take over half of the host's" in r.getMessage() for r in caplog.records) == 1
    if strategy == "sync":
        assert "probes run between steps instead (snapshot='sync')" in caplog.text
    frames = _frames_of_steps(monitor, model)
    assert frames and all(np.all(f.data["values"] == f.step) for f in frames)


def _frames_of_steps(monitor, model, steps=6):
    """Train-free steps whose weights are the step number; the frames read back."""
    probe = next(iter(monitor.probes.values()))
    monitor.start()
    _steps_set_to_their_number(monitor, model, steps)
    monitor.close()
    return [f for f in monitor.ring(probe.name).read_since(-1) if f.step > 0]


def test_copies_that_run_out_of_memory_go_to_the_host_or_to_sync(monkeypatch, caplog):
    from probescope import snapshot

    made = []

    def device_copy_fails(model, shared, hooks=False, place=None):
        if place is None and not made:
            made.append("failed")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return copy_shadow(model, shared, hooks=hooks, place=place)

    copy_shadow = snapshot.shadow_copy
    monkeypatch.setattr(snapshot, "shadow_copy", device_copy_fails)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    with caplog.at_level(logging.WARNING, logger="probescope"):
        monitor = Monitor(model, [StepReader(schedule=Schedule.every(1))], ring_capacity=64)
    assert monitor._pool.host and monitor._pool.strategy == "copy" and len(monitor._pool._free) == 2
    assert (
        "its copies do not fit in cpu's memory (CUDA out of memory. Tried to allocate 2.00 GiB)"
        in caplog.text
    )
    frames = _frames_of_steps(monitor, model)
    assert frames and all(np.all(f.data["values"] == f.step) for f in frames)

    made.clear()  # a copy of part of the model cannot go to the host: probes run between steps
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="probescope"):
        monitor = Monitor(model, [StepReader(schedule=Schedule.every(1))], snapshot_params=["1.*"])
    assert monitor._pool.strategy == "sync" and monitor._pool.inline and monitor.snapshot_bytes == 0
    assert not monitor.snapshot_detail["host"]
    assert "probes run between steps instead (snapshot='sync')" in caplog.text
    frames = _frames_of_steps(monitor, model)
    assert frames and all(np.all(f.data["values"] == f.step) for f in frames)

    def every_copy_fails(model, shared, hooks=False, place=None):
        raise torch.cuda.OutOfMemoryError("out of memory")

    monkeypatch.setattr(snapshot, "shadow_copy", every_copy_fails)  # the host has no room either
    monitor = Monitor(model, [StepReader(schedule=Schedule.every(1))])
    assert monitor._pool.strategy == "sync" and not monitor.snapshot_detail["host"]
    frames = _frames_of_steps(monitor, model)  # the live model, between steps
    assert frames and all(np.all(f.data["values"] == f.step) for f in frames)


def test_a_host_snapshot_is_made_on_the_host_not_through_the_models_device():
    from probescope.snapshot import SnapshotPool

    with torch.device("meta"):  # no data on the model's device to copy: the copies cannot come from it
        model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    pool = SnapshotPool(model, host=True)
    for shadow in pool._free:
        tensors = [*shadow.parameters(), *shadow.buffers()]
        assert tensors and all(t.device.type == "cpu" for t in tensors)
        assert [t.shape for t in tensors] == [t.shape for t in [*model.parameters(), *model.buffers()]]


def test_the_learning_rate_of_a_step_is_the_one_it_used():
    """Read as the optimizer steps: a scheduler stepped before the Monitor's step does not
    shift the series (the lr recorded at step s is the one step s used)."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    used = []
    with Monitor(model, [], optimizer=optimizer) as monitor:
        for _ in range(4):
            model(torch.ones(3, 2)).sum().backward()
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            monitor.step()
    lr = monitor.history.read()["lr"]
    assert lr.steps.tolist() == [1, 2, 3, 4] and lr.values.tolist() == used == [1.0, 0.5, 0.25, 0.125]
    assert not optimizer._optimizer_step_pre_hooks  # the Monitor's hook goes with it


def test_the_learning_rate_is_the_stepping_optimizers_when_the_loop_replaces_it():
    """A new optimizer for the model (after unfreezing, a second phase) is heard; another
    model's optimizer (a GAN's other network) is not."""
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    theirs = torch.optim.SGD(other.parameters(), lr=9.0)
    with Monitor(model, [], optimizer=optimizer) as monitor:
        for step in range(4):
            if step == 2:
                optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
            model(torch.ones(3, 2)).sum().backward()
            optimizer.step()
            other(torch.ones(3, 2)).sum().backward()
            theirs.step()  # (after the model's: it would be the last rate noted)
            monitor.step()
    assert monitor.history.read()["lr"].values.tolist() == [1.0, 1.0, 0.5, 0.5]


def test_a_tensor_learning_rate_is_copied_as_the_step_uses_it():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(1.0))
    with Monitor(model, [], optimizer=optimizer) as monitor:
        for _ in range(3):
            model(torch.ones(3, 2)).sum().backward()
            optimizer.step()
            optimizer.param_groups[0]["lr"].mul_(0.5)  # a scheduler writing it in place
            monitor.step()
    assert monitor.history.read()["lr"].values.tolist() == [1.0, 0.5, 0.25]


@pytest.mark.parametrize("snapshot", ["copy", "sync"])
def test_probes_that_read_nothing_of_the_model_take_no_snapshot(mlp, blobs, snapshot):
    grid = GridProbe(blobs.x_train, blobs.y_train, resolution=8, schedule=Schedule.never())
    loss = LossProbe(schedule=Schedule.every(1))
    monitor = Monitor(mlp, [grid, loss], snapshot=snapshot)
    acquired = []
    acquire = monitor._pool.acquire

    def counting(*args, **kwargs):
        acquired.append(monitor.step_count)
        return acquire(*args, **kwargs)

    monitor._pool.acquire = counting
    with monitor:
        for _ in range(10):
            monitor.drain()  # (a frame due while the one before runs would be skipped)
            monitor.step(loss=1.0)
    assert monitor.stats["loss"].run == 11 and monitor.stats["loss"].skipped == 0
    assert acquired == [10]  # the grid's final frame only (before: a copy for every loss frame)
