"""CheckpointProbe: the best weights, scored on held-out data from the snapshot it saves."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probescope import CheckpointProbe, Monitor, Schedule, open_run
from probescope.compare import compare_runs
from tests.conftest import train_steps


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.argmax(1) == target).double().mean()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 7))


def _score(state: dict, x, y, fn) -> float:
    model = _model()
    model.load_state_dict(state)
    with torch.no_grad():
        return float(fn(model(x), y))


def _run(tmp_path, blobs, probe, steps=12, **monitor_kwargs):
    model = _model()
    with Monitor(model, [probe], run_dir=tmp_path / "run", **monitor_kwargs) as monitor:
        train_steps(monitor, model, blobs.x_train, blobs.y_train, steps)
    return model, open_run(tmp_path / "run")


def test_best_keeps_the_weights_that_scored_best_and_they_score_it_again(tmp_path, blobs):
    valid = (blobs.x_valid, blobs.y_valid)
    probe = CheckpointProbe(valid=valid, loss_fn=F.cross_entropy, schedule=Schedule.every(2))
    _, run = _run(tmp_path, blobs, probe)
    frames = list(run.probe("checkpoint").frames())
    values = [float(f.data["value"]) for f in frames]
    assert [f.step for f in frames] == [0, 2, 4, 6, 8, 10, 12]
    running_best = np.minimum.accumulate(values)
    saved = [bool(f.data["saved"]) for f in frames]
    assert saved == [True] + [values[i] < running_best[i - 1] for i in range(1, len(values))]
    assert [float(f.data["best"]) for f in frames] == list(running_best)
    index = json.loads((run.path / "checkpoints" / "checkpoints.json").read_text())
    best = index["best"]
    assert best["value"] == min(values) and best["step"] == frames[int(np.argmin(values))].step
    assert index["files"] == [best] and best["file"] == "model.pt"
    state = torch.load(run.path / "checkpoints" / "model.pt", weights_only=True)
    assert _score(state, *valid, F.cross_entropy) == pytest.approx(best["value"], rel=1e-6)
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["checkpoints.json", "model.pt"]


def test_max_metric_and_min_delta_decide_what_counts_as_better(tmp_path, blobs):
    valid = (blobs.x_valid, blobs.y_valid)
    probe = CheckpointProbe(
        "acc", valid=valid, loss_fn=F.cross_entropy, metrics={"acc": accuracy}, min_delta=0.05,
        schedule=Schedule.every(1),
    )  # fmt: skip
    assert probe.comp == "max"
    _, run = _run(tmp_path, blobs, probe, steps=10)
    values = [float(f.data["value"]) for f in run.probe("checkpoint").frames()]
    best, want = values[0], [True]
    for v in values[1:]:
        want.append(v > best + 0.05)
        best = v if want[-1] else best
    assert [bool(f.data["saved"]) for f in run.probe("checkpoint").frames()] == want
    assert any(want[1:]) and not all(want)  # the threshold mattered in both directions
    state = torch.load(run.path / "checkpoints" / "model.pt", weights_only=True)
    assert _score(state, *valid, accuracy) == pytest.approx(best)


def test_all_keeps_a_file_per_frame_holding_the_weights_of_that_step(tmp_path, blobs):
    model = _model()
    probe = CheckpointProbe(keep="all", fname="w", directory=tmp_path / "ck", schedule=Schedule.every(3))
    states = {}
    with Monitor(model, [probe], snapshot="sync") as monitor:  # no run directory: its own folder
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        states[0] = {k: v.clone() for k, v in model.state_dict().items()}
        for step in range(1, 8):
            loss = F.cross_entropy(model(blobs.x_train[:50]), blobs.y_train[:50])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            states[step] = {k: v.clone() for k, v in model.state_dict().items()}
            monitor.step(loss=loss.detach())
    files = sorted(p.name for p in (tmp_path / "ck").glob("w_*.pt"))
    assert files == [f"w_{s:07d}.pt" for s in (0, 3, 6, 7)]  # 7: the final frame at close
    for name in files:
        saved = torch.load(tmp_path / "ck" / name, weights_only=True)
        for key, tensor in states[int(name[2:9])].items():
            assert torch.equal(saved[key], tensor), (name, key)
    index = json.loads((tmp_path / "ck" / "checkpoints.json").read_text())
    assert [f["file"] for f in index["files"]] == files


def test_last_keeps_one_file_the_final_weights(tmp_path, blobs):
    probe = CheckpointProbe(keep="last", schedule=Schedule.never())  # tsai's at_end
    model, run = _run(tmp_path, blobs, probe, steps=5)
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["checkpoints.json", "model.pt"]
    saved = torch.load(run.path / "checkpoints" / "model.pt", weights_only=True)
    for key, tensor in model.state_dict().items():
        assert torch.equal(saved[key], tensor)
    assert run.probe("checkpoint").steps() == [5]


def test_load_best_puts_the_best_weights_into_the_model_at_close(tmp_path, blobs):
    valid = (blobs.x_valid, blobs.y_valid)
    probe = CheckpointProbe(
        "acc", valid=valid, loss_fn=F.cross_entropy, metrics={"acc": accuracy}, load_best=True,
        schedule=Schedule.every(4),
    )  # fmt: skip
    model, run = _run(tmp_path, blobs, probe, steps=20)
    best = torch.load(run.path / "checkpoints" / "model.pt", weights_only=True)
    final = torch.load(run.path / "model.pt", weights_only=True)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, best[key]) and torch.equal(final[key], best[key])
    assert compare_runs([run.path]).loc[str(run.path), "checkpoint/best"] == pytest.approx(
        max(float(f.data["value"]) for f in run.probe("checkpoint").frames())
    )


def test_without_valid_it_scores_the_value_logged_at_the_snapshots_step(tmp_path, blobs, caplog):
    probe = CheckpointProbe(schedule=Schedule.every_epoch() | Schedule.steps([4]))
    model = _model()
    logged = {}
    with (
        caplog.at_level(logging.WARNING, logger="probescope"),
        Monitor(model, [probe], run_dir=tmp_path / "run") as monitor,
    ):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _epoch in range(4):
            for _ in range(3):
                loss = F.cross_entropy(model(blobs.x_train[:60]), blobs.y_train[:60])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                monitor.step(loss=loss.detach())
                monitor.drain(10)  # no frame skipped because the one before still runs
            with torch.no_grad():
                value = float(F.cross_entropy(model(blobs.x_valid), blobs.y_valid))
            logged[monitor.step_count] = value
            monitor.after_validate(valid_loss=value)
            monitor.end_epoch()
            monitor.drain(10)
    frames = list(open_run(tmp_path / "run").probe("checkpoint").frames())
    unscored = [f for f in frames if f.step in (0, 4)]  # before training; mid-epoch
    assert all(np.isnan(float(f.data["value"])) and not f.data["saved"] for f in unscored)
    assert {f.step: float(f.data["value"]) for f in frames if f.step not in (0, 4)} == logged
    assert "no 'valid_loss' was logged at step 4" in caplog.text and caplog.text.count("was logged") == 1
    best_step = min(logged, key=logged.get)
    index = json.loads((tmp_path / "run" / "checkpoints" / "checkpoints.json").read_text())
    assert index["best"]["step"] == best_step


def test_without_a_directory_or_with_a_partial_snapshot_it_is_disabled_and_training_goes_on(
    tmp_path, blobs, caplog
):
    model = _model()
    with caplog.at_level(logging.WARNING, logger="probescope"):
        with Monitor(model, [CheckpointProbe(keep="last")]) as monitor:
            train_steps(monitor, model, blobs.x_train, blobs.y_train, 3)
        assert "give directory=... or run the Monitor with a run_dir" in caplog.text
        assert monitor.step_count == 3 and monitor.stats["checkpoint"].run == 0
        probe = CheckpointProbe(keep="last", directory=tmp_path / "ck")
        with Monitor(model, [probe], snapshot_params=["0.*"]) as monitor:
            train_steps(monitor, model, blobs.x_train, blobs.y_train, 3)
        assert "would mix steps" in caplog.text and not (tmp_path / "ck").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": "some"}, "keep must be one of"),
        ({"comp": "less"}, "comp must be one of"),
        ({"min_delta": -1}, "min_delta must be a number >= 0"),
        ({"keep": "last", "load_best": True}, "load_best needs the best weights kept"),
        ({"fname": "a/b"}, "fname must be a plain file name"),
        ({"metric": "acc", "valid": "data"}, "valid must be a pair"),
        ({"valid": ([[0.0, 1.0]], [0])}, "valid data needs a loss_fn"),
        ({"metric": "acc", "valid": ([[0.0, 1.0]], [0]), "loss_fn": F.cross_entropy}, "not scored on valid"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CheckpointProbe(**kwargs)


def test_a_checkpoint_probe_is_rebuilt_from_its_runs_spec(tmp_path, blobs):
    from probescope import load_probes

    probe = CheckpointProbe(
        "acc", valid=(blobs.x_valid, blobs.y_valid), loss_fn=F.cross_entropy, metrics={"acc": accuracy},
        min_delta=0.01, keep="all", fname="m", schedule=Schedule.every(5),
    )  # fmt: skip
    _run(tmp_path, blobs, probe, steps=5)
    (loaded,) = load_probes(tmp_path / "run")
    assert loaded.config() == {**probe.config(), "directory": None}  # the run's, chosen at start
    assert torch.equal(loaded.valid.x, probe.valid.x) and loaded.valid.metrics["acc"] is accuracy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_each_file_holds_the_weights_of_its_step(tmp_path, blobs):
    model = _model().cuda()
    x, y = blobs.x_train[:64].cuda(), blobs.y_train[:64].cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = CheckpointProbe(keep="all", directory=tmp_path, schedule=Schedule.every(2))
    states = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    with Monitor(model, [probe], optimizer=optimizer, final_frame=False) as monitor:
        for step in range(1, 9):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            states[step] = {k: v.clone() for k, v in model.state_dict().items()}
            monitor.step(loss=loss.detach())
            monitor.drain(10)  # the worker keeps up, so no frame is skipped
    files = sorted(tmp_path.glob("model_*.pt"))
    assert [int(f.stem[6:]) for f in files] == [0, 2, 4, 6, 8]
    for file in files:
        saved = torch.load(file, weights_only=True)
        for key, tensor in states[int(file.stem[6:])].items():
            assert torch.equal(saved[key], tensor.cpu()), (file.name, key)


def test_a_value_given_with_the_step_scores_that_steps_frame(tmp_path, blobs, caplog):
    """Validated every 3 steps, inside the loop: ``step(loss, valid_loss=...)`` records the
    value before the step's frame, so every frame of a validated step is scored."""
    probe = CheckpointProbe(schedule=Schedule.every(3))
    model = _model()
    logged = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        caplog.at_level(logging.WARNING, logger="probescope"),
        Monitor(model, [probe], run_dir=tmp_path / "run") as monitor,
    ):
        for step in range(1, 13):
            loss = F.cross_entropy(model(blobs.x_train[:60]), blobs.y_train[:60])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            values = {}
            if step % 3 == 0:
                with torch.no_grad():
                    values["valid_loss"] = logged[step] = float(
                        F.cross_entropy(model(blobs.x_valid), blobs.y_valid)
                    )
            monitor.step(loss=loss.detach(), **values)
            monitor.drain(10)
    assert "was logged" not in caplog.text
    frames = {f.step: float(f.data["value"]) for f in open_run(tmp_path / "run").probe("checkpoint").frames()}
    assert np.isnan(frames.pop(0)) and frames == logged
    index = json.loads((tmp_path / "run" / "checkpoints" / "checkpoints.json").read_text())
    assert index["best"]["step"] == min(logged, key=logged.get)
