"""Sinks: every frame and every point of the run's series, on the recorder thread; TensorBoard."""

import io
import itertools
import logging

import numpy as np
import pytest
import torch
from torch import nn

from probescope import GridProbe, LossProbe, Monitor, PredictionProbe, Schedule, StatsProbe, open_run
from probescope.sinks import Sink, TensorBoardSink, export_tensorboard

pytest.importorskip("tensorboard")
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _events(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    return events


def _scalars(events, tag):
    return {e.step: e.value for e in events.Scalars(tag)}


class Kept(Sink):
    """Keeps what it is given."""

    wants_scalars = True

    def __init__(self):
        self.probes, self.frames, self.series, self.closed = {}, [], {}, False

    def add_probe(self, name, kind, config, static):
        self.probes[name] = kind

    def write(self, frame):
        self.frames.append((frame.probe, frame.step))

    def scalars(self, series):
        self.series = {name: s.values.copy() for name, s in series.items()}

    def close(self):
        self.closed = True


def _train(monitor, model, x, y, steps, losses, keep=lambda loss: loss.item()):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        i = (step * 50) % (x.shape[0] - 50)
        loss = nn.functional.cross_entropy(model(x[i : i + 50]), y[i : i + 50])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(keep(loss))
        monitor.step(loss=loss)
        monitor.log(lr_scale=0.5 + step)
        if step % 10 == 9:
            monitor.end_epoch()


def test_a_live_run_reaches_tensorboard_as_its_run_directory_holds_it(tmp_path, mlp, blobs):
    x, y = blobs.x_train, blobs.y_train
    probes = [
        GridProbe(x, y, resolution=24, schedule=Schedule.every(7)),
        PredictionProbe(x[:64], y[:64], schedule=Schedule.every(5)),
        LossProbe(valid=(blobs.x_valid, blobs.y_valid), loss_fn=nn.functional.cross_entropy),
        StatsProbe(schedule=Schedule.every(4)),
    ]
    kept, losses = Kept(), []
    sinks = [TensorBoardSink(tmp_path / "tb"), kept]
    with Monitor(mlp, probes, run_dir=tmp_path / "run", sinks=sinks) as monitor:
        _train(monitor, mlp, x, y, 30, losses)
    run = open_run(tmp_path / "run")
    events = _events(tmp_path / "tb")

    # Every batch loss once, at its step (monitor.step counts from 1), in float32.
    train = _scalars(events, "loss/train_loss")
    assert sorted(train) == list(range(1, 31))
    np.testing.assert_allclose([train[s] for s in range(1, 31)], losses, rtol=1e-6)
    assert _scalars(events, "loss/lr_scale") == {s: pytest.approx(s - 0.5) for s in range(1, 31)}
    # The LossProbe's own series (valid loss per frame, epoch means) come from its frames.
    loss_frames = list(run.probe("loss").frames())
    steps, values = (loss_frames[-1].data[f"series/valid_loss/{k}"] for k in ("steps", "values"))
    valid = _scalars(events, "loss/valid_loss")
    assert sorted(valid) == steps.tolist()
    np.testing.assert_allclose([valid[s] for s in steps.tolist()], values, rtol=1e-6)
    assert sorted(_scalars(events, "loss/train_loss_epoch")) == [10, 20, 30]
    # Each number of each frame, at its step.
    accuracy = _scalars(events, "prediction/accuracy")
    for frame in run.probe("prediction").frames():
        assert accuracy[frame.step] == pytest.approx(float(frame.data["accuracy"]))
    assert len(events.Histograms("prediction/prob_true")) == len(run.probe("prediction"))
    table = run.probe("stats").table()
    column = next(c for c in table.columns if c.endswith("weight/l2"))
    got = _scalars(events, f"stats/{column}")
    assert sorted(got) == table["step"].tolist()
    np.testing.assert_allclose([got[s] for s in table["step"]], table[column], rtol=1e-6)
    # Each map as it was recorded, pixel for pixel (PNG is lossless).
    images = events.Images("grid/map")
    grid = list(run.probe("grid").frames())
    assert [e.step for e in images] == [f.step for f in grid]
    for event, frame in zip(images, grid, strict=True):
        decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
        np.testing.assert_array_equal(decoded, frame.data["rgba"])
    # The other sink got every frame too, in each probe's order, and was closed.
    for name, record in run.probes.items():
        assert [s for p, s in kept.frames if p == name] == record.steps()
    assert kept.probes == {n: r.kind for n, r in run.probes.items()} and kept.closed
    np.testing.assert_allclose(kept.series["batch_loss"], losses, rtol=1e-6)


def test_each_labels_probabilities_reach_tensorboard_as_one_histogram_a_frame(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(30, 4)
    y = (x[:, :3] > 0).float()
    probe = PredictionProbe(x, y, schedule=Schedule.every(1))
    with Monitor(
        nn.Linear(4, 3), [probe], snapshot="sync", sinks=[TensorBoardSink(tmp_path / "tb")]
    ) as monitor:
        monitor.step()
    events = _events(tmp_path / "tb")
    histograms = events.Histograms("prediction/prob_true")
    assert [h.step for h in histograms] == [0, 1]
    assert histograms[-1].histogram_value.num == 90  # every sample's every label
    assert histograms[-1].histogram_value.sum == pytest.approx(
        float(monitor.latest("prediction").data["prob_true"].sum())
    )
    assert _scalars(events, "prediction/exact_match")[1] == pytest.approx(
        float(monitor.latest("prediction").data["exact_match"])
    )


def test_sinks_work_without_a_run_directory_and_a_failing_one_is_dropped(tmp_path, mlp, blobs, caplog):
    class Broken(Sink):
        def write(self, frame):
            raise OSError("no space left on device")

    kept, losses = Kept(), []
    probe = GridProbe(blobs.x_train, resolution=8, schedule=Schedule.every(3))
    with (
        caplog.at_level(logging.WARNING, logger="probescope"),
        Monitor(mlp, [probe], sinks=[Broken(), kept]) as monitor,
    ):
        _train(monitor, mlp, blobs.x_train, blobs.y_train, 12, losses)
    steps = [s for _, s in kept.frames]  # those a busy worker did not skip, and the final one
    assert steps[0] == 0 and steps[-1] == 12 and all(s % 3 == 0 for s in steps) and steps == sorted(steps)
    summary = monitor.summary()["probes"]["grid"]
    assert len(steps) == summary["frames"] and summary["failed"] == 0 and len(losses) == 12
    warned = [r.getMessage() for r in caplog.records if "sink Broken failed" in r.getMessage()]
    assert len(warned) == 1 and "OSError: no space left on device" in warned[0]
    with pytest.raises(TypeError, match="a sink needs a write"):
        Monitor(mlp, [], sinks=[object()])


def test_a_recorded_run_exports_to_the_same_event_files(tmp_path, mlp, blobs):
    from probescope.cli import main

    x, y = blobs.x_train, blobs.y_train
    probes = [
        GridProbe(x, y, resolution=64, schedule=Schedule.every(6)),
        PredictionProbe(x[:64], y[:64], schedule=Schedule.every(6)),
        LossProbe(max_points=8, schedule=Schedule.every(6)),  # its frames' series are cut
    ]
    losses = []
    with Monitor(mlp, probes, run_dir=tmp_path / "run", sinks=[TensorBoardSink(tmp_path / "live")]) as m:
        _train(m, mlp, x, y, 18, losses)
        m.log(test_accuracy=0.5)  # after the last frames
    assert main(["export", str(tmp_path / "run"), "--format", "tensorboard", "--quiet"]) == 0
    live, exported = _events(tmp_path / "live"), _events(tmp_path / "run" / "exports" / "tensorboard")
    assert set(exported.Tags()["scalars"]) == set(live.Tags()["scalars"])
    for tag in live.Tags()["scalars"]:  # the run's series whole (its history), every frame's numbers
        assert _scalars(exported, tag) == _scalars(live, tag), tag
    assert [e.step for e in exported.Images("grid/map")] == [e.step for e in live.Images("grid/map")]
    # One probe, named: its frames only.
    only = export_tensorboard(open_run(tmp_path / "run"), tmp_path / "grid", probes=["grid"], progress=False)
    assert only == tmp_path / "grid" and _events(only).Tags()["scalars"] == []
    # A smaller image for TensorBoard: every 4th grid point of the 64 x 64 map.
    sink = TensorBoardSink(tmp_path / "strided", max_image_side=20)
    record = open_run(tmp_path / "run").probe("grid")
    sink.write(record.frame(-1))
    sink.close()
    (event,) = _events(tmp_path / "strided").Images("grid/map")
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    np.testing.assert_array_equal(decoded, record.frame(-1).data["rgba"][::4, ::4])
    with pytest.raises(ValueError, match="max_image_side must be at least 1"):
        TensorBoardSink(tmp_path / "bad", max_image_side=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("high_priority", [False, True])
def test_device_losses_reach_a_sink_exactly_whichever_stream_trains(mlp, blobs, high_priority):
    model = mlp.cuda()
    x, y = blobs.x_train.cuda(), blobs.y_train.cuda()
    kept, losses = Kept(), []
    monitor = Monitor(model, [], sinks=[kept], high_priority_training=high_priority)
    with monitor, monitor.training_stream():
        _train(monitor, model, x, y, 200, losses, keep=lambda loss: loss.detach())  # no sync
    np.testing.assert_allclose(kept.series["batch_loss"], torch.stack(losses).cpu().numpy(), rtol=1e-6)


def test_a_history_that_cannot_be_read_costs_the_sinks_their_series_with_one_warning(mlp, blobs, caplog):
    kept, losses = Kept(), []
    probe = GridProbe(blobs.x_train, resolution=8, schedule=Schedule.every(2))
    monitor = Monitor(mlp, [probe], sinks=[kept])

    def unreadable(cut=None):
        raise RuntimeError("device lost")

    monitor.history.read = unreadable
    with caplog.at_level(logging.WARNING, logger="probescope"), monitor:
        for _ in range(4):  # the recorder wakes for each frame, and asks again each time
            _train(monitor, mlp, blobs.x_train, blobs.y_train, 5, losses)
            monitor.drain(10)
    warned = [r.getMessage() for r in caplog.records if "get no series" in r.getMessage()]
    assert warned == ["Monitor: the sinks and the run's journal get no series (RuntimeError: device lost)"]
    assert len(kept.frames) >= 5 and kept.series == {}  # frames still arrive


def test_a_resumed_run_goes_on_in_the_same_tensorboard_directory(tmp_path, mlp, blobs):
    run_dir, log_dir, first, second = tmp_path / "run", tmp_path / "tb", [], []

    def probes():
        return [
            GridProbe(blobs.x_train, resolution=8, schedule=Schedule.every(5)),
            LossProbe(schedule=Schedule.every(10)),
        ]

    with Monitor(mlp, probes(), run_dir=run_dir, sinks=[TensorBoardSink(log_dir)]) as monitor:
        _train(monitor, mlp, blobs.x_train, blobs.y_train, 30, first)
    # Started again from the weights of step 12: TensorBoard drops the points after it, and the
    # series the resumed Monitor takes back (to step 10, its last loss frame) are not written again.
    with Monitor(mlp, probes(), run_dir=run_dir, sinks=[TensorBoardSink(log_dir)], resume=12) as monitor:
        _train(monitor, mlp, blobs.x_train, blobs.y_train, 8, second)
    events = _events(log_dir)
    train = _scalars(events, "loss/train_loss")
    assert sorted(train) == list(range(1, 21))  # 1-12 once (not again from the resumed history)
    np.testing.assert_allclose([train[s] for s in range(1, 21)], first[:12] + second, rtol=1e-6)
    # One image per map the run shows (a busy worker may skip some): none of the superseded.
    assert [e.step for e in events.Images("grid/map")] == open_run(run_dir).probe("grid").steps()


def test_a_live_sink_writes_the_runs_series_whole_whatever_comes_first(tmp_path):
    """A LossProbe frame's series are cut to its max_points; the live sink takes the run's
    series from the history (scalars) and from a frame only the series the probe makes
    itself, so a frame that arrives before the points it cut leaves none out."""
    from probescope.history import Series
    from probescope.ring import Frame

    sink = TensorBoardSink(tmp_path / "live")
    sink.add_probe("loss", "loss", {"valid_samples": 0, "metrics": []}, {})
    sink.scalars({})  # the Monitor's first wake: nothing recorded yet
    cut = np.array([1, 4, 8, 12])  # what the frame of step 12 kept of steps 1..12
    data = {"series/train_loss/steps": cut, "series/train_loss/values": 1.0 / cut,
            "series/train_loss_epoch/steps": np.array([12]),
            "series/train_loss_epoch/values": np.array([0.5])}  # fmt: skip
    sink.write(Frame("loss", 0, 12, 1, 0.0, data))
    steps = np.arange(1, 13)
    sink.scalars({"batch_loss": Series(steps, np.zeros(12, np.int64), 1.0 / steps)})
    sink.close()
    events = _events(tmp_path / "live")
    assert sorted(_scalars(events, "loss/train_loss")) == list(range(1, 13))
    assert _scalars(events, "loss/train_loss_epoch") == {12: 0.5}  # the probe's own, from its frame


def test_a_run_not_closed_exports_its_series_from_its_loss_frames(tmp_path, mlp, blobs):
    x, y = blobs.x_train, blobs.y_train
    with Monitor(mlp, [LossProbe(schedule=Schedule.every(4))], run_dir=tmp_path / "run") as m:
        _train(m, mlp, x, y, 8, [])
    (tmp_path / "run" / "history.npz").unlink()  # as a run whose process was killed has none
    log_dir = export_tensorboard(open_run(tmp_path / "run"), tmp_path / "tb", progress=False)
    assert sorted(_scalars(_events(log_dir), "loss/train_loss")) == list(range(1, 9))


def test_event_files_of_one_process_sort_by_name_in_the_order_they_were_opened(tmp_path, monkeypatch):
    # TensorBoard reads a directory's files in name order: a resumed run's purge must come after
    # the points it drops, also for a process's tenth file in one second.
    from probescope import sinks

    monkeypatch.setattr(sinks, "_FILES", itertools.count(8))
    monkeypatch.setattr(sinks.time, "time", lambda: 1_700_000_000.0)
    files = [sinks.EventFile(tmp_path) for _ in range(4)]  # counters 8 to 11, in one second
    for f in files:
        f.close()
    assert sorted(f.path.name for f in files) == [f.path.name for f in files]
