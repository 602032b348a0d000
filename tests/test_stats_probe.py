"""StatsProbe: statistics at hook points against torch references, the table, the snapshot's grads."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probescope import Monitor, ProbeContext, Schedule, StatsProbe, open_run
from probescope.kernels.stats import STAT_NAMES, spectral_norm_reference, tensor_stats_reference
from probescope.snapshot import SnapshotPool


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 24), nn.ReLU(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))


def _data(n=200):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _train(model, monitor, x, y, steps, lr=0.05, drain=False):
    """``drain``: wait for the frames in flight after every step, so that no due frame is
    skipped because the one before it still runs (a count of frames is then exact)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        monitor.step(loss=loss.detach())
        if drain:
            monitor.drain()
    return losses


def _row(table: pd.DataFrame, step: int) -> pd.Series:
    rows = table[table.step == step]
    assert len(rows) == 1, f"one frame at step {step}, got {len(rows)}"
    return rows.iloc[0]


def test_weight_grad_and_activation_stats_match_torch_references(tmp_path):
    model, (x, y) = _model(), _data()
    batch = x[:37]
    probe = StatsProbe(["0", "2", "4", "1"], targets=("weights", "grads", "activations"), batch=batch,
                       schedule=Schedule.every(5), spectral_iterations=4)  # fmt: skip
    with Monitor(model, [probe], run_dir=tmp_path / "run") as mon:
        _train(model, mon, x, y, steps=23)
    table = open_run(tmp_path / "run").probe("stats").table()
    final = _row(table, 23)  # the final frame, taken at close with the final weights and grads
    for name, p in model.named_parameters():
        expected = tensor_stats_reference(p.detach(), probe.near_zero).numpy()
        got = np.array([final[f"weight/{name}/{s}"] for s in STAT_NAMES])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7, err_msg=name)
        expected = tensor_stats_reference(p.grad, probe.near_zero).numpy()
        got = np.array([final[f"grad/{name}/{s}"] for s in STAT_NAMES])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9, err_msg=f"grad {name}")
        if p.dim() == 2:  # warm-started power iteration vs the SVD: 0.5 %
            np.testing.assert_allclose(
                final[f"weight/{name}/spectral"], spectral_norm_reference(p), rtol=5e-3
            )
    outputs = {}
    hooks = [
        model[int(i)].register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)) for i in "0124"
    ]
    with torch.no_grad():
        model.eval()
        model(batch)
    for h in hooks:
        h.remove()
    for i in "0124":
        expected = tensor_stats_reference(outputs[i], probe.near_zero).numpy()
        got = np.array([final[f"act/{i}/{s}"] for s in STAT_NAMES])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7, err_msg=f"activation of {i}")


