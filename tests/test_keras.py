"""Keras 3 on its torch backend: fused grids of Keras MLPs, snapshots, and the fit Callback."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest
import torch

from probescope import Callback as ps_Callback
from probescope import (
    CheckpointProbe,
    CurveProbe,
    GridProbe,
    HistogramProbe,
    LossProbe,
    Monitor,
    NeuronProbe,
    Probe,
    Schedule,
    StatsProbe,
    open_run,
)
from probescope.kernels import (
    FusableMLP,
    GridSpec,
    final_output_kind,
    fused_path,
    grid_mlp,
    grid_mlp_reference,
    tensor_histogram_reference,
)
from probescope.kernels.mlp import is_keras_model
from tests.kernel_cases import DEVICE, IMPLS, device_for

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is first imported
keras = pytest.importorskip("keras")  # skips where Keras is not installed (a GPU machine's bare image)

from probescope.integrations.keras import ProbescopeCallback, clone_for_probes  # noqa: E402

PROB_TOL = 2e-5  # float32 probabilities: fused kernels against Keras's own forward


def sequential(*layers, inputs=2, seed=0, name=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,)), *layers], name=name)


def dense(units, activation=None, **kw):
    return keras.layers.Dense(units, activation=activation, **kw)


def grid(d=2, width=13, height=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    origin, u, v = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3))
    return GridSpec.on_plane(origin, u, v, (-2.0, 2.5, -1.5, 1.0), width, height)


def keras_probs(model, spec: GridSpec) -> torch.Tensor:
    """What the model itself says on the grid's points (it ends in a softmax)."""
    with torch.no_grad():
        out = model(spec.points(torch.float32).to(DEVICE))
    return out.reshape(spec.height, spec.width, -1).float().cpu()


# ------------------------------------------------------------------ reading Keras models


def test_keras_models_are_recognised_and_torch_models_are_not():
    assert is_keras_model(sequential(dense(3)))
    assert is_keras_model(dense(3))
    assert not is_keras_model(torch.nn.Linear(2, 3))


@pytest.mark.parametrize(
    ("last", "kind"),
    [
        ([dense(4, "softmax")], "softmax"),
        ([dense(4, "log_softmax")], "log_softmax"),
        ([dense(1, "sigmoid")], "sigmoid"),
        ([dense(4), keras.layers.Softmax()], "softmax"),
        ([dense(4), keras.layers.Activation("sigmoid")], "sigmoid"),
        ([dense(4)], "logits"),
        ([dense(4, "tanh")], "logits"),
    ],
)
def test_final_output_kind_reads_the_last_keras_layer(last, kind):
    assert final_output_kind(sequential(dense(8, "relu"), *last)) == kind


KERAS_MLPS = {
    # name: (hidden layers, output layers, the fused activation codes, LeakyReLU slope)
    "relu": (
        [dense(24, "relu"), keras.layers.Dropout(0.3)],
        [dense(5, "softmax")],
        ("relu", "identity"),
        None,
    ),
    "tanh-gelu": (
        [dense(17, "tanh"), dense(9, "gelu")],
        [dense(3, "softmax")],
        ("tanh", "gelu", "identity"),
        None,
    ),
    "swish": ([dense(11, "swish")], [dense(4), keras.layers.Softmax()], ("silu", "identity"), None),
    "sigmoid-1": ([dense(10, "sigmoid")], [dense(1, "sigmoid")], ("sigmoid", "sigmoid"), None),
    "leaky-fn": ([dense(12, "leaky_relu")], [dense(3, "softmax")], ("leaky_relu", "identity"), 0.2),
    "leaky-layer": (
        [dense(12), keras.layers.LeakyReLU(0.3)],
        [dense(3, "softmax")],
        ("leaky_relu", "identity"),
        0.3,
    ),
    "relu-layer-no-bias": (
        [dense(12, use_bias=False), keras.layers.ReLU()],
        [dense(6, "softmax")],
        ("relu", "identity"),
        None,
    ),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(KERAS_MLPS))
