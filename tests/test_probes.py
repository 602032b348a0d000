"""Each probe computes what it claims, checked against an independent computation."""

import functools
import logging

import numpy as np
import pytest
import torch
from torch import nn

from probescope import CurveProbe, GridProbe, LossProbe, Monitor, PredictionProbe, Schedule
from probescope.history import History
from probescope.kernels import NONFINITE_RGBA, default_palette, probs_to_rgba
from probescope.probes.base import ProbeContext
from tests.conftest import WrappedModule, fit_curve, regression_steps, train_steps


def _evaluate(probe, model, step=0):
    probe.attach(model)
    return probe.evaluate(model, ProbeContext(step=step, epoch=0))


@pytest.mark.parametrize("resolution", [(37, 23), (1, 5), 16])
def test_grid_pixel_equals_softmax_of_the_model_at_that_pixels_coordinates(mlp, resolution):
    data = torch.randn(50, 2) * 3
    domain = (-2.0, 3.0, -1.5, 4.0)
    probe = GridProbe(data, domain=domain, resolution=resolution)
    frame = _evaluate(probe, mlp)
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    probs = frame["probs"].numpy()
    assert probs.shape == (h, w, 7)
    rng = np.random.default_rng(0)
    for r, c in [(0, 0), (h - 1, w - 1), *zip(rng.integers(0, h, 8), rng.integers(0, w, 8), strict=True)]:
        # Pixel centres, computed here from the domain alone; row 0 is the top (largest v).
        u = domain[0] + (c + 0.5) * (domain[1] - domain[0]) / w
        v = domain[3] - (r + 0.5) * (domain[3] - domain[2]) / h
        with torch.no_grad():
            expected = torch.softmax(mlp(torch.tensor([[u, v]], dtype=torch.float32)), dim=1)[0]
        np.testing.assert_allclose(probs[r, c], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_grid_fuses_a_sequential_mlp_and_falls_back_to_the_forward_of_anything_else(mlp):
    data = torch.randn(50, 2) * 3
    fused, fallback = GridProbe(data, resolution=24), GridProbe(data, resolution=24)
    a, b = _evaluate(fused, mlp), _evaluate(fallback, WrappedModule(mlp))
    assert fused.config()["path"] == "numba"
    assert fallback.config()["path"].startswith("module forward")
    np.testing.assert_allclose(a["probs"].numpy(), b["probs"].numpy(), atol=1e-5)


def test_a_grid_of_a_batch_normed_mlp_in_training_is_fused_and_shows_its_eval_mode_map(blobs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 7))
    probe = GridProbe(blobs.x_train, resolution=(23, 17), schedule=Schedule.every(1))
    monitor = Monitor(model, [probe])
    assert probe.config()["path"] == "numba"  # the model was in train mode: attached in eval mode
    with monitor:
        train_steps(monitor, model, blobs.x_train, blobs.y_train, 6)  # statistics move every step
    frame = monitor.latest(probe.name)
    assert frame.step == 6 and model.training
    points = torch.stack([torch.as_tensor(probe.static()[k]) for k in ("origin", "axis_u", "axis_v")])
    us, vs = torch.as_tensor(probe.static()["us"]), torch.as_tensor(probe.static()["vs"])
    inputs = points[0] + us[None, :, None] * points[1] + vs[:, None, None] * points[2]
    with torch.no_grad():
        expected = torch.softmax(model.eval()(inputs.reshape(-1, 2).float()), 1).reshape(17, 23, 7)
    np.testing.assert_allclose(frame.data["probs"], expected.numpy(), atol=1e-5)


def test_grid_smoothing_is_an_ema_of_the_unsmoothed_maps(mlp):
    data = torch.randn(50, 2) * 3
    plain, smooth = GridProbe(data, resolution=9), GridProbe(data, resolution=9, smoothing=0.25)
    plain.attach(mlp)
    smooth.attach(mlp)
    expected = None
    for step in range(3):
        with torch.no_grad():
            mlp[0].weight.add_(0.3)
        raw = plain.evaluate(mlp, ProbeContext(step=step, epoch=0))["probs"]
        got = smooth.evaluate(mlp, ProbeContext(step=step, epoch=0))["probs"]
        expected = raw if expected is None else expected + 0.25 * (raw - expected)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6)


class Residual(nn.Module):  # not an MLP: the map comes from its own forward
    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(2, 2), nn.Linear(2, 7)

    def forward(self, x):
        return self.out(x + torch.tanh(self.inner(x)))


@pytest.mark.parametrize(
    ("model", "smoothing", "in_place"),
    [("mlp", None, {"probs", "rgba"}), ("mlp", 0.5, {"rgba"}), ("residual", None, {"probs", "rgba"})],
)
def test_a_monitors_grid_frames_are_written_straight_into_the_ring(mlp, blobs, model, smoothing, in_place):
    """The kernels write probabilities and colours into the ring's slot: the frame the probe
    returns is the slot's own memory, which the ring does not copy (a smoothed map's
    probabilities are the running average, which it does); the frames read back are right."""
    model = mlp if model == "mlp" else Residual()
    probe = GridProbe(blobs.x_train, resolution=(11, 6), smoothing=smoothing, schedule=Schedule.every(1))
    shared = []

    def write(data, step, epoch, real):
        slot = ring._slots[ring._next_seq % ring.capacity]
        shared.append(
            {k for k, v in data.items() if np.shares_memory(v.numpy(), slot.arrays.get(k, np.empty(0)))}
        )
        return real(data, step, epoch)

    with Monitor(model, [probe]) as monitor:
        ring = monitor.ring("grid")
        ring.write = functools.partial(write, real=ring.write)
        train_steps(monitor, model, blobs.x_train, blobs.y_train, 4)
    assert len(shared) == 5 and all(keys == in_place for keys in shared)  # steps 0 to 4
    frame = ring.latest()
    if not smoothing:  # the last weights' map (an average would need every earlier model)
        expected = _evaluate(GridProbe(blobs.x_train, resolution=(11, 6)), model)["probs"]
        np.testing.assert_allclose(frame.data["probs"], expected.numpy(), atol=1e-6)
    np.testing.assert_array_equal(
        frame.data["rgba"],
        probs_to_rgba(torch.from_numpy(frame.data["probs"]), "region", probe.palette, 1).numpy(),
    )


def test_a_smoothed_map_shows_a_nan_frame_and_comes_back_when_the_model_does(mlp, caplog):
    probe = GridProbe(torch.randn(50, 2) * 3, resolution=9, smoothing=0.25)
    probe.attach(mlp)
    good = {k: v.clone() for k, v in mlp.state_dict().items()}
    first = probe.evaluate(mlp, ProbeContext(step=1, epoch=0))
    with torch.no_grad():
        mlp[0].weight.fill_(float("nan"))  # the run blew up
    blown = probe.evaluate(mlp, ProbeContext(step=2, epoch=0))
    assert torch.isnan(blown["probs"]).all() and (blown["rgba"][..., :3] == torch.tensor([255, 0, 255])).all()
    mlp.load_state_dict(good)  # the loop reloads its last good weights
    back = probe.evaluate(mlp, ProbeContext(step=3, epoch=0))
    np.testing.assert_allclose(back["probs"].numpy(), first["probs"].numpy(), atol=1e-6)  # the map, as it was
    assert torch.isfinite(back["probs"]).all()