def test_each_frame_reads_the_weights_of_its_own_step(tmp_path):
    """Every weight set to the step number before each step: each frame's mean is its step."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    probe = StatsProbe("*", spectral=False, schedule=Schedule.every(1))
    with Monitor(model, [probe], run_dir=tmp_path / "run") as mon:
        for step in range(1, 40):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float(step))
            mon.step()
            time.sleep(0.01)  # give the worker time: a probe still busy would skip this step
    table = open_run(tmp_path / "run").probe("stats").table()
    table = table[table.step > 0]  # step 0: the initial weights
    assert len(table) >= 10
    for column in [c for c in table.columns if c.endswith("/mean")]:
        np.testing.assert_array_equal(table[column].to_numpy(), table.step.to_numpy(dtype=float), column)
        np.testing.assert_array_equal(table[column.replace("/mean", "/var")].to_numpy(), 0.0)


def test_losses_are_means_since_the_previous_frame_and_valid_metrics_come_from_the_snapshot(tmp_path):
    model, (x, y) = _model(), _data()
    probe = StatsProbe(
        "4", valid=(x, y), loss_fn=F.cross_entropy,
        metrics={"acc": lambda p, t: (p.argmax(1) == t).float().mean()}, schedule=Schedule.every(4),
    )  # fmt: skip
    with Monitor(model, [probe], run_dir=tmp_path / "run", snapshot="sync") as mon:
        losses = _train(model, mon, x, y, steps=12)
        with torch.no_grad():
            valid_loss = float(F.cross_entropy(model(x), y))
    table = open_run(tmp_path / "run").probe("stats").table()
    assert list(table.step) == [0, 4, 8, 12]
    np.testing.assert_allclose(_row(table, 8)["loss/train_loss"], np.mean(losses[4:8]), rtol=1e-6)
    np.testing.assert_allclose(_row(table, 12)["loss/valid_loss"], valid_loss, rtol=1e-5)
    assert 0.0 <= _row(table, 12)["loss/acc"] <= 1.0


def test_the_finished_run_stores_a_parquet_table_that_pandas_and_pyarrow_read(tmp_path):
    model, (x, y) = _model(), _data()
    probe = StatsProbe("*", schedule=Schedule.every(3))
    with Monitor(model, [probe], run_dir=tmp_path / "run") as mon:
        _train(model, mon, x, y, steps=10, drain=True)
    path = tmp_path / "run" / "probes" / "stats" / "table.parquet"
    arrow = pq.read_table(path)
    frame = pd.read_parquet(path)
    assert arrow.num_rows == len(frame) == len(open_run(tmp_path / "run").probe("stats")) == 5
    assert frame["step"].tolist() == [0, 3, 6, 9, 10]  # every third step, and the final frame
    assert {"step", "epoch", "weight/0.weight/l2", "weight/4.weight/spectral", "loss/train_loss"} <= set(
        frame
    )
    assert frame["weight/0.weight/l2"].notna().all()


def test_gradient_columns_warn_and_hold_nan_when_grads_are_gone_at_the_step_boundary(tmp_path, caplog):
    model, (x, y) = _model(), _data()
    probe = StatsProbe("0", targets=("weights", "grads"), schedule=Schedule.every(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, [probe], run_dir=tmp_path / "run") as mon:
        for _ in range(4):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # before the monitor sees the step: nothing to read
            mon.step()
    table = open_run(tmp_path / "run").probe("stats").table()
    assert table["grad/0.weight/l2"].isna().all() and table["weight/0.weight/l2"].notna().all()
    assert "no gradient at the step boundary" in caplog.text


def test_a_mixed_precision_loop_shows_unscaled_gradients_and_its_skipped_steps_warn_nothing(tmp_path, caplog):
    """GradScaler multiplies the loss before backward and divides the gradients again in its
    step: the step boundary sees them divided. A scale too high at first overflows the half-
    precision gradients, and the scaler skips those optimizer steps (and lowers the scale): their
    frames count the overflowed entries in ``nonfinite``, with no warning."""
    model, (x, y) = _model(), _data()
    probe = StatsProbe("0", targets=("weights", "grads"), spectral=False, schedule=Schedule.every(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    gradients, weights, skipped = [], [], []
    monitor = Monitor(model, [probe], run_dir=tmp_path / "run")
    with caplog.at_level("WARNING", logger="probescope"), monitor as mon:
        for _ in range(16):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            skipped.append(scaler.get_scale() < scale)
            gradients.append(model[0].weight.grad.clone())
            weights.append(model[0].weight.detach().clone())
            mon.step(loss=loss)
            mon.drain()
    assert 0 < sum(skipped) < 12  # the first steps overflowed, the later ones trained
    table = open_run(tmp_path / "run").probe("stats").table()
    for step in range(1, 17):
        row, grad = _row(table, step), gradients[step - 1]
        reference = tensor_stats_reference(grad.double(), 1e-3)
        nonfinite = float(reference[STAT_NAMES.index("nonfinite")])
        assert row["grad/0.weight/nonfinite"] == pytest.approx(nonfinite)
        assert skipped[step - 1] or nonfinite == 0  # an overflow skips the step
        if nonfinite < 1:  # the finite entries' norm: the gradient as the optimizer used it
            assert row["grad/0.weight/l2"] == pytest.approx(float(grad[grad.isfinite()].norm()), rel=1e-4)
        assert row["weight/0.weight/l2"] == pytest.approx(float(weights[step - 1].norm()), rel=1e-5)
    warned = [r.getMessage() for r in caplog.records if "oversubscription" not in r.getMessage()]
    assert warned == []  # (on a small machine, the Monitor's advice on threads only)


@pytest.mark.parametrize("snapshot", ["copy", "sync"])
def test_a_frozen_parameters_gradients_are_nan_while_it_is_frozen_without_a_warning(
    tmp_path, caplog, snapshot
):
    """Layer 2 frozen, unfrozen at step 4 (gradual unfreezing), layer 4 frozen at step 8: the
    columns stay; a gradient is measured while its parameter trains, NaN otherwise, and no
    warning blames the loop's zero_grad for the frozen ones."""
    model, (x, y) = _model(), _data()
    reference = copy.deepcopy(model)
    model[2].requires_grad_(False)
    reference[2].requires_grad_(False)
    probe = StatsProbe("*", targets=("weights", "grads"), schedule=Schedule.every(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # (SGD skips a parameter with no gradient)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    caplog.set_level("INFO", logger="probescope")
    expected = {}
    with Monitor(model, [probe], run_dir=tmp_path / "run", snapshot=snapshot) as mon:
        for step in range(12):
            if step == 4:
                model[2].requires_grad_(True)
                reference[2].requires_grad_(True)
            if step == 8:
                model[4].requires_grad_(False)
                reference[4].requires_grad_(False)
            for m, o in ((model, opt), (reference, ref_opt)):
                o.zero_grad(set_to_none=True)
                F.cross_entropy(m(x), y).backward()
                o.step()
            expected[step + 1] = {
                n: p.grad.norm().item() for n, p in reference.named_parameters() if p.grad is not None
            }
            mon.step()
            mon.drain()  # (every frame taken: none skipped while the previous one runs)
    table = open_run(tmp_path / "run").probe("stats").table().set_index("step")
    assert list(table.index) == [0, 2, 4, 6, 8, 10, 12]
    grads = sorted({c.split("/")[1] for c in table.columns if c.startswith("grad/")})
    assert grads == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    for step in table.index[1:]:
        for name in grads:
            got = table.loc[step, f"grad/{name}/l2"]
            if name in expected[step]:
                assert got == pytest.approx(expected[step][name], rel=1e-5), (step, name)
            else:  # frozen at that step: layer 2 before step 4, layer 4 from step 8
                assert np.isnan(got) and (
                    (name.startswith("2.") and step <= 4) or (name.startswith("4.") and step > 8)
                )
    assert "no gradient at the step boundary" not in caplog.text
    assert "the frozen parameters ['2.weight', '2.bias'] have NaN gradients while frozen" in caplog.text
    from probescope.figures import stats_figure

    assert stats_figure(open_run(tmp_path / "run").probe("stats")).axes[0].get_ylabel() == "norms"


def test_a_run_resumed_after_unfreezing_goes_on_with_the_same_columns(tmp_path):
    """fastai's fine_tune in a resumed run: a fit with the body frozen, then one with all of it."""
    model, (x, y) = _model(), _data()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for resume in (False, True):
        probe = StatsProbe("*", targets=("weights", "grads"), schedule=Schedule.every(2))
        with Monitor(model, [probe], run_dir=tmp_path / "run", snapshot="sync", resume=resume) as mon:
            for _ in range(4):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                mon.step()
        model[0].requires_grad_(True)
    table = open_run(tmp_path / "run").probe("stats").table().set_index("step")
    assert list(table.index) == [0, 2, 4, 6, 8]
    assert table.loc[[2, 4], "grad/0.weight/l2"].isna().all()
    assert (
        table.loc[[6, 8], "grad/0.weight/l2"].notna().all()
        and table.loc[2:, "grad/2.weight/l2"].notna().all()
    )


def test_gradients_of_a_wholly_frozen_choice_are_nan_until_it_trains():
    model, (x, y) = _model(), _data()
    model[0].requires_grad_(False)
    probe = StatsProbe("0", targets=("grads",))
    probe.attach(model)
    F.cross_entropy(model(x), y).backward()
    frame = probe.evaluate(model, ProbeContext(1, 0))
    assert np.isnan(frame["values"]).all()
    model[0].requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    assert np.isfinite(probe.evaluate(model, ProbeContext(2, 0))["values"]).all()


def test_snapshot_copies_gradients_and_leaves_absent_ones_absent():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    pool = SnapshotPool(model, "copy", grads=True)
    model(torch.randn(5, 3)).sum().backward()
    model[1].bias.grad = None
    shadow = pool.acquire()
    torch.testing.assert_close(shadow[0].weight.grad, model[0].weight.grad, rtol=0, atol=0)
    assert shadow[1].bias.grad is None
    assert shadow[0].weight.grad.data_ptr() != model[0].weight.grad.data_ptr()
    model[0].weight.grad += 1.0  # the live gradient moves on; the snapshot keeps its copy
    assert not torch.equal(shadow[0].weight.grad, model[0].weight.grad)
    weights = sum(t.numel() for t in model.state_dict().values()) * 4
    assert pool.nbytes == 2 * weights + 2 * sum(p.numel() for p in model.parameters()) * 4


def test_integer_inputs_reach_embedding_models(tmp_path):
    model = nn.Sequential(nn.Embedding(11, 5), nn.Flatten(), nn.Linear(10, 11))
    tokens = torch.randint(0, 11, (30, 2))
    probe = StatsProbe("*", batch=tokens, valid=(tokens, tokens[:, 0]), loss_fn=F.cross_entropy)
    with Monitor(model, [probe], run_dir=tmp_path / "run") as mon:
        mon.step()
    table = open_run(tmp_path / "run").probe("stats").table()
    assert np.isfinite(table["act/0/l2"]).all() and np.isfinite(table["loss/valid_loss"]).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hooks": "nope*"}, r"match no module; the modules are '0', '1', '2'"),
        ({"hooks": []}, "hooks must be"),
        ({"targets": ("weights", "biases")}, "targets must be among"),
        ({"targets": ("activations",)}, "need a fixed input batch"),
        ({"spectral_iterations": 0}, "spectral_iterations must be >= 1"),
        ({"near_zero": -1.0}, "near_zero must be >= 0"),
        ({"metrics": {"a": len}}, "pass valid"),
        ({"valid": (torch.zeros(3, 2), torch.zeros(3))}, "loss_fn"),
        ({"batch": torch.zeros(0, 2)}, "empty"),
    ],
)
def test_bad_arguments_are_refused_before_training(kwargs, match):
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=match):
        StatsProbe(**kwargs).attach(model)


