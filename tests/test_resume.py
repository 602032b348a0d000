"""A run resumed in its own directory (a preempted job started again): one timeline, nothing lost."""

import json
import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import probescope.shutdown as shutdown
from probescope import (
    CheckpointProbe,
    CurveProbe,
    GridProbe,
    LossProbe,
    Monitor,
    Schedule,
    StatsProbe,
    open_run,
)
from probescope.compare import compare_runs
from probescope.run import JOURNAL, journal_entry, read_journal
from tests.conftest import fit_curve


def _probes(blobs, resolution=12):
    x, y = blobs.x_train, blobs.y_train
    valid = (blobs.x_valid, blobs.y_valid)
    return [
        GridProbe(x, y, resolution=resolution, schedule=Schedule.every(5)),
        LossProbe(valid=valid, loss_fn=nn.functional.cross_entropy, schedule=Schedule.every(10)),
        StatsProbe(schedule=Schedule.every(5)),
        CheckpointProbe(valid=valid, loss_fn=nn.functional.cross_entropy, schedule=Schedule.every(10)),
    ]


def _train(monitor, model, blobs, steps, losses, optimizer):
    x, y = blobs.x_train, blobs.y_train
    for _ in range(steps):
        i = (len(losses) * 50) % (x.shape[0] - 50)
        loss = nn.functional.cross_entropy(model(x[i : i + 50]), y[i : i + 50])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        monitor.step(loss=loss)
        if len(losses) % 10 == 0:
            monitor.end_epoch()
        monitor._worker.wait_idle(10)  # every due frame taken: the test compares whole timelines


def test_a_closed_run_resumed_reads_as_one_run(tmp_path, mlp, blobs, capsys):
    from probescope.cli import main

    run_dir, losses = tmp_path / "run", []
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)
    with Monitor(mlp, _probes(blobs), run_dir=run_dir) as first:
        _train(first, mlp, blobs, 30, losses, optimizer)
    assert first.summary() == first.summary()  # closed: the wall time no longer grows
    second = Monitor(mlp, _probes(blobs), run_dir=run_dir, resume=True)
    with second:  # the same script, started again: the model and optimizer are the loop's own
        assert second.resumed_at == 30 and second.step_count == 30
        _train(second, mlp, blobs, 20, losses, optimizer)
    assert second.step_count == 50

    run = open_run(run_dir)
    assert run.status == "finished" and run.meta["summary"]["steps"] == 50
    assert run.meta["summary"]["wall_seconds"] > first.summary()["wall_seconds"]  # both processes'
    (resumed,) = run.meta["resumes"]
    assert resumed["step"] == 30 and resumed["previous_status"] == "finished"
    grid = run.probe("grid")
    assert grid.steps() == list(range(0, 55, 5))  # one timeline: 0..30 from the first, 35..50 after
    seqs = [f.seq for f in grid.frames()]
    assert seqs == sorted(set(seqs)) and resumed["superseded_frames"] == 0
    # The loss graph goes on: every batch loss of both processes, the valid loss of each frame.
    last = run.probe("loss").frame(-1).data
    np.testing.assert_array_equal(last["series/train_loss/steps"], np.arange(1, 51))
    np.testing.assert_allclose(last["series/train_loss/values"], losses, rtol=1e-6)
    assert last["series/valid_loss/steps"].tolist() == [0, 10, 20, 30, 40, 50]
    assert last["series/train_loss_epoch/steps"].tolist() == [10, 20, 30, 40, 50]
    table = run.probe("stats").table()
    assert table["step"].tolist() == list(range(0, 55, 5))
    # The best checkpoint is the best of the whole run, whichever process scored it.
    index = json.loads((run_dir / "checkpoints" / "checkpoints.json").read_text())
    values = dict(zip(*(last[f"series/valid_loss/{k}"].tolist() for k in ("steps", "values")), strict=True))
    scored = {f.step: float(f.data["value"]) for f in run.probe("checkpoint").frames()}
    assert index["best"]["value"] == pytest.approx(min(scored.values()))
    assert scored[40] == pytest.approx(values[40])
    row = compare_runs([run_dir]).iloc[0]
    assert row["steps"] == 50 and row["resumes"] == 1
    assert main(["info", str(run_dir)]) == 0
    assert "resumed   at step 30 " in capsys.readouterr().out