def test_grid_region_colour_is_the_class_colour_shaded_by_probability(mlp):
    probe = GridProbe(torch.randn(40, 2), resolution=9)
    frame = _evaluate(probe, mlp)
    probs, rgba = frame["probs"].numpy(), frame["rgba"].numpy()
    palette = default_palette(7).numpy().astype(np.float64)
    k = probs.argmax(-1)
    shade = np.clip((probs.max(-1) - 1 / 7) / (1 - 1 / 7), 0, 1)
    expected = np.floor(255 + (palette[k] - 255) * shade[..., None] + 0.5)
    np.testing.assert_allclose(rgba[..., :3], expected, atol=1)  # float32 vs float64 rounding
    assert (rgba[..., 3] == 255).all()


def test_grid_plane_through_three_samples_puts_the_first_at_its_origin():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    a, b, c = torch.randn(3, 5)
    probe = GridProbe(torch.randn(30, 5), plane=(a, b, c), domain=(-1.0, 1.0, -1.0, 1.0), resolution=(4, 4))
    frame = _evaluate(probe, model)
    # Domain [-1, 1]^2 at 4 pixels: the pixel centred at (u, v) = (0.25, 0.25) is row 1, column 2.
    e1 = (b - a) / (b - a).norm()
    e2 = (c - a) - ((c - a) @ e1) * e1
    e2 = e2 / e2.norm()
    point = a + 0.25 * e1 + 0.25 * e2
    with torch.no_grad():
        expected = torch.softmax(model(point[None]), 1)[0]
    np.testing.assert_allclose(frame["probs"][1, 2].numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_grid_pca_plane_spans_the_data_principal_directions():
    torch.manual_seed(2)
    flat = torch.randn(400, 2) * torch.tensor([5.0, 2.0])
    lift = torch.linalg.qr(torch.randn(6, 6)).Q[:, :2]  # an orthonormal 2-D subspace of R^6
    data = flat @ lift.T + 1.0
    probe = GridProbe(data)
    basis = torch.stack([probe.axis_u, probe.axis_v], 1)
    # The plane's axes span the same subspace as ``lift``: projecting one onto the other keeps it.
    np.testing.assert_allclose((lift @ (lift.T @ basis)).numpy(), basis.numpy(), atol=1e-4)
    np.testing.assert_allclose(probe.origin.numpy(), data.mean(0).numpy(), atol=1e-4)


def test_grid_domain_defaults_to_the_data_bounds_plus_margin():
    data = torch.tensor([[0.0, 0.0], [10.0, 4.0], [5.0, 1.0]])
    probe = GridProbe(data, margin=0.1)
    assert probe.domain == pytest.approx((-1.0, 11.0, -0.4, 4.4))


@pytest.mark.parametrize(
    ("domain", "spacing", "size", "covered"),
    [
        ((-1.0, 1.0, -2.0, 2.0), 0.25, (8, 16), (-1.0, 1.0, -2.0, 2.0)),  # spacing divides the domain
        ((0.0, 1.0, 0.0, 0.5), 0.3, (4, 2), (0.0, 1.2, 0.0, 0.6)),  # it does not: extended to cover it
        ((0.0, 0.1, 0.0, 0.1), 1.0, (1, 1), (0.0, 1.0, 0.0, 1.0)),  # one pixel
    ],
)
def test_grid_spacing_sets_the_distance_between_pixels(domain, spacing, size, covered):
    probe = GridProbe(torch.randn(20, 2), domain=domain, spacing=spacing)
    assert (probe.width, probe.height) == size == (probe.grid.width, probe.grid.height)
    assert probe.domain == pytest.approx(covered)
    us, vs = probe.grid.us().numpy(), probe.grid.vs().numpy()
    assert us[0] == pytest.approx(domain[0] + spacing / 2) and vs[-1] == pytest.approx(
        domain[2] + spacing / 2
    )
    assert np.allclose(np.diff(us), spacing) and np.allclose(np.diff(vs), -spacing)  # row 0 is the top
    assert probe.config()["resolution"] == list(size)


@pytest.mark.parametrize(
    ("spacing", "message"), [(0.0, "positive"), (float("nan"), "positive"), (1e-5, "at most")]
)
def test_grid_spacing_rejects_bad_distances(spacing, message):
    with pytest.raises(ValueError, match=message):
        GridProbe(torch.randn(20, 2), domain=(0.0, 1.0, 0.0, 1.0), spacing=spacing)


def test_grid_non_finite_outputs_get_magenta_one_warning_and_training_goes_on(blobs, caplog):
    class Poisoned(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 7)

        def forward(self, x):
            out = self.linear(x)
            return torch.where(x[:, :1] > 0, torch.full_like(out, float("nan")), out)

    model = Poisoned()
    probe = GridProbe(blobs.x_train, resolution=10, domain=(-1.0, 1.0, -1.0, 1.0), schedule=Schedule.every(1))
    x = blobs.x_train.clone()
    x[:, 0] = -x[:, 0].abs() - 0.1  # training inputs stay where the model is finite
    with caplog.at_level(logging.WARNING, logger="probescope"), Monitor(model, [probe]) as monitor:
        train_steps(monitor, model, x, blobs.y_train, 3)
    frame = monitor.latest("grid")
    rgba = frame.data["rgba"]
    assert (rgba[:, 5:] == NONFINITE_RGBA).all()  # u > 0: the right half
    assert not (rgba[:, :5] == NONFINITE_RGBA).all(-1).any()
    assert monitor.stats["grid"].run == 4 and monitor.stats["grid"].failed == 0  # steps 0..3
    warnings = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7, 5, 3), (64, 33, 1), (0, 4)])
def test_all_finite_is_exact_for_every_kind_of_non_finite_entry_anywhere(dtype, shape):
    """Against torch.isfinite(t).all() on random tensors with NaN, +inf or -inf at a random
    place, and on tensors of huge finite values, whose sum overflows to inf (a sum-based check
    would call them non-finite)."""
    from probescope.probes.base import all_finite

    generator = torch.Generator().manual_seed(hash((str(dtype), shape)) % 2**31)
    clean = torch.randn(shape, generator=generator).to(dtype)
    cases = [clean, torch.full(shape, torch.finfo(dtype).max, dtype=dtype)]
    for poison in (float("nan"), float("inf"), float("-inf")):
        if clean.numel():
            t = clean.clone().reshape(-1)
            t[torch.randint(0, t.numel(), (1,), generator=generator)] = poison
            cases.append(t.reshape(shape))
    for t in cases:
        result = all_finite(t)
        assert result.dtype == torch.bool and result.shape == ()
        assert bool(result) == bool(torch.isfinite(t).all())
    if clean.numel() > 1:
        assert not torch.isfinite(cases[1].sum())  # the overflow a sum would trip on


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": torch.zeros(0, 2)}, "empty"),
        ({"data": torch.ones(10, 2)}, "zero area"),
        ({"data": torch.randn(10, 2), "domain": (0.0, 0.0, 0.0, 1.0)}, "zero area"),
        ({"data": torch.randn(10, 2), "mode": "contour"}, "mode must be one of"),
        ({"data": torch.randn(10, 1)}, "at least 2 features"),
        ({"data": torch.randn(10, 2), "resolution": 0}, "resolution"),
        (
            {"data": torch.randn(10, 3), "plane": (torch.zeros(3), torch.ones(3), 2 * torch.ones(3))},
            "collinear",
        ),
        ({"data": torch.randn(10, 2), "labels": [0, 1]}, "2 labels for 10"),
        ({"data": [[0.0, float("nan")], [1.0, 1.0]]}, "NaN"),
    ],
)
def test_grid_probe_rejects_bad_input_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GridProbe(**kwargs)