def test_modules_that_never_run_are_refused_by_name_and_left_out_by_pattern():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"\['unused'\] produced no floating-point tensor"):
        StatsProbe(["used", "unused"], batch=torch.zeros(4, 2)).attach(Branchy())
    broad = StatsProbe("*", batch=torch.zeros(4, 2))  # a glob pattern: the silent module is left out
    broad.attach(Branchy())
    assert broad.modules == ["used"] and not any(c.startswith("act/unused") for c in broad.columns)


def test_a_container_named_exactly_is_measured_and_a_glob_takes_leaves(tmp_path):
    class Block(nn.Module):  # a residual block: its output is none of its children's
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.Tanh()

        def forward(self, x):
            return x + self.act(self.fc(x))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), Block(), nn.Linear(4, 3))
    x = torch.randn(16, 2)
    named = StatsProbe(["1"], targets=("activations",), batch=x)
    glob = StatsProbe(["1*"], targets=("activations",), batch=x, name="glob")
    with Monitor(model, [named, glob], snapshot="sync", run_dir=tmp_path / "run"):
        pass
    assert named.modules == ["1"] and glob.modules == ["1.fc", "1.act"]
    row = open_run(tmp_path / "run").probe("stats").table().iloc[-1]
    with torch.no_grad():
        expected = tensor_stats_reference(model[1](model[0](x)).double())
    for stat, value in zip(STAT_NAMES, expected, strict=True):
        assert row[f"act/1/{stat}"] == pytest.approx(float(value), rel=1e-5, abs=1e-7), stat