def test_a_killed_run_resumes_from_the_step_of_the_weights_loaded(tmp_path, mlp, blobs, caplog):
    run_dir, losses = tmp_path / "run", []
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)
    with Monitor(mlp, _probes(blobs), run_dir=run_dir, final_frame=False) as first:
        _train(first, mlp, blobs, 23, losses, optimizer)
    _as_if_killed(run_dir)  # after step 23 (its series whole in history.npz, as closed)
    assert open_run(run_dir).status == "stopped"
    before = json.loads((run_dir / "checkpoints" / "checkpoints.json").read_text())

    with caplog.at_level(logging.WARNING, logger="probescope"):
        guessed = Monitor(mlp, _probes(blobs), run_dir=run_dir, resume=True).start()
    assert guessed.resumed_at == 20  # the last frame's step, with a warning to say so
    assert any("was not closed (status stopped)" in r.getMessage() for r in caplog.records)
    guessed.close()

    # The loop restored a checkpoint of step 12: the frames of later steps go aside.
    losses = losses[:12]
    second = Monitor(mlp, _probes(blobs), run_dir=run_dir, resume=12).start()
    assert second.step_count == 12 and second.resumed_at == 12
    _train(second, mlp, blobs, 8, losses, optimizer)
    second.close()

    run = open_run(run_dir)
    assert run.probe("grid").steps() == [0, 5, 10, 15, 20]
    assert run.probe("stats").table()["step"].tolist() == [0, 5, 10, 15, 20]
    assert [r["previous_status"] for r in run.meta["resumes"]] == ["stopped", "finished"]
    # The series up to step 12 as the run closed last held them (history.npz: whole, steps 11
    # and 12 too, which no LossProbe frame before step 12 holds), then the new.
    last = run.probe("loss").frame(-1).data
    assert last["series/train_loss/steps"].tolist() == list(range(1, 21))
    np.testing.assert_allclose(last["series/train_loss/values"], losses, rtol=1e-6)
    assert run.history()["train_loss"].steps.tolist() == list(range(1, 21))
    # Checkpoints after step 12 went aside; the best is the best of those the run keeps.
    index = json.loads((run_dir / "checkpoints" / "checkpoints.json").read_text())
    scored = {f.step: float(f.data["value"]) for f in run.probe("checkpoint").frames()}
    assert sorted(scored) == [0, 10, 20]
    assert index["best"]["value"] == pytest.approx(min(scored.values()))
    if before["best"]["step"] > 12:  # the first process's best came later: kept aside
        assert (run_dir / "checkpoints" / "superseded" / "model.pt").exists()


def test_resuming_refuses_other_probes_a_live_writer_and_bad_arguments(tmp_path, mlp, blobs):
    run_dir = tmp_path / "run"
    with Monitor(mlp, _probes(blobs), run_dir=run_dir):
        pass
    refused = Monitor(mlp, _probes(blobs, resolution=16), run_dir=run_dir, resume=True)
    with pytest.raises(ValueError, match="probe 'grid' is not the one this run recorded"):
        refused.start()
    assert open_run(run_dir).status == "finished" and "resumes" not in open_run(run_dir).meta  # untouched
    assert refused not in shutdown.OPEN  # nothing to close at exit
    live = Monitor(mlp, _probes(blobs), run_dir=run_dir, resume=True).start()
    with pytest.raises(RuntimeError, match="the run is still being written"):
        Monitor(mlp, [], run_dir=run_dir, resume=True).start()
    live.close()
    with pytest.raises(ValueError, match="give run_dir"):
        Monitor(mlp, [], resume=True)
    with pytest.raises(ValueError, match="exclude each other"):
        Monitor(mlp, [], run_dir=run_dir, resume=True, overwrite=True)
    with pytest.raises(ValueError, match="a step >= 0"):
        Monitor(mlp, [], run_dir=run_dir, resume=-1)
    for bad in ("yes", (1,), (1, 2, 3), (1.5, 2), 2.0):
        with pytest.raises(TypeError, match="resume must be True, False, a step or a"):
            Monitor(mlp, [], run_dir=run_dir, resume=bad)
    with pytest.raises(ValueError, match="a step >= 0"):
        Monitor(mlp, [], run_dir=run_dir, resume=(3, -1))
    existing = Monitor(mlp, [], run_dir=run_dir)
    with pytest.raises(FileExistsError, match=r"resume it \(Monitor\(resume=True\)\)"):
        existing.start()
    assert existing not in shutdown.OPEN