def test_wrong_input_width_is_a_clear_error_when_the_monitor_is_built(mlp):
    probe = GridProbe(torch.randn(20, 3))  # 3 features, the model takes 2
    with pytest.raises(ValueError, match=r"rejected inputs of shape \(2, 3\) \(input width 3\)"):
        Monitor(mlp, [probe])


def _wave(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g) * 6 - 3
    return x, torch.sin(x) + 0.1 * torch.randn(n, generator=g)


@pytest.mark.parametrize(("smoothing", "sparsity"), [(1, 1), (7, 1), (15, 3)])
def test_curve_band_equals_the_smoothed_per_point_loss(smoothing, sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = _wave()
    probe = CurveProbe(x, y, loss_smoothing=smoothing, graph_sparsity=sparsity)
    frame = _evaluate(probe, model, step=4)
    order = np.argsort(x.numpy(), kind="stable")[::sparsity]
    xs, ys = x.numpy()[order], y.numpy()[order]
    with torch.no_grad():
        y_pred = model(torch.from_numpy(xs)[:, None])[:, 0].numpy().astype(np.float64)
    loss = np.convolve((y_pred - ys) ** 2, np.ones(smoothing) / smoothing, mode="same")
    np.testing.assert_allclose(frame["y_pred"].numpy(), y_pred, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(frame["loss"].numpy(), loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(frame["band_upper"].numpy(), y_pred + loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(frame["band_lower"].numpy(), y_pred - loss, rtol=1e-4, atol=1e-5)
    assert float(frame["total_loss"]) == pytest.approx(np.mean((y_pred - ys) ** 2), rel=1e-5)
    assert frame["total_loss_steps"].tolist() == [4]


def test_curve_rms_band_is_the_root_of_the_smoothed_squared_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = _wave()
    frame = _evaluate(CurveProbe(x, y, loss_smoothing=9, band="rms"), model)
    half_width = np.sqrt(frame["loss"].numpy())
    np.testing.assert_allclose(
        (frame["band_upper"] - frame["y_pred"]).numpy(), half_width, rtol=1e-5, atol=1e-6
    )


def test_curve_probe_keeps_the_sample_loss_and_batch_loss_series():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = _wave()
    probe = CurveProbe(x, y, schedule=Schedule.every(2))
    with Monitor(model, [probe]) as monitor:
        monitor._worker.wait_idle(5)
        fit_curve(monitor, model, x, y, 6)
    frame = monitor.latest("curve")
    assert frame.data["total_loss_steps"].tolist() == [0, 2, 4, 6]
    assert frame.data["batch_loss_steps"].tolist() == [1, 2, 3, 4, 5, 6]
    assert np.all(np.diff(frame.data["total_loss_series"]) < 0)  # plain GD on a smooth loss descends


@pytest.mark.parametrize("targets", ["one per output", "the chosen one"])
def test_curve_probe_draws_the_chosen_output_of_a_multi_output_model(targets):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = _wave()
    ys = torch.stack([y, 2 * y, y - 1], dim=1)  # three targets
    probe = CurveProbe(x, ys if targets == "one per output" else ys[:, 2], output=2, loss_smoothing=5)
    Monitor(model, [probe])  # attach checks the widths
    frame = _evaluate(probe, model)
    order = np.argsort(x.numpy(), kind="stable")
    with torch.no_grad():
        y_pred = model(x[order][:, None])[:, 2].double().numpy()
    target = ys[order, 2].double().numpy()
    np.testing.assert_allclose(frame["y_pred"].numpy(), y_pred, rtol=1e-5, atol=1e-6)
    loss = np.convolve((y_pred - target) ** 2, np.ones(5) / 5, mode="same")
    np.testing.assert_allclose(frame["loss"].numpy(), loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probe.static()["y"], target, rtol=0, atol=0)
    assert probe.config()["output"] == 2


@pytest.mark.parametrize(
    ("targets", "output", "message"),
    [
        (1, None, "returns 3 outputs per sample.*output=j"),
        (1, 3, "output 3 is not one of the model's 3 outputs"),
        (2, 1, "y has 2 targets but the model returns 3 outputs"),
    ],
)
def test_curve_probe_output_must_fit_the_model(targets, output, message):
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = _wave(20)
    probe = CurveProbe(x, y[:, None].repeat(1, targets), output=output)
    with pytest.raises(ValueError, match=message):
        Monitor(model, [probe])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"y": torch.zeros(20, 2)}, "y has 2 targets; choose one with output=j"),
        ({"y": torch.zeros(20, 2), "output": 2}, "output 2 is not a column of y"),
        ({"output": -1}, "output must be the index"),
        ({"loss_smoothing": 4}, "odd"),
        ({"loss_smoothing": 0}, "odd"),
        ({"x": torch.zeros(0), "y": torch.zeros(0)}, "empty"),
        (
            {"x": torch.zeros(5, 1), "y": torch.zeros(5), "line": "pca"},
            "line is for inputs of several features",
        ),
        ({"x": torch.zeros(5, 2), "y": torch.zeros(5)}, "spans no direction"),
        ({"x": torch.randn(5, 2), "y": torch.zeros(5), "line": "axis"}, "line must be None, 'pca' or two"),
        ({"x": torch.randn(5, 2), "y": torch.zeros(5), "line": ([1.0, 2.0], [1.0, 2.0])}, "coincide"),
        ({"x": torch.randn(5, 2), "y": torch.zeros(5), "line": ([1.0, 2.0], [1.0])}, "width 2 and 1"),
        ({"y": torch.zeros(3)}, "points but y has"),
        ({"loss": "hinge"}, "loss must be one of"),
        ({"graph_sparsity": 0}, "graph_sparsity"),
    ],
)
def test_curve_probe_rejects_bad_input_at_construction(kwargs, message):
    x, y = _wave(20)
    with pytest.raises(ValueError, match=message):
        CurveProbe(**{"x": x, "y": y, **kwargs})


def test_prediction_probe_classification_reports_probability_of_the_true_class(mlp, blobs):
    probe = PredictionProbe(blobs.x_valid, blobs.y_valid, show_perc=0.5, seed=4)
    frame = _evaluate(probe, mlp)
    assert probe.task == "classification" and probe.x.shape[0] == round(0.5 * blobs.x_valid.shape[0])
    with torch.no_grad():
        probs = torch.softmax(mlp(probe.x), 1).double()
    labels = probe.y.long()
    np.testing.assert_allclose(
        frame["prob_true"].numpy(), probs[torch.arange(len(labels)), labels].numpy(), rtol=1e-5
    )
    assert float(frame["accuracy"]) == pytest.approx(float((probs.argmax(1) == labels).double().mean()))


class TokenModel(nn.Module):
    """A language model that returns a dict of per-position logits (as Hugging Face models do)."""

    def __init__(self, vocab: int = 11, width: int = 16):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, tokens):
        return {"logits": self.head(torch.tanh(self.embed(tokens).cumsum(1))), "aux": tokens}