def test_fused_grid_of_a_keras_mlp_equals_its_own_forward(poisoned, impl, case):
    if device_for(impl) != DEVICE:
        pytest.skip(f"{impl} runs on {device_for(impl)}; Keras places the model on {DEVICE}")
    hidden, head, codes, slope = KERAS_MLPS[case]
    model = sequential(*[type(layer).from_config(layer.get_config()) for layer in [*hidden, *head]])
    mlp = FusableMLP.from_module(model)
    assert mlp.activations == codes
    if slope is not None:
        assert mlp.negative_slope == pytest.approx(slope)
    spec = grid(width=13, height=7)
    got = grid_mlp(model, spec, impl=impl)
    expected = keras_probs(model, spec)
    if expected.shape[-1] == 1:  # one sigmoid output: probabilities of both classes
        expected = torch.cat([1 - expected, expected], dim=-1)
    assert got.shape == expected.shape
    assert (got.cpu() - expected).abs().max().item() <= PROB_TOL
    assert (got.double().cpu() - grid_mlp_reference(mlp, spec).cpu()).abs().max().item() <= PROB_TOL


def test_fused_keras_mlp_follows_weights_changed_in_place():
    model = sequential(dense(16, "relu"), dense(3, "softmax"))
    spec = grid(width=9, height=4)
    before = grid_mlp(model, spec).cpu().clone()
    kernel = model.layers[-1].kernel
    kernel.assign(kernel.value * -2.0)
    after = grid_mlp(model, spec).cpu()
    assert (after - before).abs().max() > 1e-3
    assert (after - keras_probs(model, spec)).abs().max().item() <= PROB_TOL


@pytest.mark.parametrize(
    "model_fn",
    [
        lambda: sequential(dense(16, "elu"), dense(3, "softmax")),  # no fused ELU
        lambda: sequential(dense(8, "relu"), keras.layers.BatchNormalization(), dense(3, "softmax")),
        lambda: _functional(),
    ],
    ids=["elu", "batchnorm", "functional"],
)
def test_other_keras_models_take_their_forward_and_keep_their_probabilities(model_fn):
    model = model_fn()
    assert fused_path(model).startswith("module forward")
    spec = grid(width=6, height=5)
    got = grid_mlp(model, spec)
    assert (got.cpu() - keras_probs(model, spec)).abs().max().item() <= 1e-6  # not squashed twice
    assert torch.allclose(got.sum(-1), torch.ones(()), atol=1e-5)


def _functional():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2,))
    a = keras.layers.Dense(8, activation="tanh")(inputs)
    b = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(
        inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Concatenate()([a, b]))
    )


# ------------------------------------------------------------------ snapshots


@pytest.mark.parametrize(
    "model_fn", [lambda: sequential(dense(8, "relu"), keras.layers.Dropout(0.5), dense(3)), _functional]
)
def test_a_keras_copy_pairs_every_tensor_and_keeps_the_state_layout(model_fn):
    model = model_fn()
    shadow, twin = clone_for_probes(model)
    live = model.state_dict(keep_vars=True)
    assert list(shadow.state_dict()) == list(live)  # a checkpoint of the copy loads into the model
    assert all(twin[id(t)] is not t for t in live.values())
    x = torch.randn(5, 2, device=DEVICE)
    with torch.no_grad():
        for t in live.values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t))
        for t in live.values():
            twin[id(t)].copy_(t)
    assert torch.allclose(shadow(x), model(x), atol=1e-6)


class WeightReader(Probe):
    """Every floating-point weight of the snapshot it is given."""

    kind = "weights"

    def evaluate(self, model, context):
        values = [p.detach().reshape(-1).cpu() for p in model.parameters() if p.is_floating_point()]
        return {"values": torch.cat(values).numpy().copy()}


def test_every_keras_frame_sees_the_weights_of_one_single_step():
    model = sequential(dense(64, "relu"), dense(64, "relu"), dense(4))
    probe = WeightReader(schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], ring_capacity=256).start()
    ring = monitor.ring(probe.name)
    frames, seen = [], -1
    for step in range(1, 5000):
        if len(frames) >= 20:
            break
        for variable in model.trainable_variables:
            variable.assign(torch.full(variable.shape, float(step)))
        monitor.step()
        time.sleep(0.0005)
        for frame in ring.read_since(seen):
            seen = frame.seq
            frames.append(frame)
    monitor.close()
    frames += ring.read_since(seen)
    trained = [f for f in frames if f.step > 0]
    assert len(trained) >= 5
    for frame in trained:
        values = frame.data["values"]
        assert np.all(values == frame.step), f"frame at step {frame.step} mixes weights of several steps"


# ------------------------------------------------------------------ the fit Callback