def test_a_curve_probe_goes_on_with_its_loss_series(tmp_path):
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 100)
    y = torch.sin(2 * x)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    for resume in (False, True):
        probe = CurveProbe(x[:, None], y[:, None], schedule=Schedule.every(5))
        with Monitor(model, [probe], run_dir=tmp_path / "run", resume=resume) as monitor:
            fit_curve(monitor, model, x, y, 10)
    frames = list(open_run(tmp_path / "run").probe("curve").frames())
    assert [f.step for f in frames] == [0, 5, 10, 15, 20]
    totals = frames[-1].data["total_loss_series"]
    assert frames[-1].data["total_loss_steps"].tolist() == [0, 5, 10, 15, 20]
    np.testing.assert_allclose(totals, [float(f.data["total_loss"]) for f in frames])


def test_the_whole_history_is_kept_and_a_resumed_run_goes_on_from_it_exactly(tmp_path, mlp, blobs):
    """A LossProbe frame holds the series cut to ``max_points``; history.npz holds them whole,
    values logged after the last frame too, and a run resumed after a closed one goes on from
    it, not from the cut series."""
    run_dir, losses = tmp_path / "run", []
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)

    def probes():
        return [LossProbe(max_points=8, schedule=Schedule.every(10))]

    with Monitor(mlp, probes(), optimizer=optimizer, run_dir=run_dir) as first:
        _train(first, mlp, blobs, 60, losses, optimizer)
        first.log(test_accuracy=0.75)  # after the last frame (step 60), at its step
    run = open_run(run_dir)
    assert len(run.probe("loss").frame(-1).data["series/train_loss/steps"]) < 60  # cut
    history = run.history()
    assert history["train_loss"].steps.tolist() == list(range(1, 61))
    np.testing.assert_allclose(history["train_loss"].values, losses, rtol=1e-6)
    assert history["train_loss"].epochs.tolist() == [(s - 1) // 10 for s in range(1, 61)]
    assert history["test_accuracy"].steps.tolist() == [60] and history["test_accuracy"].values[0] == 0.75
    assert history["lr"].steps.tolist() == list(range(1, 61)) and np.all(history["lr"].values == 0.1)

    with Monitor(mlp, probes(), optimizer=optimizer, run_dir=run_dir, resume=True) as second:
        _train(second, mlp, blobs, 5, losses, optimizer)
    history = open_run(run_dir).history()
    assert history["train_loss"].steps.tolist() == list(range(1, 66))
    np.testing.assert_allclose(history["train_loss"].values, losses, rtol=1e-6)
    assert history["test_accuracy"].steps.tolist() == [60]


def test_a_run_without_a_loss_probe_keeps_its_history_too(tmp_path, mlp, blobs):
    with Monitor(mlp, [GridProbe(blobs.x_train, blobs.y_train, resolution=8)], run_dir=tmp_path / "run") as m:
        for step in range(1, 4):
            m.step(loss=torch.tensor(float(step)), grad_norm=2.0 * step)
    history = open_run(tmp_path / "run").history()
    assert sorted(history) == ["grad_norm", "train_loss"]
    assert history["train_loss"].values.tolist() == [1.0, 2.0, 3.0]
    assert history["grad_norm"].steps.tolist() == [1, 2, 3]


def _as_if_killed(run_dir) -> None:
    """run.json as a process killed mid-run leaves it: running, its writer gone."""
    meta = json.loads((run_dir / "run.json").read_text())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    meta.update(status="running", writer={**meta["writer"], "pid": child.pid})
    meta.pop("summary", None), meta.pop("finished", None)
    (run_dir / "run.json").write_text(json.dumps(meta))


def _cut_losses() -> LossProbe:
    return LossProbe(max_points=8, schedule=Schedule.every(10))  # its frames cut the series


def _killed_copy(tmp_path, mlp, blobs, steps, losses, optimizer, monkeypatch):
    """A run's directory as it was while it trained (copied after ``steps`` steps, once the
    journal held them), made to read as killed there; the run itself then closes."""
    monkeypatch.setattr(Monitor, "JOURNAL_SECONDS", 0.0)
    run_dir, killed = tmp_path / "run", tmp_path / "killed"
    with Monitor(mlp, [_cut_losses()], optimizer=optimizer, run_dir=run_dir, final_frame=False) as monitor:
        _train(monitor, mlp, blobs, steps, losses, optimizer)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            journal = read_journal(run_dir / JOURNAL) if (run_dir / JOURNAL).exists() else {}
            if "train_loss" in journal and journal["train_loss"].steps[-1:].tolist() == [steps]:
                break
            time.sleep(0.02)
        shutil.copytree(run_dir, killed)
    assert (run_dir / "history.npz").exists() and not (run_dir / JOURNAL).exists()  # closed: whole
    assert not (killed / "history.npz").exists()
    _as_if_killed(killed)
    return killed


def test_a_killed_runs_series_come_back_whole_from_its_journal(tmp_path, mlp, blobs, monkeypatch):
    """A LossProbe frame holds the series cut to ``max_points``; the journal holds every value
    up to its last write, and a run resumed after the kill goes on from them exactly."""
    losses = []
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)
    killed = _killed_copy(tmp_path, mlp, blobs, 23, losses, optimizer, monkeypatch)
    run = open_run(killed)
    assert run.status == "stopped" and len(run.probe("loss").frame(-1).data["series/train_loss/steps"]) < 20
    history = run.history()
    assert history["train_loss"].steps.tolist() == list(range(1, 24))
    np.testing.assert_allclose(history["train_loss"].values, losses, rtol=1e-6)
    assert history["lr"].steps.tolist() == list(range(1, 24))

    losses = losses[:20]  # the weights of step 20 (its last frame's) are loaded
    with Monitor(mlp, [_cut_losses()], run_dir=killed, resume=True) as m:
        assert m.resumed_at == 20
        _train(m, mlp, blobs, 5, losses, optimizer)
    history = open_run(killed).history()
    assert history["train_loss"].steps.tolist() == list(range(1, 26))
    np.testing.assert_allclose(history["train_loss"].values, losses, rtol=1e-6)
    assert not (killed / JOURNAL).exists()