class LastLogits(nn.Module):
    """What a probe reads of a TokenModel: the last position's logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens)["logits"][:, -1]


def test_a_model_with_structured_outputs_is_probed_through_a_module_that_picks_the_tensor():
    torch.manual_seed(0)
    model = TokenModel()
    tokens, answers = torch.randint(0, 11, (40, 6)), torch.randint(0, 11, (40,))
    # Its logits are (batch, position, vocabulary): which position to probe is the user's to say.
    with pytest.raises(TypeError, match=r"returns logits of shape \(2, 6, 11\), and a probe reads one row"):
        Monitor(model, [PredictionProbe(tokens, answers)])
    probe = PredictionProbe(tokens, answers, schedule=Schedule.every(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with Monitor(LastLogits(model), [probe]) as monitor:
        for _ in range(5):  # training calls the model itself; the probe reads the same weights
            loss = nn.functional.cross_entropy(model(tokens)["logits"][:, -1], answers)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss=loss)
    frame = monitor.latest(probe.name)
    assert probe.task == "classification" and probe.num_classes == 11 and frame.step == 5
    with torch.no_grad():
        probs = torch.softmax(model(tokens)["logits"][:, -1], 1).double()
    np.testing.assert_allclose(frame.data["prob_true"], probs[torch.arange(40), answers].numpy(), rtol=1e-5)


def test_prediction_probe_binary_sensitivity_and_specificity_at_threshold():
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    x = torch.tensor([[-2.0], [-1.0], [0.5], [3.0], [-0.5], [2.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    probe = PredictionProbe(x, y, threshold=0.5)
    frame = _evaluate(probe, model)
    # sigmoid(x) >= 0.5 exactly when x >= 0: predicted positive for 0.5, 3.0, 2.0.
    assert probe.task == "binary"
    assert float(frame["sensitivity"]) == pytest.approx(2 / 3)
    assert float(frame["specificity"]) == pytest.approx(2 / 3)
    # rows: true class; columns: predicted. Class 0: -2, -1 right, 0.5 wrong; class 1: -0.5 wrong.
    np.testing.assert_array_equal(frame["confusion"].numpy(), [[2, 1], [1, 2]])


def test_prediction_probe_confusion_counts_every_true_and_predicted_pair(mlp, blobs):
    probe = PredictionProbe(blobs.x_valid, blobs.y_valid)
    frame = _evaluate(probe, mlp)
    with torch.no_grad():
        pred = mlp(probe.x).argmax(1).numpy()
    expected = np.zeros((7, 7), np.int64)
    for t, p in zip(probe.y.long().numpy(), pred, strict=True):
        expected[t, p] += 1
    np.testing.assert_array_equal(frame["confusion"].numpy(), expected)
    assert np.trace(expected) / expected.sum() == pytest.approx(float(frame["accuracy"]))


def test_prediction_probe_regression_reports_y_hat(mlp):
    model = nn.Linear(3, 1)
    x, y = torch.randn(30, 3), torch.randn(30) * 2.5
    frame = _evaluate(PredictionProbe(x, y), model)
    with torch.no_grad():
        y_hat = model(x)[:, 0].double()
    np.testing.assert_allclose(frame["y_pred"].numpy(), y_hat.numpy(), rtol=1e-6)
    assert float(frame["mse"]) == pytest.approx(float(((y_hat - y.double()) ** 2).mean()))


def _labels(samples: int, labels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and a 0/1 row of labels per sample (each label present in some samples)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 5, generator=generator)
    y = (torch.rand(samples, labels, generator=generator) < 0.4).float()
    return x, y


@pytest.mark.parametrize(("samples", "labels"), [(37, 4), (64, 2), (9, 7)])
def test_prediction_probe_multilabel_scores_each_labels_true_state(samples, labels):
    x, y = _labels(samples, labels)
    model = nn.Linear(5, labels)
    probe = PredictionProbe(x, y, threshold=0.45)
    frame = _evaluate(probe, model)
    assert probe.task == "multilabel" and probe.num_classes == labels
    with torch.no_grad():
        p = torch.sigmoid(model(x).double()).numpy()
    present = y.numpy() == 1
    np.testing.assert_allclose(frame["prob_true"].numpy(), np.where(present, p, 1 - p), rtol=1e-6)
    pred = p >= 0.45
    np.testing.assert_array_equal(frame["pred"].numpy(), pred)
    assert float(frame["accuracy"]) == pytest.approx((pred == present).mean())
    assert float(frame["exact_match"]) == pytest.approx((pred == present).all(1).mean())
    tp, fp, fn = (pred & present).sum(), (pred & ~present).sum(), (~pred & present).sum()
    assert float(frame["f1"]) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    np.testing.assert_allclose(frame["label_accuracy"].numpy(), (pred == present).mean(0))
    np.testing.assert_allclose(frame["class_mean"].numpy(), np.where(present, p, 1 - p).mean(0), rtol=1e-6)
    for j in range(labels):
        expected = [[np.sum(~present[:, j] & ~pred[:, j]), np.sum(~present[:, j] & pred[:, j])],
                    [np.sum(present[:, j] & ~pred[:, j]), np.sum(present[:, j] & pred[:, j])]]  # fmt: skip
        np.testing.assert_array_equal(frame["label_confusion"][j].numpy(), expected)


def test_prediction_probe_multilabel_takes_a_sigmoid_models_probabilities_as_they_are():
    x, y = _labels(30, 3)
    model = nn.Sequential(nn.Linear(5, 3), nn.Sigmoid())
    frame = _evaluate(PredictionProbe(x, y), model)
    with torch.no_grad():
        p = model(x).double().numpy()
    np.testing.assert_allclose(frame["prob_true"].numpy(), np.where(y.numpy() == 1, p, 1 - p), rtol=1e-6)


@pytest.mark.parametrize(("samples", "outputs"), [(30, 3), (7, 2), (50, 5)])
def test_prediction_probe_regression_with_a_target_per_output(samples, outputs):
    generator = torch.Generator().manual_seed(outputs)
    x = torch.randn(samples, 4, generator=generator)
    y = torch.randn(samples, outputs, generator=generator) * torch.arange(1, outputs + 1)
    model = nn.Linear(4, outputs)
    probe = PredictionProbe(x, y)
    frame = _evaluate(probe, model)
    assert probe.task == "regression" and probe.config()["outputs"] == outputs
    with torch.no_grad():
        y_hat = model(x).double().numpy()
    truth = y.double().numpy()
    np.testing.assert_allclose(frame["y_pred"].numpy(), y_hat, rtol=1e-6)
    mse = ((y_hat - truth) ** 2).mean(0)
    r2 = 1 - mse / truth.var(0)
    np.testing.assert_allclose(frame["mse_per_output"].numpy(), mse, rtol=1e-9)
    np.testing.assert_allclose(frame["r2_per_output"].numpy(), r2, rtol=1e-9)
    assert float(frame["mse"]) == pytest.approx(((y_hat - truth) ** 2).mean())
    assert float(frame["r2"]) == pytest.approx(r2.mean())  # uniform over outputs, as scikit-learn


def test_prediction_probe_leaves_unknown_labels_out_of_every_score():
    x, y = _labels(40, 3, seed=2)
    unknown = torch.rand(40, 3, generator=torch.Generator().manual_seed(5)) < 0.3
    unknown[0] = True  # a sample with no label known
    y = torch.where(unknown, torch.nan, y)
    model = nn.Linear(5, 3)
    probe = PredictionProbe(x, y, threshold=0.5)
    frame = _evaluate(probe, model)
    assert probe.task == "multilabel"  # 0s, 1s and NaN: labels, some unknown
    with torch.no_grad():
        p = torch.sigmoid(model(x).double()).numpy()
    known, present, pred = ~unknown.numpy(), y.numpy() == 1, p >= 0.5
    right = (pred == present) & known
    np.testing.assert_allclose(
        frame["prob_true"].numpy()[known], np.where(present, p, 1 - p)[known], rtol=1e-6
    )
    assert np.isnan(frame["prob_true"].numpy()[~known]).all()
    assert float(frame["accuracy"]) == pytest.approx(right.sum() / known.sum())
    scored = known.any(1)
    assert float(frame["exact_match"]) == pytest.approx((right | ~known).all(1)[scored].mean())
    tp, fp, fn = (pred & present).sum(), (pred & ~present & known).sum(), (~pred & present).sum()
    assert float(frame["f1"]) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    np.testing.assert_allclose(frame["label_accuracy"].numpy(), right.sum(0) / known.sum(0))
    assert int(frame["label_confusion"].sum()) == known.sum()
    for j in range(3):
        k = known[:, j]
        np.testing.assert_array_equal(
            frame["label_confusion"][j].numpy(),
            [[np.sum(~present[k, j] & ~pred[k, j]), np.sum(~present[k, j] & pred[k, j])],
             [np.sum(present[k, j] & ~pred[k, j]), np.sum(present[k, j] & pred[k, j])]],
        )  # fmt: skip
    from probescope.probes.prediction import scatter_colours, scatter_points

    data = {key: np.asarray(v) for key, v in frame.items()}
    assert len(scatter_points("multilabel", y.numpy(), np.zeros(40), data)) == known.sum()
    assert len(scatter_colours("multilabel", y.numpy())) == known.sum()


@pytest.mark.parametrize("outputs", [1, 3])
def test_prediction_probe_leaves_unknown_regression_targets_out_of_every_score(outputs):
    generator = torch.Generator().manual_seed(outputs)
    x = torch.randn(30, 4, generator=generator)
    y = torch.randn(30, outputs, generator=generator)
    y[torch.rand(30, outputs, generator=generator) < 0.25] = torch.nan
    model = nn.Linear(4, outputs)
    frame = _evaluate(PredictionProbe(x, y if outputs > 1 else y[:, 0]), model)
    with torch.no_grad():
        y_hat = model(x).double().numpy()
    truth = y.double().numpy()
    known = np.isfinite(truth)
    mse = np.array([np.mean((y_hat[known[:, j], j] - truth[known[:, j], j]) ** 2) for j in range(outputs)])
    r2 = np.array([1 - mse[j] / np.var(truth[known[:, j], j]) for j in range(outputs)])
    assert float(frame["mse"]) == pytest.approx(
        np.sum((y_hat - np.nan_to_num(truth))[known] ** 2) / known.sum()
    )
    assert float(frame["r2"]) == pytest.approx(r2.mean())
    if outputs > 1:
        np.testing.assert_allclose(frame["mse_per_output"].numpy(), mse, rtol=1e-9)
        np.testing.assert_allclose(frame["r2_per_output"].numpy(), r2, rtol=1e-9)


def test_prediction_probe_decides_labels_or_regression_from_a_row_of_targets():
    x, labels = _labels(20, 3)
    model = nn.Linear(5, 3)
    assert _task(PredictionProbe(x, labels), model) == "multilabel"
    assert _task(PredictionProbe(x, labels.bool()), model) == "multilabel"
    assert _task(PredictionProbe(x, labels, task="regression"), model) == "regression"
    assert _task(PredictionProbe(x, labels * 0.5 + 0.2), model) == "regression"
    assert _task(PredictionProbe(x, labels[:, :1]), nn.Linear(5, 1)) == "binary"  # one column: one label
    assert _task(PredictionProbe(x, labels[:, :1, None]), nn.Linear(5, 1)) == "binary"


def _task(probe: PredictionProbe, model: nn.Module) -> str:
    probe.attach(model)
    return probe.task


@pytest.mark.parametrize(
    ("y", "kwargs", "width", "message"),
    [
        (torch.ones(20, 3), {"task": "classification"}, 3, "needs one class label per sample"),
        (torch.ones(20, 3), {"task": "binary"}, 3, "needs one class label per sample"),
        (torch.ones(20, 3), {"output": "softmax"}, 3, "output must be 'auto', 'sigmoid' or 'probs'"),
        (torch.full((20, 3), 0.5), {"task": "multilabel"}, 3, "needs y of 0s and 1s"),
        (torch.ones(20, 3), {}, 4, "y has 3 targets per sample, the model gives 4 outputs"),
        (torch.ones(20), {"task": "multilabel"}, 3, "needs a row of 0/1 labels per sample"),
        (torch.randn(20), {"task": "regression"}, 3, "regression needs one output per sample"),
    ],
)
def test_prediction_probe_refuses_targets_that_do_not_fit_the_task_or_model(y, kwargs, width, message):
    probe = PredictionProbe(torch.randn(20, 5), y, **kwargs)
    with pytest.raises(ValueError, match=message):
        probe.attach(nn.Linear(5, width))


@pytest.mark.parametrize("make", ["grid", "prediction"])
def test_a_sigmoid_output_of_a_model_of_several_outputs_is_refused_not_read_in_part(make):
    x = torch.randn(20, 2)
    probe = (
        GridProbe(x, output="sigmoid")
        if make == "grid"
        else PredictionProbe(x, torch.randint(0, 3, (20,)), output="sigmoid")
    )
    with pytest.raises(
        ValueError, match=r"output='sigmoid' takes a model of one output .* the model gives 3"
    ):
        probe.attach(nn.Linear(2, 3))
    if make == "grid":  # one output: its sigmoid, as before
        probe.attach(nn.Linear(2, 1))
        assert probe.num_classes == 2


def test_an_unknown_output_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"output must be one of \('auto', 'softmax', 'sigmoid', 'probs'\)"):
        PredictionProbe(torch.randn(5, 2), torch.zeros(5), output="logits")


def test_prediction_probe_refuses_targets_of_more_than_one_row_per_sample():
    with pytest.raises(
        ValueError, match=r"one row of targets \(one per output or label\), got shape \(8, 6, 6\)"
    ):
        PredictionProbe(torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8, 6, 6)))


def test_loss_probe_reports_step_epoch_and_valid_series(mlp, blobs):
    probe = LossProbe(
        valid=(blobs.x_valid, blobs.y_valid),
        loss_fn=nn.functional.cross_entropy,
        metrics={"accuracy": lambda p, t: (p.argmax(1) == t).float().mean()},
    )
    with Monitor(mlp, [probe]) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 12, epoch_every=4)
        monitor.log(custom=3.0)
    data = monitor.latest("loss").data
    train = data["series/train_loss/values"]
    assert data["series/train_loss/steps"].tolist() == list(range(1, 13))
    np.testing.assert_allclose(data["series/train_loss_epoch/values"], train.reshape(3, 4).mean(1))
    assert data["series/train_loss_epoch/steps"].tolist() == [4, 8, 12]
    assert data["series/valid_loss/steps"].tolist() == [0, 4, 8, 12]
    with torch.no_grad():
        out = mlp(blobs.x_valid)
    assert data["series/valid_loss/values"][-1] == pytest.approx(
        float(nn.functional.cross_entropy(out, blobs.y_valid)), rel=1e-5
    )
    assert data["series/accuracy/values"][-1] == pytest.approx(
        float((out.argmax(1) == blobs.y_valid).float().mean())
    )
    assert "series/custom/values" not in data  # logged after the last frame was taken


@pytest.mark.parametrize(("n", "max_points"), [(100_003, 1000), (50, 8), (9, 8), (1000, 1000)])
def test_envelope_keeps_a_bounded_subset_with_the_extremes_nans_and_ends(n, max_points):
    from probescope.history import Series, envelope

    rng = np.random.default_rng(n)
    values = rng.normal(size=n)
    spikes = rng.choice(n, size=3, replace=False)
    values[spikes[0]], values[spikes[1]], values[spikes[2]] = 50.0, -40.0, np.nan
    series = Series(np.arange(n) * 3, np.arange(n) // 7, values)
    cut = envelope(series, max_points)
    if n <= max_points:
        assert cut is series
        return
    assert len(cut.values) <= max_points
    index = cut.steps // 3  # the kept points are the series' own, in order
    assert np.all(np.diff(index) > 0) and index[0] == 0 and index[-1] == n - 1
    np.testing.assert_array_equal(cut.epochs, series.epochs[index])
    np.testing.assert_array_equal(cut.values, series.values[index])
    assert {spikes[0], spikes[1], spikes[2]} <= set(index.tolist())  # spikes and the NaN survive
    # The whole series' extremes are among the kept points (each stretch keeps its own).
    assert np.nanmax(cut.values) == np.nanmax(values) and np.nanmin(cut.values) == np.nanmin(values)


def test_loss_and_curve_frames_stay_bounded_however_long_training_runs(mlp, blobs):
    loss_probe = LossProbe(max_points=20, schedule=Schedule.every(1))
    x, y = blobs.x_train[:, 0], blobs.x_train[:, 1]
    curve_probe = CurveProbe(x, y, max_points=20, schedule=Schedule.every(1))
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    with Monitor(mlp, [loss_probe]) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 60, epoch_every=30)
    data = monitor.latest("loss").data
    steps = data["series/train_loss/steps"]
    assert len(steps) <= 20 and steps[0] == 1 and steps[-1] == 60
    full = monitor.history.read()[History.BATCH_LOSS]
    assert len(full.values) == 60 and set(steps) <= set(full.steps.tolist())
    assert data["series/train_loss/values"].max() == full.values.max()
    assert data["series/train_loss/values"].min() == full.values.min()
    with Monitor(model, [curve_probe]) as monitor:
        fit_curve(monitor, model, x, y, 40)
    curve = monitor.latest("curve").data
    assert len(curve["batch_loss_series"]) <= 20 and curve["batch_loss_steps"][-1] == 40
    assert len(curve["total_loss_series"]) <= 20 and curve["total_loss_steps"][-1] == 40
    with pytest.raises(ValueError, match="max_points must be an integer >= 8"):
        LossProbe(max_points=4)
    with pytest.raises(ValueError, match="max_points must be an integer >= 8"):
        CurveProbe(np.zeros((5, 1)), np.zeros(5), max_points=7)


def test_loss_probe_metrics_need_valid_data():
    with pytest.raises(ValueError, match="valid"):
        LossProbe(metrics={"accuracy": lambda p, t: 0.0})


def test_probs_to_rgba_writes_into_the_given_slot():
    probs = torch.softmax(torch.randn(5, 6, 3), -1)
    slot = torch.full((5, 6, 4), 7, dtype=torch.uint8)  # poisoned
    out = probs_to_rgba(probs, "boundary", default_palette(3), out=slot)
    assert out is slot
    assert torch.equal(slot, probs_to_rgba(probs, "boundary", default_palette(3)))


@pytest.mark.parametrize("resolution", [1, (1, 5), (4, 1)])
def test_grid_probe_draws_one_pixel_wide_grids(mlp, blobs, resolution):
    probe = GridProbe(blobs.x_train, blobs.y_train, resolution=resolution)
    frame = _evaluate(probe, mlp)  # attaching checked the model on the grid's own points
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    points = probe.grid.points()
    with torch.no_grad():
        expected = torch.softmax(mlp(points), 1).reshape(height, width, -1)
    np.testing.assert_allclose(frame["probs"].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert frame["rgba"].shape == (height, width, 4)


def test_grid_spacing_survives_a_spec_round_trip(tmp_path):
    from probescope import load_probes, save_probes

    probe = GridProbe(torch.randn(30, 2), domain=(0.0, 1.0, 0.0, 0.5), spacing=0.3)
    save_probes([probe], tmp_path / "probes.json")
    (again,) = load_probes(tmp_path / "probes.json")
    assert (again.width, again.height, again.domain) == (probe.width, probe.height, probe.domain)


class DictOutputs(nn.Module):
    """A classifier that returns a mapping (as a Hugging Face model returns a ModelOutput)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"logits": self.net(x), "hidden": x}