class Attending(nn.Module):
    """Attention over a sequence, then a head: ``nn.MultiheadAttention`` computes its output
    without calling the ``out_proj`` it holds."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.attention(x, x, x)
        return self.head(h.mean(1))


def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named module's (first) output on ``x``, in eval mode without gradients, as probes run."""
    modules, outputs = dict(model.named_modules()), {}

    def keep(name):
        return lambda m, a, out: outputs.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        model.eval()
        model(x)
        model.train()
    for h in handles:
        h.remove()
    return outputs


@pytest.mark.parametrize("make", ["attention", "encoder-layer"])
def test_a_glob_measures_a_container_whose_own_forward_computes_its_output(tmp_path, make):
    torch.manual_seed(0)
    if make == "attention":
        model = Attending()
    else:  # its eval forward may be one fused kernel that calls none of its sub-modules
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        model = nn.Sequential(layer, nn.Flatten(), nn.Linear(40, 3))
    x = torch.randn(12, 5, 8)
    probe = StatsProbe("*", targets=("activations",), batch=x)
    with Monitor(model, [probe], snapshot="sync", run_dir=tmp_path / "run"):
        pass
    if make == "attention":
        assert probe.modules == ["attention", "head"]  # not out_proj, which never runs
    row = open_run(tmp_path / "run").probe("stats").table().iloc[-1]
    outputs = _outputs(model, probe.modules, x)
    assert set(outputs) == set(probe.modules)  # each measured module runs in the probes' forward
    for name, out in outputs.items():
        expected = tensor_stats_reference(out.double(), probe.near_zero).numpy()
        got = np.array([row[f"act/{name}/{stat}"] for stat in STAT_NAMES])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_parametrized_layer_is_one_layer_with_its_computed_weight_and_its_originals(tmp_path):
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(2, 8)), nn.Tanh(), parametrizations.orthogonal(nn.Linear(8, 8))
    )
    x, y = torch.randn(40, 2), torch.randn(40, 8)
    glob = StatsProbe("*", targets=("weights", "grads", "activations"), batch=x[:13], name="glob")
    named = StatsProbe("0", targets=("weights", "activations"), batch=x[:13], name="named")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, [glob, named], snapshot="sync", run_dir=tmp_path / "run") as monitor:
        for _ in range(3):
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss=loss)
    # The layers, not the modules that compute their weights (whose "output" is a weight).
    assert glob.modules == ["0", "1", "2"] and named.modules == ["0"]
    assert glob.computed == ["0.weight", "2.weight"] and named.computed == ["0.weight"]
    originals = ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1"]
    assert named.parameters == ["0.bias", *originals]  # named exactly: its originals too
    table = open_run(tmp_path / "run").probe("glob").table()
    row = table.iloc[-1]
    with torch.no_grad():
        model.eval()
        hidden = model[0](x[:13])
        outputs = {"0": hidden, "2": model[2](torch.tanh(hidden))}
        computed = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    for name, out in outputs.items():
        expected = tensor_stats_reference(out.double(), glob.near_zero).numpy()
        got = np.array([row[f"act/{name}/{stat}"] for stat in STAT_NAMES])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7, err_msg=f"output of {name}")
    for name, weight in computed.items():
        expected = tensor_stats_reference(weight, glob.near_zero).numpy()
        got = np.array([row[f"weight/{name}/{stat}"] for stat in STAT_NAMES])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7, err_msg=name)
        assert row[f"weight/{name}/spectral"] == pytest.approx(spectral_norm_reference(weight), rel=5e-3)
    assert row["weight/2.weight/spectral"] == pytest.approx(1.0, rel=5e-3)  # orthogonal
    params = dict(model.named_parameters())
    for name in originals:  # what the optimizer steps, gradients and all
        expected = tensor_stats_reference(params[name].grad, glob.near_zero).numpy()
        got = np.array([row[f"grad/{name}/{stat}"] for stat in STAT_NAMES])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9, err_msg=f"grad {name}")
    assert not any("parametrizations.weight.0" in column for column in table.columns)