def test_what_came_after_the_journals_last_write_comes_from_the_last_loss_frame(
    tmp_path, mlp, blobs, monkeypatch
):
    losses = []
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)
    killed = _killed_copy(tmp_path, mlp, blobs, 20, losses, optimizer, monkeypatch)
    # As if the process had been killed after step 20's frame, before the journal had steps 16-20.
    journal = read_journal(killed / JOURNAL)
    entries = [
        journal_entry(name, *(getattr(one, k)[one.steps <= 15] for k in ("steps", "epochs", "values")))
        for name, one in journal.items()
    ]
    (killed / JOURNAL).write_bytes(b"".join(entries))
    frame = open_run(killed).probe("loss").frame(-1)
    assert frame.step == 20
    kept = frame.data["series/train_loss/steps"]
    assert 0 < (kept > 15).sum() < 5  # the frame's cut series: some of steps 16-20

    later = kept[kept > 15]
    read = open_run(killed).history()["train_loss"]  # what readers (info, compare, export) see
    monitor = Monitor(mlp, [_cut_losses()], run_dir=killed, resume=True)
    monitor.start()
    resumed = monitor.history.read()["batch_loss"]  # what the resumed run goes on from
    monitor.close()
    for series in (read, resumed):
        assert series.steps.tolist() == [*range(1, 16), *later.tolist()]
        np.testing.assert_allclose(series.values[:15], losses[:15], rtol=1e-6)
        np.testing.assert_allclose(series.values[15:], frame.data["series/train_loss/values"][kept > 15])


def test_an_entry_of_a_journal_cut_short_is_left_out(tmp_path):
    path = tmp_path / JOURNAL
    whole = journal_entry("train_loss", [1, 2], [0, 0], [0.5, float("nan")])
    later = journal_entry("train_loss", [3, 4], [0, 0], [0.25, 0.125])
    for cut in (len(later) - 1, 10):  # in its records, in its header
        path.write_bytes(whole + journal_entry("lr", [1], [0], [0.1]) + later[:cut])
        series = read_journal(path)
        assert series["train_loss"].steps.tolist() == [1, 2] and series["train_loss"].values[0] == 0.5
        assert np.isnan(series["train_loss"].values[1]) and series["lr"].values.tolist() == [0.1]
    path.write_bytes(whole + later)
    assert read_journal(path)["train_loss"].values.tolist()[2:] == [0.25, 0.125]