def test_a_model_returning_a_mapping_is_probed_through_its_logits(blobs):
    x, y = blobs.x_train, blobs.y_train
    torch.manual_seed(0)
    net = Residual()  # not fusable: the grid goes through the module's own forward

    def frames(model):
        probes = [
            GridProbe(x, y, resolution=12, schedule=Schedule.every(2)),
            PredictionProbe(x[:30], y[:30], schedule=Schedule.every(2)),
        ]
        with Monitor(model, probes, snapshot="sync") as monitor:
            monitor.step()
            monitor.step()
        return {name: monitor.latest(name) for name in ("grid", "prediction")}, monitor

    got, monitor = frames(DictOutputs(net))
    want, _ = frames(net)
    for name in ("grid", "prediction"):
        assert got[name].step == want[name].step == 2
        assert got[name].data.keys() == want[name].data.keys()
        for key, value in want[name].data.items():
            np.testing.assert_array_equal(np.asarray(got[name].data[key]), np.asarray(value), err_msg=key)
    with torch.no_grad():
        probs = torch.softmax(net(monitor.probes["grid"].grid.points()), -1).reshape(12, 12, 7)
    torch.testing.assert_close(torch.as_tensor(got["grid"].data["probs"]), probs, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- GridProbe mode="value"


def _regression_mlp(outputs: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 24), nn.SiLU(), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, outputs))