class BatchLogs(keras.callbacks.Callback):
    """What Keras itself reports: the running mean of the loss after every batch."""

    def __init__(self, at_end=None):
        super().__init__()
        self.means: list[list[float]] = []
        self.at_end, self.end_result = at_end, None  # what at_end(model) gives when fit ends

    def on_epoch_begin(self, epoch, logs=None):
        self.means.append([])

    def on_train_batch_end(self, batch, logs=None):
        self.means[-1].append(float(logs["loss"]))
        self.kernel_grad = self.model.layers[0].kernel.value.grad.detach().cpu().clone()

    def on_train_end(self, logs=None):  # before the Probescope callback's (it comes later in the list)
        if self.at_end is not None:
            self.end_result = self.at_end(self.model)


def batch_losses(means: list[list[float]], sizes: list[int]) -> list[float]:
    """Each batch's own loss from Keras's running means, weighted by batch size."""
    losses = []
    for epoch in means:
        total = count = 0.0
        for mean, n in zip(epoch, sizes, strict=True):
            losses.append((mean * (count + n) - total) / n)
            total, count = mean * (count + n), count + n
    return losses


def last_frame(run, name):
    record = run.probe(name)
    return record.frame(len(record) - 1)


def test_fit_with_the_callback_records_every_probe_of_the_run(tmp_path):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, 2, generator=g)
    y = ((x[:, 0] * x[:, 1]) > 0).long()
    model = sequential(
        dense(32, "relu", name="hidden"), keras.layers.Dropout(0.1), dense(2, "softmax"), name="net"
    )
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"])
    probes = [
        GridProbe(x, y, resolution=24),
        LossProbe(),
        StatsProbe(targets=["weights", "grads"]),
        CheckpointProbe(directory=tmp_path / "best", load_best=True),
    ]
    logs = BatchLogs(at_end=lambda m: keras_probs(m, probes[0].grid))  # the last step's own map
    callback = ProbescopeCallback(probes, run_dir=tmp_path / "run", final_frame=True)
    history = model.fit(
        x.numpy(),
        y.numpy(),
        epochs=3,
        batch_size=64,
        validation_split=0.2,
        verbose=0,
        callbacks=[logs, callback],
    )
    summary = callback.monitor.summary()
    assert summary["steps"] == 3 * 7  # 400 training samples in batches of 64
    assert all(p["failed"] == 0 and p["run"] >= 3 for p in summary["probes"].values())
    assert callback.monitor.snapshot_detail["strategy"] == "copy"
    run = open_run(tmp_path / "run")

    # Each batch's own loss, as Keras's running means imply it; the epoch logs by their names.
    last_loss = last_frame(run, "loss").data
    sizes = [64] * 6 + [16]
    assert np.allclose(
        last_loss["series/train_loss/values"], batch_losses(logs.means, sizes), rtol=1e-4, atol=1e-6
    )
    assert np.allclose(last_loss["series/valid_loss/values"], history.history["val_loss"], rtol=1e-6)
    assert np.allclose(last_loss["series/train_accuracy/values"], history.history["accuracy"], rtol=1e-6)

    # The final frame's map is the trained model's own probabilities (fused, not squashed twice).
    final = last_frame(run, "grid")
    assert final.step == summary["steps"]
    assert fused_path(model) != "module forward"
    assert np.abs(final.data["probs"] - logs.end_result.numpy()).max() <= PROB_TOL

    # Statistics under Keras's variable paths, of the model's weights.
    stats = last_frame(run, "stats").data
    columns = list(run.probe("stats").static["columns"])
    column = "weight/net/hidden/kernel/l2"
    assert column in columns
    kernel = model.layers[0].kernel.value.detach().cpu()
    assert stats["values"][columns.index(column)] == pytest.approx(
        torch.linalg.vector_norm(kernel).item(), rel=1e-5
    )
    grad = stats["values"][columns.index("grad/net/hidden/kernel/l2")]  # the last batch's gradient
    assert grad == pytest.approx(torch.linalg.vector_norm(logs.kernel_grad).item(), rel=1e-5) and grad > 0

    # The best weights by valid_loss (Keras's val_loss), loadable into the model.
    index = json.loads((tmp_path / "best" / "checkpoints.json").read_text())
    assert index["metric"] == "valid_loss"
    assert index["best"]["value"] == pytest.approx(min(history.history["val_loss"]), rel=1e-6)
    state = torch.load(tmp_path / "best" / index["best"]["file"], weights_only=True)
    assert list(state) == list(model.state_dict())
    # load_best: the model ends with the best weights (the map above was the last step's).
    assert all(torch.equal(state[k], v.cpu()) for k, v in model.state_dict().items())