def _two_state_model(metric="weight/0.weight/l2", low=1.0, high=9.0):
    from probescope.analysis import StateModel

    return StateModel(
        [metric],
        startprob=np.array([1.0, 0.0]),
        transmat=np.array([[0.9, 0.1], [0.1, 0.9]]),
        means=np.array([[low], [high]]),
        variances=np.array([[1.0], [1.0]]),
        center=np.zeros(1),
        scale=np.ones(1),
    )


@pytest.mark.parametrize("given_as", ["model", "path"])
def test_a_state_model_decodes_the_run_online_frame_by_frame(tmp_path, given_as, caplog):
    model = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    states = _two_state_model()
    if given_as == "path":
        (tmp_path / "states.json").write_text(json.dumps(states.to_json()))
        states = tmp_path / "states.json"
    probe = StatsProbe("0", spectral=False, states=states, schedule=Schedule.every(1))
    caplog.set_level("INFO", logger="probescope")
    # every frame recorded: a ring that holds them all (the loop outruns the recorder)
    with Monitor(model, [probe], snapshot="sync", run_dir=tmp_path / "run", ring_capacity=16) as monitor:
        for step in range(1, 11):
            with torch.no_grad():
                model[0].weight.fill_(step)  # the weight's L2 norm is the step number
            monitor.step()
    table = open_run(tmp_path / "run").probe("stats").table()
    np.testing.assert_array_equal(table["weight/0.weight/l2"], np.arange(11.0))
    decoded = table["state"].to_numpy()
    assert decoded.tolist() == [0] * 6 + [1] * 5  # norm 0..5 nearer state 0, 6..10 nearer 1
    assert probe.transitions == [(6, 0, 1)]
    # what drove it: d/dz [log-odds(1 : 0)] = (z - 1) - (z - 9) = 8 for unit variances
    assert probe.transition_drivers == [[("weight/0.weight/l2", pytest.approx(8.0))]]
    assert (
        "latent state 0 -> 1 at step 6 (p=" in caplog.text
        and "driven by weight/0.weight/l2 +8" in caplog.text
    )
    frame = monitor.latest("stats").data
    assert frame["state"] == 1 and frame["state_probs"].shape == (2,)
    assert frame["state_probs"].sum() == pytest.approx(1.0) and frame["state_probs"][1] > 0.99
    # the decoded state is not a metric for the next analysis
    from probescope.analysis import load_series

    _, metrics = load_series([tmp_path / "run"])
    assert "state" not in metrics and "weight/0.weight/l2" in metrics


def test_a_state_model_over_metrics_this_probe_does_not_record_is_refused():
    probe = StatsProbe("0", spectral=False, states=_two_state_model("weight/9.weight/l2"))
    with pytest.raises(ValueError, match=r"does not record: \['weight/9.weight/l2'\]"):
        Monitor(nn.Sequential(nn.Linear(1, 1)), [probe])
    with pytest.raises(TypeError, match="states must be"):
        StatsProbe("0", states=3)