def _grid_inputs(probe) -> torch.Tensor:
    static = probe.static()
    origin, u, v = (torch.as_tensor(static[k]) for k in ("origin", "axis_u", "axis_v"))
    us, vs = torch.as_tensor(static["us"]), torch.as_tensor(static["vs"])
    return origin + us[None, :, None] * u + vs[:, None, None] * v  # (H, W, 2)


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize(("outputs", "class_index", "resolution"), [(1, None, (29, 13)), (3, 2, (1, 7))])
def test_a_value_map_is_the_models_raw_output_coloured_over_the_targets_range(
    wrapped, outputs, class_index, resolution
):
    """Fused and through the module's forward: each pixel is the model's output at its point
    (no softmax, no sigmoid), and its colour the ramp over the range of the targets, which
    have both signs and so widen to be symmetric about 0."""
    g = torch.Generator().manual_seed(outputs)
    x = torch.rand(60, 2, generator=g) * 4 - 2
    y = x[:, 0] * 1.5 - x[:, 1] ** 2  # from about -7 to 3: the range is (-7, 7)
    model = _regression_mlp(outputs)
    net = WrappedModule(model) if wrapped else model
    probe = GridProbe(x, y, mode="value", class_index=class_index, resolution=resolution)
    frame = _evaluate(probe, net)
    path = probe.config()["path"]
    assert path.startswith("module forward") if wrapped else path == "numba"
    extent = float(y.abs().max())
    assert probe.value_range == pytest.approx((-extent, extent)) and float(y.max()) < extent
    inputs = _grid_inputs(probe)
    with torch.no_grad():
        expected = model(inputs.reshape(-1, 2).float())
    w, h = resolution
    values = frame["probs"]
    assert values.shape == (h, w, outputs)
    np.testing.assert_allclose(values.numpy(), expected.reshape(h, w, outputs).numpy(), rtol=1e-5, atol=1e-5)
    index = 0 if class_index is None else class_index
    reference = probs_to_rgba(expected.reshape(h, w, outputs), "value", default_palette(outputs), index,
                              value_range=probe.value_range, impl="torch")  # fmt: skip
    assert (frame["rgba"].int() - reference.int()).abs().max() <= 1
    assert probe.config()["value_range"] == list(probe.value_range)
    assert probe.config()["num_classes"] == outputs  # one output is no binary model here