def test_the_callback_closes_its_monitor_when_fit_raises(tmp_path):
    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise RuntimeError("data loader failed")

    x = np.random.default_rng(0).normal(size=(256, 1)).astype("float32")
    model = sequential(dense(16, "tanh"), dense(1), inputs=1)
    model.compile("adam", "mse")
    callback = ProbescopeCallback([CurveProbe(x, np.sin(3 * x))], run_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match="data loader failed"), callback:
        model.fit(x, np.sin(3 * x), epochs=2, batch_size=32, verbose=0, callbacks=[callback, Boom()])
    assert callback.monitor.summary()["steps"] == 3  # the third batch raised after its step
    run = open_run(tmp_path / "run")
    assert run.meta["status"] == "failed" and run.meta["error"] == "RuntimeError: data loader failed"
    assert len(run.probe("curve")) >= 1


def test_the_callback_rejects_arguments_the_monitor_does_not_take():
    with pytest.raises(TypeError, match="unknown Monitor arguments \\['model', 'snapshots'\\]"):
        ProbescopeCallback([], model=None, snapshots="copy")


def test_keras_layers_are_hook_points_for_activations_and_neuron_maps(tmp_path):
    inner = keras.Sequential([keras.Input((8,)), dense(6, "tanh", name="mix")], name="block")
    model = sequential(dense(8, "relu", name="h"), inner, dense(3, "softmax", name="out"), name="net")
    batch = torch.randn(40, 2, generator=torch.Generator().manual_seed(2))
    stats = StatsProbe(["h", "block.*"], targets=["weights", "activations"], batch=batch, spectral=False)
    neurons = NeuronProbe(batch, "block.mix", units=4, resolution=12)
    histograms = HistogramProbe(["h", "block.*"], targets=["weights", "activations"], batch=batch, bins=9)
    with Monitor(model, [stats, neurons, histograms], final_frame=False) as monitor:
        monitor.step()
        monitor.drain(10)
        frame_stats, frame_neurons = monitor.latest(stats.name), monitor.latest(neurons.name)
        frame_histograms = monitor.latest(histograms.name)
    assert stats.modules == ["h", "block.mix"]  # the leaf layers, named as Keras names them
    weights = {c.removeprefix("weight/").rsplit("/", 1)[0] for c in stats.columns if c.startswith("weight/")}
    assert weights == {"net/h/kernel", "net/h/bias", "block/mix/kernel", "block/mix/bias"}  # Keras's paths
    with torch.no_grad():
        hidden = model.layers[0](batch.to(DEVICE))
        mixed = inner.layers[0](hidden)
    assert set(histograms.names[:4]) == {f"weight/{w}" for w in weights}  # in the model's order
    assert histograms.names[4:] == ["act/h", "act/block.mix"]
    for i, tensor in ((4, hidden), (5, mixed)):
        ref = tensor_histogram_reference(tensor.cpu(), 9).numpy()
        np.testing.assert_allclose(frame_histograms.data["range"][i], ref[:2], rtol=1e-6)
        assert np.abs(frame_histograms.data["counts"][i] - ref[3:]).sum() <= 2  # an entry at an edge may move
    values = frame_stats.data["values"]
    assert values[stats.columns.index("act/h/mean")] == pytest.approx(hidden.mean().item(), rel=1e-5)
    assert values[stats.columns.index("act/block.mix/max_abs")] == pytest.approx(
        mixed.abs().max().item(), rel=1e-5
    )
    # The unit maps are the layer's outputs over the grid, unit by unit.
    points = neurons.grid.points(torch.float32).to(DEVICE)
    with torch.no_grad():
        units = inner.layers[0](model.layers[0](points))[:, :4].cpu()
    maps = torch.as_tensor(frame_neurons.data["activations"]).reshape(4, -1)
    assert torch.allclose(maps, units.T, atol=1e-5)


def test_each_later_fit_with_the_same_callback_records_a_run_of_its_own(tmp_path):
    x = np.random.default_rng(0).normal(size=(128, 1)).astype("float32")
    model = sequential(dense(8, "tanh"), dense(1), inputs=1)
    model.compile("adam", "mse")
    callback = ProbescopeCallback([LossProbe()], run_dir=tmp_path / "run")
    for epochs in (2, 3):
        model.fit(x, 2 * x, epochs=epochs, batch_size=32, verbose=0, callbacks=[callback])
    assert callback.fits == 2
    first, second = open_run(tmp_path / "run"), open_run(tmp_path / "run-fit2")
    assert first.meta["status"] == second.meta["status"] == "finished"
    # Each run counts its own steps (4 batches an epoch) and ends with a frame of its last one.
    assert [first.probe("loss").steps()[-1], second.probe("loss").steps()[-1]] == [2 * 4, 3 * 4]
    assert first.meta["summary"]["steps"] == 8 and second.meta["summary"]["steps"] == 12


