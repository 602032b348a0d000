"""Many runs, one table: compare_runs and ``probescope compare``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from probescope import CurveProbe, Monitor, Schedule, StatsProbe, open_run
from probescope.cli import main
from probescope.compare import compare_runs
from tests.conftest import fit_curve, record_blobs_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    long = record_blobs_run(root / "long", grid_every=3, other_every=5, steps=15, epoch_every=5)
    short = record_blobs_run(root / "short", grid_every=3, other_every=5, steps=6, epoch_every=5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.linspace(-3, 3, 120)
    y = torch.sin(x)
    with Monitor(model, [CurveProbe(x, y, schedule=Schedule.every(2))], run_dir=root / "curve") as monitor:
        fit_curve(monitor, model, x, y, 8)
    from probescope.zoo import train_zoo_run

    train_zoo_run("mlp", root / "stats", steps=40, every=20, progress=False)
    return [long, short, root / "curve", root / "stats"]


def test_one_row_per_run_with_its_last_metrics_and_probe_costs(runs):
    table = compare_runs(runs)
    assert list(table.index) == [str(r) for r in runs]
    for path in runs:
        run, row = open_run(path), table.loc[str(path)]
        summary = run.meta["summary"]
        assert row["steps"] == summary["steps"] and row["parameters"] == run.meta["model"]["parameters"]
        for name, record in run.probes.items():
            assert row[f"{name}/frames"] == len(record)
            assert row[f"{name}/ms_per_frame"] == pytest.approx(summary["probes"][name]["mean_ms"])
            assert row[f"{name}/failed"] == 0
    long = open_run(runs[0])
    loss = long.probe("loss").frame(-1).data
    row = table.loc[str(runs[0])]
    assert row["train_loss"] == pytest.approx(float(loss["series/train_loss/values"][-1]))
    assert row["prediction/accuracy"] == pytest.approx(
        float(long.probe("prediction").frame(-1).data["accuracy"])
    )
    assert row["model"] == "Sequential" and row["status"] == "finished"
    assert list(table["nonfinite"]) == [""] * len(runs)  # no run diverged
    digests = table["probe_spec"]  # long and short were probed the same way, the others not
    assert digests.iloc[0] == digests.iloc[1] and len(set(digests)) == 3
    assert all(len(d) == 12 for d in digests)
    assert row["steps"] == 15 and table.loc[str(runs[1]), "steps"] == 6
    curve = open_run(runs[2]).probe("curve").frame(-1).data
    assert table.loc[str(runs[2]), "curve/total_loss"] == pytest.approx(float(curve["total_loss"]))
    assert np.isnan(table.loc[str(runs[2]), "prediction/accuracy"])  # it has no prediction probe
    # Nor a LossProbe: its losses come from the run's history, written when it closed.
    losses = open_run(runs[2]).history()["train_loss"]
    assert len(losses.values) == 8 and table.loc[str(runs[2]), "train_loss"] == losses.values[-1]
    stats = open_run(runs[3]).probe("stats").table()
    assert table.loc[str(runs[3]), "valid_accuracy"] == pytest.approx(stats["loss/valid_accuracy"].iloc[-1])


@pytest.mark.parametrize("suffix", [".csv", ".json", ".md"])
def test_compare_command_prints_and_writes_the_table(runs, tmp_path, capsys, suffix):
    out = tmp_path / f"table{suffix}"
    assert main(["compare", *map(str, runs[:2]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prediction/accuracy" in printed and str(runs[1]) in printed
    if suffix == ".csv":
        written = pd.read_csv(out, index_col="run")
        assert list(written.index) == [str(r) for r in runs[:2]]
    elif suffix == ".json":
        assert [r["run"] for r in json.loads(out.read_text())] == [str(r) for r in runs[:2]]
    else:
        lines = out.read_text().splitlines()
        assert lines[0].startswith("| run | status | model") and len(lines) == 4


def test_compare_refuses_what_it_cannot_read(runs, tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing")]) != 0
    assert "no run.json" in capsys.readouterr().err
    assert main(["compare", str(runs[0]), "--out", str(tmp_path / "t.xlsx")]) != 0
    assert "write .csv, .json or .md" in capsys.readouterr().err


def test_a_run_whose_loss_went_nan_is_warned_once_and_compared_with_where(blobs, tmp_path, caplog, capsys):
    torch.manual_seed(0)
    x, y = blobs.x_train, blobs.y_train
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 7))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = StatsProbe(batch=x[:16], schedule=Schedule.every(2))
    with Monitor(model, [probe], optimizer=optimizer, run_dir=tmp_path / "run") as monitor:
        for step in range(1, 11):
            if step == 7:
                with torch.no_grad():
                    model[0].weight[0, 0] = float("nan")  # the run blows up: every loss from step 7 is NaN
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss=loss)
    warned = [r.getMessage() for r in caplog.records if "not a finite number" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("Monitor: train_loss is nan at step 7,")
    summary = open_run(tmp_path / "run").meta["summary"]
    assert summary["nonfinite"] == {"train_loss": {"step": 7, "value": "nan"}}
    row = compare_runs([tmp_path / "run"]).iloc[0]
    assert row["nonfinite"] == "train_loss nan at step 7"
    assert np.isnan(row["train_loss"])  # the last loss, not the last finite one
    assert main(["info", str(tmp_path / "run")]) == 0
    assert "nonfinite train_loss: nan first at step 7" in capsys.readouterr().out


def test_a_label_prediction_probe_gives_its_exact_match_and_f1(tmp_path):
    from probescope import PredictionProbe

    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = (x > 0).float()
    with Monitor(nn.Linear(3, 3), [PredictionProbe(x, y)], run_dir=tmp_path / "labels") as monitor:
        monitor.step()
    row = compare_runs([tmp_path / "labels"]).iloc[0]
    last = open_run(tmp_path / "labels").probe("prediction").frame(-1).data
    for key in ("accuracy", "exact_match", "f1"):
        assert row[f"prediction/{key}"] == pytest.approx(float(last[key]))
    assert "prediction/mse" not in row.index