def test_a_value_map_takes_a_given_range_and_draws_targets_on_its_ramp():
    from probescope.kernels.colormap import DIVERGING_ANCHORS
    from probescope.probes.grid import POINT_UNKNOWN, point_colours, ramp_ends

    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    y = torch.tensor([2.0, 4.0, 6.0, 99.0, float("nan")])  # positive: the range is theirs
    assert GridProbe(x, y, mode="value").value_range == (2.0, 99.0)
    probe = GridProbe(x, y, mode="value", value_range=(2, 6), resolution=4)
    frame = _evaluate(probe, _regression_mlp())
    static, config = probe.static(), probe.config()
    np.testing.assert_array_equal(static["points_value"], y.numpy())
    assert "points_label" not in static
    colours = point_colours(config, static)
    assert [tuple(c) for c in colours.tolist()] == [
        DIVERGING_ANCHORS[0], DIVERGING_ANCHORS[2], DIVERGING_ANCHORS[4], DIVERGING_ANCHORS[4], POINT_UNKNOWN
    ]  # fmt: skip
    assert ramp_ends(config) == ("output 0", "2", "4", "6")
    assert frame["rgba"].shape == (4, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "mode='value' colours over value_range=\\(lo, hi\\).*got no labels"),
        ({"labels": torch.ones(10)}, "targets that span no range"),
        ({"labels": torch.full((10,), float("nan"))}, "targets that span no range"),
        ({"value_range": (1.0, 1.0)}, "value_range must be two finite numbers lo < hi"),
        ({"value_range": (0, 1), "output": "softmax"}, "output='softmax' is for probabilities"),
    ],
)
def test_a_value_map_refuses_what_it_cannot_colour(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GridProbe(torch.randn(10, 2), mode="value", **kwargs)


def test_value_range_is_for_value_maps_and_class_index_for_an_output_the_model_has():
    with pytest.raises(ValueError, match="value_range is for mode='value', not mode='region'"):
        GridProbe(torch.randn(10, 2), value_range=(0, 1))
    probe = GridProbe(torch.randn(10, 2), mode="value", value_range=(0, 1), class_index=3)
    with pytest.raises(ValueError, match="class_index 3 is out of range for 3 outputs"):
        probe.attach(_regression_mlp(3))
    # A one-output model in prob mode is a binary classifier still: its positive class.
    binary = GridProbe(torch.randn(10, 2), mode="prob")
    binary.attach(_regression_mlp(1))
    assert (binary.class_index, binary.num_classes) == (1, 2)


def test_a_value_map_survives_a_spec_round_trip_and_a_monitor_run(tmp_path):
    from probescope import load_probes, save_probes
    from probescope.run import open_run

    x = torch.rand(80, 2) * 2 - 1
    y = x.sum(1)
    probe = GridProbe(x, y, mode="value", resolution=(9, 6), schedule=Schedule.every(2))
    save_probes([probe], tmp_path / "probes.json")
    (again,) = load_probes(tmp_path / "probes.json")
    assert (again.mode, again.value_range, again.class_index) == ("value", probe.value_range, 0)
    model = _regression_mlp()
    with Monitor(model, [again], run_dir=tmp_path / "run") as monitor:
        regression_steps(monitor, model, x, y, 4, lr=0.05)
    record = open_run(tmp_path / "run").probe(again.name)
    assert record.config["value_range"] == list(probe.value_range)
    last = record.frame(len(record) - 1)
    with torch.no_grad():
        expected = model(_grid_inputs(again).reshape(-1, 2).float()).reshape(6, 9, 1)
    np.testing.assert_allclose(last.data["probs"], expected.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- class_names


def test_class_names_are_checked_when_given_and_counted_when_attached(mlp):
    from probescope.probes.base import display_name

    x = torch.randn(30, 2)
    for bad, message in [("abc", "must be a sequence of names"), (3, "must be a sequence of names"),
                         ([], "got no names"), (["a", "b", "a"], r"\['a'\] more than once")]:  # fmt: skip
        with pytest.raises((TypeError, ValueError), match=message):
            GridProbe(x, class_names=bad)
        with pytest.raises((TypeError, ValueError), match=message):
            PredictionProbe(x, torch.zeros(30), class_names=bad)
    probe = GridProbe(x, class_names=np.array(["a", "b"]))  # mlp has 7 classes
    with pytest.raises(ValueError, match="GridProbe 'grid': 2 class_names for 7 classes"):
        probe.attach(mlp)
    names = [f"kind {i}" for i in range(7)]
    probe = GridProbe(x, class_names=names)
    probe.attach(mlp)
    assert probe.config()["class_names"] == names
    assert display_name(probe.config(), 3) == "kind 3" and display_name({}, 3, "label") == "label 3"
    binary = PredictionProbe(x, (x[:, 0] > 0).long(), class_names=("benign", "malignant"))
    binary.attach(nn.Linear(2, 1))
    assert binary.task == "binary" and binary.config()["class_names"] == ["benign", "malignant"]
    with pytest.raises(ValueError, match="3 class_names for 2 outputs"):
        PredictionProbe(x, torch.randn(30, 2), class_names=list("abc")).attach(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="2 class_names for 3 labels"):
        PredictionProbe(x, (torch.randn(30, 3) > 0).float(), class_names=["a", "b"]).attach(nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"1 class_names for 2 classes \(binary\)"):
        PredictionProbe(x, (x[:, 0] > 0).long(), class_names=["yes"]).attach(nn.Linear(2, 1))


def test_class_names_survive_a_spec_round_trip(tmp_path):
    from probescope import load_probes, save_probes

    x = torch.randn(20, 2)
    probes = [
        GridProbe(x, class_names=["x", "y"]),
        PredictionProbe(x, torch.arange(20) % 2, class_names=("no", "yes")),
    ]
    save_probes(probes, tmp_path / "probes.json")
    assert [p.class_names for p in load_probes(tmp_path / "probes.json")] == [("x", "y"), ("no", "yes")]


def test_a_palette_colours_the_map_and_the_predictions(mlp):
    from probescope.probes.prediction import scatter_colours

    x = torch.randn(40, 2) * 3
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), "gold", "#000000", "white", (0.5, 0.5, 0.5)]
    probe = GridProbe(x, resolution=32, mode="region", palette=colours)
    frame = _evaluate(probe, mlp)
    palette = probe.static()["palette"]
    assert palette[3].tolist() == [255, 215, 0] and palette[5].tolist() == [255, 255, 255]
    expected = probs_to_rgba(frame["probs"], "region", torch.from_numpy(palette), impl="torch")
    assert (frame["rgba"].int() - expected.int()).abs().max() <= 1
    assert not torch.equal(
        expected, probs_to_rgba(frame["probs"], "region", default_palette(7), impl="torch")
    )
    with pytest.raises(ValueError, match="palette has 2 colours for 7 classes"):
        GridProbe(x, palette=["red", "blue"]).attach(mlp)
    prediction = PredictionProbe(x, torch.arange(40) % 7, palette="Set1")
    prediction.attach(mlp)
    static = prediction.static()
    assert static["palette"].shape == (7, 3)
    drawn = scatter_colours(prediction.task, static["y_true"], static["palette"])
    np.testing.assert_allclose(drawn * 255, static["palette"][static["y_true"].astype(int)], atol=1e-9)
    assert "palette" not in PredictionProbe(x, torch.arange(40) % 7).static()  # (the default)