def test_with_resume_each_later_fit_goes_on_in_the_same_run(tmp_path):
    x = np.random.default_rng(0).normal(size=(128, 1)).astype("float32")
    model = sequential(dense(8, "tanh"), dense(1), inputs=1)
    model.compile("adam", "mse")
    callback = ProbescopeCallback([LossProbe()], run_dir=tmp_path / "run", resume=True)
    for epochs in (2, 3):  # fit, then fit on: one training, one run
        model.fit(x, 2 * x, epochs=epochs, batch_size=32, verbose=0, callbacks=[callback])
    assert callback.fits == 2 and not (tmp_path / "run-fit2").exists()
    run = open_run(tmp_path / "run")
    assert run.meta["status"] == "finished" and [r["step"] for r in run.meta["resumes"]] == [8]
    assert run.meta["summary"]["steps"] == 20 and run.meta["summary"]["epochs"] == 5
    last = run.probe("loss").frame(-1).data
    assert last["series/train_loss/steps"].tolist() == list(range(1, 21))  # 4 batches an epoch
    assert last["series/train_loss_epoch/steps"].tolist() == [4, 8, 12, 16, 20]


def test_keras_runs_feed_the_latent_state_analysis(tmp_path):
    from probescope.analysis import latent_states, write_report

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 2)).astype("float32")
    y = (x[:, 0] * x[:, 1] > 0).astype("int64")
    runs = []
    for seed in range(2):
        model = sequential(dense(16, "relu", name="h"), dense(2, "softmax", name="o"), seed=seed, name="net")
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        stats = StatsProbe(targets=["weights", "grads"], spectral=False, schedule=Schedule.every(2))
        callback = ProbescopeCallback([stats], run_dir=tmp_path / f"seed{seed}")
        model.fit(x, y, epochs=4, batch_size=32, verbose=0, callbacks=[callback])
        runs.append(tmp_path / f"seed{seed}")
    result = latent_states(runs, n_states=2, n_jobs=1)
    assert "weight/net/h/kernel/l2" in result.metrics and "grad/net/o/bias/mean" in result.metrics
    assert [len(s) for s in result.states] == [len(open_run(r).probe("stats")) for r in runs]
    paths = write_report(result, tmp_path / "report")
    assert "weight/net/h/kernel" in paths["report.html"].read_text()


def test_an_epochs_last_step_is_taken_after_its_validation(tmp_path, caplog):
    """A CheckpointProbe on the steps that end epochs (7 steps an epoch): each frame is taken
    after the epoch's validation and scored by its val_loss, with no warning."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, 2, generator=g)
    y = ((x[:, 0] * x[:, 1]) > 0).long()
    model = sequential(dense(16, "relu"), dense(2, "softmax"))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    probes = [CheckpointProbe(schedule=Schedule.every(7)), LossProbe(schedule=Schedule.every(7))]
    heard = []

    class Validations(ps_Callback):
        def after_validate(self, monitor, **values):
            heard.append((monitor.step_count, values["valid_loss"]))

    callback = ProbescopeCallback(
        probes, run_dir=tmp_path / "run", snapshot="sync", callbacks=[Validations()]
    )
    with caplog.at_level(logging.WARNING, logger="probescope"):
        fit = {"epochs": 3, "batch_size": 64, "validation_split": 0.2, "verbose": 0}
        history = model.fit(x.numpy(), y.numpy(), callbacks=[callback], **fit)
    assert not [r for r in caplog.records if "was logged" in r.getMessage()]
    run = open_run(tmp_path / "run")
    scored = {f.step: float(f.data["value"]) for f in run.probe("checkpoint").frames() if f.step}
    assert scored == pytest.approx(dict(zip((7, 14, 21), history.history["val_loss"], strict=True)))
    for frame in run.probe("loss").frames():
        if frame.step:
            assert frame.data["series/valid_loss/steps"][-1] == frame.step
    # Monitor callbacks still hear each validation, after the step it belongs to.
    assert [step for step, _ in heard] == [7, 14, 21]
    assert [value for _, value in heard] == pytest.approx(history.history["val_loss"])
