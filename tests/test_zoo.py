"""The model zoo trains on generated data; the modadd demo finds the grokking transition."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probescope import open_run
from probescope.cli import main
from probescope.zoo import ZOO, build, crossing_step, modadd_task, texture_task, train_zoo_run


@pytest.mark.parametrize("name", sorted(ZOO))
def test_each_zoo_model_trains_and_records_its_statistics(name, tmp_path):
    result = train_zoo_run(name, tmp_path / name, steps=6, every=3, progress=False)
    table = open_run(tmp_path / name).probe("stats").table()
    assert table.step.iloc[0] == 0 and table.step.iloc[-1] == 6  # the first and the final frame
    weights = [c for c in table.columns if c.startswith("weight/") and c.endswith("/l2")]
    grads = [c for c in table.columns if c.startswith("grad/")]
    acts = [c for c in table.columns if c.startswith("act/")]
    assert weights and grads and acts
    assert np.isfinite(table[weights + acts].to_numpy()).all()
    assert np.isfinite(table.loc[table.step > 0, grads].to_numpy()).all()
    assert table["loss/valid_accuracy"].between(0, 1).all() and (table["loss/train_loss"][1:] > 0).all()
    assert result["summary"]["probes"]["stats"]["failed"] == 0


def test_zoo_tasks_are_what_they_say():
    task = modadd_task(p=13, train_fraction=0.5, seed=0)
    x = torch.cat([task.x_train, task.x_valid])
    y = torch.cat([task.y_train, task.y_valid])
    assert len(x) == 169 and len({tuple(r) for r in x.tolist()}) == 169  # every pair, once
    assert torch.equal(y, (x[:, 0] + x[:, 1]) % 13)
    images = texture_task(3, n=200, seed=1)
    assert images.x_train.shape == (160, 3, 32, 32) and set(images.y_train.tolist()) <= set(range(10))
    model, task = build("lenet5", seed=0)
    assert model(task.x_valid[:5]).shape == (5, 10)
    with pytest.raises(ValueError, match="unknown zoo model"):
        build("vgg")


def test_lenet5_learns_the_generated_textures(tmp_path):
    result = train_zoo_run("lenet5", tmp_path / "lenet", steps=150, every=50, grads=False, progress=False)
    assert result["valid_accuracy"][-1][1] > 0.5  # ten classes: chance is 0.1


def test_modadd_demo_finds_a_state_change_where_validation_accuracy_crosses_half(tmp_path, capsys):
    out = tmp_path / "modadd"
    assert main(["demo", "--dataset", "modadd", "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "latent states over 2 run(s)" in printed and "crosses 50 % at step" in printed
    meta = json.loads((out / "analysis" / "states.json").read_text())
    steps = ZOO["mlp"].steps
    for seed in range(2):
        table = open_run(out / f"seed{seed}").probe("stats").table()
        curve = list(zip(table.step, table["loss/valid_accuracy"], strict=True))
        cross = crossing_step(curve)
        # Grokking: the training set is fitted long before the valid set.
        fitted = crossing_step(list(zip(table.step, table["loss/train_accuracy"], strict=True)), 0.99)
        assert cross is not None and fitted is not None and fitted < cross
        assert table["loss/valid_accuracy"].iloc[-1] > 0.9
        boundaries = meta["boundaries"][f"seed{seed}"]
        nearest = min(abs(b - cross) for b in boundaries)
        assert nearest <= 0.05 * steps, (cross, boundaries)
    assert (out / "analysis" / "report.html").stat().st_size > 100_000
    # One more seed, its states decoded while it trained (filtered: from the past only), also
    # changes state where it groks; the change is in its run's table and in the printout.
    live = open_run(out / "live").probe("stats").table()
    cross = crossing_step(list(zip(live.step, live["loss/valid_accuracy"], strict=True)))
    states = live["state"].to_numpy()
    changes = live.step.to_numpy()[1:][states[1:] != states[:-1]]
    assert cross is not None and min(abs(changes - cross)) <= 0.05 * steps, (cross, changes)
    assert "decoded live with this model while it trained" in printed
    nearest = changes[np.argmin(abs(changes - cross))]
    assert "the change nearest it, " in printed and f" at step {nearest}, driven by " in printed