def test_a_blend_map_mixes_its_classes_colours_by_probability(mlp):
    from probescope.kernels import probs_to_rgba_reference

    probe = GridProbe(torch.randn(40, 2) * 3, mode="blend", resolution=(21, 13))
    frame = _evaluate(probe, mlp)
    expected = probs_to_rgba_reference(frame["probs"], "blend", torch.from_numpy(probe.static()["palette"]))
    assert (frame["rgba"].int() - expected.int()).abs().max() <= 1
    region = probs_to_rgba_reference(frame["probs"], "region", torch.from_numpy(probe.static()["palette"]))
    assert (expected.int() - region.int()).abs().max() > 20  # (another picture than region's)


# ---------------------------------------------------------------- CurveProbe along a line


@pytest.mark.parametrize("through", ["pca", "samples"])
def test_a_curve_of_several_features_follows_a_line_through_input_space(through):
    """The curve is the model on the line at the samples' positions along it, the band the
    samples' own smoothed loss in the order of their positions, each against a float64 torch
    reference computed here from the line alone."""
    from probescope.kernels import smooth_1d_reference

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 3, generator=g) * torch.tensor([3.0, 1.0, 0.3])  # the first axis dominates
    y = torch.sin(x[:, 0]) + 0.1 * x[:, 1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    line = None if through == "pca" else (x[7], x[11])
    probe = CurveProbe(x, y, line=line, loss_smoothing=5, graph_sparsity=2)
    frame = _evaluate(probe, model)
    static, config = probe.static(), probe.config()
    assert config["input_dim"] == 3 and config["line"] == through
    origin, direction = (
        torch.as_tensor(static["origin"]).double(),
        torch.as_tensor(static["direction"]).double(),
    )
    if through == "pca":  # the data's mean along its first principal direction
        np.testing.assert_allclose(static["origin"], x.mean(0).numpy(), atol=1e-5)
        assert abs(float(direction[0])) > 0.95
    else:  # from a at 0 to b at |b - a|
        np.testing.assert_allclose(static["origin"], x[7].numpy())
        span = (x[11] - x[7]).double()
        np.testing.assert_allclose(direction.numpy(), (span / span.norm()).numpy(), atol=1e-6)
    t = ((x.double() - origin) @ direction).sort().values[::2]
    np.testing.assert_allclose(static["x"], t.numpy(), atol=1e-5)
    order = ((x.double() - origin) @ direction).argsort(stable=True)[::2]
    np.testing.assert_allclose(static["y"], y[order].numpy())
    with torch.no_grad():
        curve = model((origin + t[:, None] * direction).float())[:, 0]
        loss = (model(x[order])[:, 0].double() - y[order].double()) ** 2
    np.testing.assert_allclose(frame["y_pred"].numpy(), curve.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        frame["loss"].numpy(), smooth_1d_reference(loss, 5).numpy(), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        (frame["band_upper"] - frame["y_pred"]).numpy(), frame["loss"].numpy(), atol=1e-6
    )


def test_a_curves_line_survives_a_spec_round_trip(tmp_path):
    from probescope import load_probes, save_probes

    x = torch.randn(50, 3)
    probes = [CurveProbe(x, x[:, 0], name="pca"), CurveProbe(x, x[:, 0], line=(x[0], x[1]), name="two")]
    save_probes(probes, tmp_path / "probes.json")
    for before, after in zip(probes, load_probes(tmp_path / "probes.json"), strict=True):
        assert torch.equal(before.origin, after.origin) and torch.equal(before.direction, after.direction)
        assert after.config()["line"] == before.config()["line"]


@pytest.mark.parametrize(("features", "norm"), [(2, False), (5, False), (2, True), (7, True)])
def test_grid_hyperplanes_are_where_each_first_layer_unit_is_zero(features, norm):
    """Each row (A, B, C) of a frame's hyperplanes is the first layer's unit (a batch norm
    after it folded in, eval mode) on the plane: A u + B v + C = that unit at the pixel's input
    (float64 reference)."""
    torch.manual_seed(features)
    norms = [nn.BatchNorm1d(9)] if norm else []
    model = nn.Sequential(nn.Linear(features, 9), *norms, nn.ReLU(), nn.Linear(9, 3))
    if norm:
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(60, features)
    probe = GridProbe(x, resolution=(11, 7), hyperplanes=True)
    lines = _evaluate(probe, model.eval())["hyperplanes"]
    assert lines.shape == (9, 3)
    uv = torch.randn(25, 2, dtype=torch.float64)
    points = probe.origin.double() + uv[:, :1] * probe.axis_u.double() + uv[:, 1:] * probe.axis_v.double()
    with torch.no_grad():
        units = model.double()[: 2 if norm else 1](points)  # the first layer (and its norm), float64
    got = uv @ lines[:, :2].double().T + lines[:, 2].double()
    torch.testing.assert_close(got, units, rtol=1e-4, atol=1e-4)  # float32 lines


def test_grid_hyperplanes_need_an_mlp_and_a_bool(blobs):
    x, y = blobs.x_train, blobs.y_train
    with pytest.raises(ValueError, match="hyperplanes must be True or False"):
        GridProbe(x, y, hyperplanes="yes")

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(x) + x.sum(1, keepdim=True)

    with pytest.raises(ValueError, match="hyperplanes are the first Linear layer's units"):
        Monitor(Residual(), [GridProbe(x, y, hyperplanes=True)])


@pytest.mark.parametrize(
    ("line", "ends"),
    [
        ((1.0, 0.0, -0.5), [[0.5, 0.0], [0.5, 1.0]]),  # u = 0.5
        ((0.0, 2.0, -1.5), [[0.0, 0.75], [1.0, 0.75]]),  # v = 0.75
        ((1.0, -1.0, 0.0), [[0.0, 0.0], [1.0, 1.0]]),  # the diagonal, corner to corner
        ((1.0, 1.0, -1.5), [[0.5, 1.0], [1.0, 0.5]]),  # cuts a corner off
        ((1.0, 1.0, -2.0), None),  # touches the corner (1, 1) only
        ((1.0, 0.0, -3.0), None),  # misses
        ((0.0, 0.0, 1.0), None),  # a unit with no weights is zero nowhere
    ],
)
def test_line_segments_clip_each_line_to_the_map(line, ends):
    from probescope.probes.grid import line_segments

    got = line_segments(np.array([line]), (0.0, 1.0, 0.0, 1.0))[0]
    if ends is None:
        assert np.isnan(got).all()
    else:  # either order
        assert np.allclose(got, ends) or np.allclose(got[::-1], ends), got


def test_line_segments_of_random_lines_end_on_the_border_and_lie_on_their_line():
    from probescope.probes.grid import line_segments

    rng = np.random.default_rng(3)
    lines, domain = rng.normal(size=(500, 3)), (-1.5, 2.0, -0.5, 0.25)
    ends = line_segments(lines, domain)
    kept = np.isfinite(ends).all(axis=(1, 2))
    assert 0 < kept.sum() < len(lines)  # some cross the map, some miss it
    a, b, c = lines[kept].T
    for end in (ends[kept, 0], ends[kept, 1]):
        np.testing.assert_allclose(a * end[:, 0] + b * end[:, 1] + c, 0.0, atol=1e-9)
        on_border = np.isclose(end[:, 0], domain[0]) | np.isclose(end[:, 0], domain[1])
        on_border |= np.isclose(end[:, 1], domain[2]) | np.isclose(end[:, 1], domain[3])
        assert on_border.all()
    # a line that misses: its value has one sign at every corner
    corners = np.array([(u, v) for u in domain[:2] for v in domain[2:]])
    values = lines[~kept] @ np.c_[corners, np.ones(4)].T
    assert (np.all(values >= -1e-12, axis=1) | np.all(values <= 1e-12, axis=1)).all()
