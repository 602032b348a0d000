"""Exports decode with the right frame count and size; figures draw every probe kind."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

import probescope.export
from probescope import CurveProbe, Monitor, Schedule, open_run
from probescope.export import Painter, export_final_pictures, export_probe, export_run, timeline
from probescope.figures import FrameRenderer, small_multiples
from tests.conftest import fit_curve, record_blobs_run, regression_steps


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    return open_run(record_blobs_run(path, grid_every=4, other_every=4, steps=12, epoch_every=4))


def test_interpolation_adds_k_frames_between_each_recorded_pair(recorded):
    grid = recorded.probe("grid")
    items = list(timeline(grid, interpolate=3, method="smoothstep"))
    assert len(items) == len(grid) + 3 * (len(grid) - 1)
    steps = [step for _, step, _ in items]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 12
    # An in-between map is a coloured blend of the two probability maps around it.
    first, second = grid.frame(0).data["probs"], grid.frame(1).data["probs"]
    t = 0.25 * 0.25 * (3 - 2 * 0.25)
    np.testing.assert_allclose(items[1][0]["probs"], first + (second - first) * t, rtol=1e-5, atol=1e-6)


def test_geometric_interpolation_blends_probabilities_in_log_space(recorded):
    grid = recorded.probe("grid")
    items = list(timeline(grid, interpolate=1, method="geometric"))
    first, second = (grid.frame(i).data["probs"].astype(np.float64) for i in (0, 1))
    mean = np.sqrt(first * second)  # t = 1/2
    expected = mean / mean.sum(axis=-1, keepdims=True)
    middle = items[1][0]
    np.testing.assert_allclose(middle["probs"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(middle["probs"].sum(-1), 1.0, rtol=1e-5)
    assert middle["rgba"].shape[:2] == first.shape[:2] and middle["rgba"].dtype == np.uint8
    # a pixel whose frames share no class above 0 is blended linearly, not left empty
    from probescope.export import _blend

    a, b = np.eye(7, dtype=np.float32)[:2, None, None]  # (1, 1, 7) each: class 0, then class 1
    (half,) = _blend(grid, {"probs": a}, {"probs": b}, 1, "geometric")
    np.testing.assert_allclose(half["probs"], [[[0.5, 0.5, 0, 0, 0, 0, 0]]])


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_animations_decode_with_the_right_frame_count_and_size(recorded, tmp_path, fmt):
    grid = recorded.probe("grid")
    (path,) = export_probe(grid, tmp_path, [fmt], interpolate=2, size=(320, 240), gif_scale=1.0)
    frames = list(iio.imiter(path))  # iterate: the MP4 reader reports an unknown length
    assert len(frames) == len(grid) + 2 * (len(grid) - 1)
    assert frames[0].shape[:2] == (240, 320)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1, "frames do not change"


def test_pictures_drawn_by_worker_processes_are_the_ones_drawn_here(recorded, monkeypatch):
    monkeypatch.setattr(probescope.export, "MIN_PARALLEL", 4)  # (this run's probes have a few frames)
    with Painter(2) as workers:
        for name in ("grid", "prediction", "loss"):
            record = recorded.probe(name)
            items = list(timeline(record, interpolate=1))
            here = list(Painter(1).pictures(record, iter(items), len(items), (320, 240), "mpl"))
            there = list(workers.pictures(record, iter(items), len(items), (320, 240), "mpl"))
            assert workers._pool is not None  # drawn by the workers, not here
            assert [step for _, step in there] == [step for _, step, _ in items]
            for (mine, _), (theirs, _) in zip(here, there, strict=True):
                np.testing.assert_array_equal(mine, theirs, err_msg=name)


def test_a_long_export_with_jobs_writes_what_one_process_writes(recorded, tmp_path, monkeypatch):
    monkeypatch.setattr(probescope.export, "MIN_PARALLEL", 4)
    files = {
        jobs: export_run(recorded, tmp_path / str(jobs), ["png", "gif"], probes=["grid", "loss"], jobs=jobs)
        for jobs in (1, 2)
    }
    assert [[p.name for p in paths] for paths in files[1].values()] == [
        [p.name for p in paths] for paths in files[2].values()
    ]
    for one, two in zip(
        (p for paths in files[1].values() for p in paths),
        (p for paths in files[2].values() for p in paths),
        strict=True,
    ):
        assert one.read_bytes() == two.read_bytes(), one.name
    with pytest.raises(ValueError, match="jobs must be an int >= 1, got 0"):
        export_probe(recorded.probe("grid"), tmp_path / "bad", ["png"], jobs=0)


def test_a_reused_map_renderer_draws_every_frame_as_a_fresh_one_would(recorded):
    # The map renderer lays its figure out once, at the first picture, and keeps that layout.
    grid = recorded.probe("grid")
    reused = FrameRenderer(grid, size=(400, 300))
    for index in range(len(grid)):
        frame = grid.frame(index)
        reused.draw(frame.data, frame.step, frame.epoch)
        fresh = FrameRenderer(grid, size=(400, 300))
        fresh.draw(frame.data, frame.step, frame.epoch)
        np.testing.assert_array_equal(reused.image(), fresh.image())
    assert not reused.figure.get_constrained_layout()  # laid out once, then fixed


def test_png_export_writes_one_file_per_frame(recorded, tmp_path):
    files = export_run(recorded, tmp_path, ["png"], probes=["prediction", "loss"])
    for name in ("prediction", "loss"):
        pngs = [p for p in files[name] if p.suffix == ".png"]
        assert len(pngs) == len(recorded.probe(name))
        assert iio.imread(pngs[0]).shape == (512, 768, 4) or iio.imread(pngs[0]).shape == (512, 768, 3)


def test_the_confusion_figure_shades_each_row_by_its_share_and_writes_the_counts(recorded, tmp_path):
    from probescope.figures import confusion_figure

    record = recorded.probe("prediction")
    assert tmp_path / "prediction_confusion.png" in export_final_pictures(recorded, tmp_path)
    for index in (0, -1):
        frame = record.frame(index)
        counts = np.asarray(frame.data["confusion"])
        figure = confusion_figure(record, index)
        ax = figure.axes[0]
        shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        np.testing.assert_allclose(ax.images[0].get_array(), shares)
        texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        assert texts == {(r, c): str(n) for (r, c), n in np.ndenumerate(counts)}
        right, total = int(np.trace(counts)), int(counts.sum())
        assert total == len(record.static["y_true"])
        assert f"step {frame.step} · {right} of {total} right" in ax.get_title()
    assert iio.imread(tmp_path / "prediction_confusion.png").shape[0] > 100


def test_a_regression_prediction_probe_has_no_confusion_figure(tmp_path):
    from probescope import PredictionProbe
    from probescope.figures import confusion_figure

    x = torch.linspace(-1, 1, 40)[:, None]
    model = nn.Linear(1, 1)
    with Monitor(model, [PredictionProbe(x, 2 * x, task="regression")], run_dir=tmp_path / "run") as monitor:
        monitor.step()
    run = open_run(tmp_path / "run")
    written = export_final_pictures(run, tmp_path / "final")
    assert (
        not any("confusion" in p.name for p in written)
        and (tmp_path / "final" / "prediction_final.png").exists()
    )
    with pytest.raises(ValueError, match="no confusion matrix"):
        confusion_figure(run.probe("prediction"))


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_a_row_of_targets_per_sample_is_recorded_and_drawn_point_for_point(task, tmp_path):
    from probescope import PredictionProbe, load_probes
    from probescope.figures import plot_frame
    from probescope.probes.prediction import scatter_colours, scatter_points

    torch.manual_seed(0)
    x = torch.randn(60, 4)
    y = (x[:, :3] > 0).float() if task == "multilabel" else x[:, :3] * torch.tensor([1.0, -2.0, 0.5])
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = (
        nn.functional.binary_cross_entropy_with_logits if task == "multilabel" else nn.functional.mse_loss
    )
    probe = PredictionProbe(x, y, schedule=Schedule.every(2))
    with Monitor(model, [probe], run_dir=tmp_path / "run", snapshot="sync") as monitor:  # every frame
        for _ in range(4):
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss=loss)
    run = open_run(tmp_path / "run")
    record = run.probe("prediction")
    assert record.config["task"] == task and record.config["outputs"] == 3 and len(record) == 3
    np.testing.assert_array_equal(record.static["y_true"], y.double().numpy())
    data = record.frame(-1).data
    with torch.no_grad():
        out = model(x).double().numpy()
    if task == "multilabel":
        p = 1 / (1 + np.exp(-out))
        np.testing.assert_allclose(data["prob_true"], np.where(y.numpy() == 1, p, 1 - p), rtol=1e-6)
    else:
        np.testing.assert_allclose(data["y_pred"], out, rtol=1e-6)
    figure = plot_frame(record)
    points = figure.axes[0].collections[0]
    expected = scatter_points(task, record.static["y_true"], record.static["jitter"], data)
    assert expected.shape == (180, 2)  # every sample's every label (output)
    np.testing.assert_allclose(points.get_offsets(), expected)
    np.testing.assert_allclose(points.get_facecolors()[:, :3], scatter_colours(task, record.static["y_true"]))
    written = export_final_pictures(run, tmp_path / "final")
    assert (tmp_path / "final" / "prediction_final.png") in written
    assert not any("confusion" in p.name for p in written)  # no one matrix for them all
    (again,) = load_probes(tmp_path / "run")  # the spec makes the same probe again
    again.attach(model)
    assert again.task == task and torch.equal(again.y, probe.y)


def test_final_map_png_is_exactly_the_last_recorded_map(recorded, tmp_path):
    export_final_pictures(recorded, tmp_path)
    png = iio.imread(tmp_path / "grid_final_map.png")
    np.testing.assert_array_equal(png, recorded.probe("grid").frame(-1).data["rgba"])
    for name in ("grid", "prediction", "loss"):
        assert (tmp_path / f"{name}_final.png").exists() and (
            tmp_path / f"{name}_small_multiples.png"
        ).exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"formats": ["avi"]}, "formats must be among"),
        ({"formats": ["mp4"], "fps": 0}, "fps must be > 0, got 0"),
        ({"formats": ["gif"], "fps": -1.0}, "fps must be > 0, got -1.0"),
        ({"formats": ["gif"], "gif_scale": 0}, r"gif_scale must be within \(0, 1\], got 0"),
    ],
)
def test_bad_export_arguments_are_refused_before_anything_is_written(recorded, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_probe(recorded.probe("grid"), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_curve_figure_draws_the_band_and_both_loss_series(tmp_path):
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 80)
    y = x**2
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    with Monitor(
        model, [CurveProbe(x, y, loss_smoothing=5, schedule=Schedule.every(1))], run_dir=tmp_path
    ) as m:
        fit_curve(m, model, x, y, 4, wait=False)
    record = open_run(tmp_path).probe("curve")
    renderer = FrameRenderer(record, size=(400, 300))
    frame = record.frame(-1)
    renderer.draw(frame.data, frame.step, frame.epoch)
    image = renderer.image()
    assert image.shape == (300, 400, 3) and image.std() > 10
    assert len(renderer.side[0].lines["sample"].get_xdata()) == len(record)
    assert len(renderer.side[1].lines["batch"].get_xdata()) == frame.step
    assert renderer.figure._suptitle.get_text().endswith(f"step {frame.step}  ·  epoch 0")
    assert small_multiples(record).axes


def test_a_run_with_a_stats_probe_exports_and_draws_it_over_training(tmp_path, capsys):
    from probescope import StatsProbe
    from probescope.cli import main
    from probescope.figures import stats_figure
    from tests.test_stats_probe import _two_state_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    probes = [StatsProbe("0", spectral=False, states=_two_state_model(), schedule=Schedule.every(1))]
    x, y = torch.linspace(-1, 1, 50)[:, None], torch.linspace(-1, 1, 50)
    probes.append(CurveProbe(x, y, schedule=Schedule.every(2)))
    with Monitor(model, probes, snapshot="sync", run_dir=tmp_path / "run", ring_capacity=16) as monitor:
        for step in range(1, 11):
            with torch.no_grad():
                model[0].weight.fill_(step)
            monitor.step(loss=torch.tensor(1.0 / step))
    run = open_run(tmp_path / "run")
    files = export_run(run, tmp_path / "out", ["gif"])
    assert list(files) == ["curve"]  # the stats probe has no frame-by-frame picture to animate
    with pytest.raises(ValueError, match=r"probes \['stats'\] have no frame-by-frame picture"):
        export_run(run, tmp_path / "out", ["gif"], probes=["stats"])
    written = export_final_pictures(run, tmp_path / "final")
    assert tmp_path / "final" / "stats_final.png" in written
    figure = stats_figure(run.probe("stats"))
    top, bottom = figure.axes[:2]
    np.testing.assert_allclose(top.lines[0].get_ydata()[1:], np.arange(1.0, 11.0))  # |w| = step
    assert top.get_ylabel() == "weight norms"  # (of weights alone; "norms" with gradients or outputs)
    assert [line.get_label() for line in bottom.lines] == ["loss/train_loss"]
    shaded = list(top.patches)  # one span per run of equal state: 0 until step 5, then 1
    assert len(shaded) == 2 and "latent states shaded" in figure.texts[0].get_text()
    assert main(["export", str(tmp_path / "run"), "--format", "png", "--final-pictures", "--quiet",
                 "--out", str(tmp_path / "cli")]) == 0  # fmt: skip
    assert (tmp_path / "cli" / "stats_final.png").exists()


def test_loss_figures_mark_the_step_where_the_loss_turned_nan(tmp_path):
    from probescope import LossProbe
    from probescope.figures import metrics_figure, plot_frame

    model = nn.Linear(2, 2)
    with Monitor(model, [LossProbe(schedule=Schedule.never())], snapshot="sync", run_dir=tmp_path) as monitor:
        for step in range(1, 21):
            monitor.step(loss=torch.tensor(10.0 / step if step < 12 else float("nan")))
    record = open_run(tmp_path).probe("loss")

    def marks(ax):
        red = [line for line in ax.lines if line.get_color() == "tab:red"]
        return [(line.get_label(), list(line.get_xdata())) for line in red]

    frame = plot_frame(record)
    assert marks(frame.axes[0]) == [("train_loss nan at step 12", [12, 12])]
    assert "train_loss nan at step 12" in [t.get_text() for t in frame.axes[0].get_legend().get_texts()]
    losses, final = [ax for ax in metrics_figure(record, perc=0.25).axes if ax.get_visible()][:2]
    assert marks(losses) == [("train_loss nan at step 12", [12, 12])]
    assert marks(final) == []  # the last quarter starts after it: no line that says another step


def test_metrics_figure_draws_losses_their_last_part_and_a_panel_per_metric(tmp_path):
    from probescope import LossProbe
    from probescope.figures import metrics_figure

    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    with Monitor(model, [LossProbe(schedule=Schedule.never())], snapshot="sync", run_dir=tmp_path) as monitor:
        for step in range(1, 21):
            monitor.step(loss=torch.tensor(10.0 / step))
            if step % 5 == 0:
                accuracy = {"train_accuracy": step / 40, "valid_accuracy": step / 20}
                monitor.log(valid_loss=20.0 / step, lr=0.1, **accuracy)
                monitor.end_epoch()
    record = open_run(tmp_path).probe("loss")
    figure = metrics_figure(record, perc=0.25)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["losses", "final losses", "accuracy"]
    losses, final, accuracy = visible
    lines = {line.get_label(): line for line in losses.lines}
    assert sorted(lines) == ["train_loss", "train_loss_epoch", "valid_loss"]
    np.testing.assert_allclose(lines["train_loss"].get_ydata(), 10.0 / np.arange(1, 21))
    final_steps = {line.get_label(): line.get_xdata() for line in final.lines}
    assert all(min(steps) >= 20 - 0.25 * 19 for steps in final_steps.values())  # the last quarter
    assert list(final_steps["train_loss"]) == [16, 17, 18, 19, 20]  # from 20 - 0.25 * (20 - 1)
    accuracy_lines = {line.get_label(): line.get_ydata() for line in accuracy.lines}
    np.testing.assert_allclose(accuracy_lines["valid_accuracy"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(accuracy_lines["train_accuracy"], [0.125, 0.25, 0.375, 0.5])
    assert tmp_path / "exports" / "loss_metrics.png" in export_final_pictures(
        open_run(tmp_path), tmp_path / "exports"
    )
    with pytest.raises(ValueError, match="perc must be in"):
        metrics_figure(record, perc=0)


def test_a_value_maps_in_between_frames_are_blended_values_coloured_over_its_range(tmp_path):
    """Geometric blending does not normalise a regression's outputs (they are no probabilities)
    and blends linearly where they change sign; the in-between frames are coloured over the
    map's fixed range."""
    from probescope import GridProbe
    from probescope.export import _blend
    from probescope.kernels import probs_to_rgba_reference

    x = torch.rand(40, 2) * 2 - 1
    y = 3 * x[:, 0] - x[:, 1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    probe = GridProbe(x, y, mode="value", class_index=1, resolution=(6, 5), schedule=Schedule.every(1))
    with Monitor(model, [probe], run_dir=tmp_path / "run") as monitor:
        regression_steps(monitor, model, x, y, 2, output=1, lr=0.5)
    record = open_run(tmp_path / "run").probe(probe.name)
    a, b = (record.frame(i).data for i in (0, 1))
    items = list(timeline(record, interpolate=1, method="geometric"))
    middle = items[1][0]["probs"]
    assert np.any(a["probs"] < 0)  # mixed signs: linear
    np.testing.assert_allclose(middle, (a["probs"] + b["probs"]) / 2, rtol=1e-6, atol=1e-6)
    palette, value_range = torch.zeros(2, 3, dtype=torch.uint8), tuple(record.config["value_range"])
    expected = probs_to_rgba_reference(torch.from_numpy(middle), "value", palette, 1, value_range).numpy()
    assert np.abs(items[1][0]["rgba"].astype(int) - expected.astype(int)).max() <= 1
    positive = {"probs": np.full((1, 1, 2), 4.0, np.float32)}, {"probs": np.full((1, 1, 2), 1.0, np.float32)}
    (half,) = _blend(record, *positive, 1, "geometric")
    np.testing.assert_allclose(half["probs"], 2.0, rtol=1e-6)  # sqrt(4 * 1), not normalised to 0.5


def test_class_names_name_the_figures_legends_and_ticks(tmp_path):
    """The map's legend, the predictions' class ticks (and colours, from a palette) and the confusion
    matrix's ticks name the classes."""
    from probescope import GridProbe, PredictionProbe
    from probescope.figures import confusion_figure

    x = torch.randn(90, 2)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    names = ["low", "middle", "high"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    probes = [GridProbe(x, y, resolution=8, class_names=names),
              PredictionProbe(x, y, class_names=names, palette=["black", "gray", "red"],
                              schedule=Schedule.every(1))]  # fmt: skip
    with Monitor(model, probes, run_dir=tmp_path / "run") as monitor:
        monitor.step()
    run = open_run(tmp_path / "run")
    grid = FrameRenderer(run.probe("grid"))
    assert [t.get_text() for t in grid.figure.axes[0].get_legend().get_texts()] == names
    prediction = FrameRenderer(run.probe("prediction"))
    assert [t.get_text() for t in prediction.figure.axes[0].get_xticklabels()] == names
    faces = prediction.panel.points.get_facecolors()[:, :3]  # each sample in its class's colour
    palette = np.array([[0, 0, 0], [128, 128, 128], [255, 0, 0]]) / 255.0
    np.testing.assert_allclose(
        faces, palette[run.probe("prediction").static["y_true"].astype(int)], atol=0.003
    )
    matrix = confusion_figure(run.probe("prediction")).axes[0]
    assert [t.get_text() for t in matrix.get_xticklabels()] == names
    assert [t.get_text() for t in matrix.get_yticklabels()] == names


def test_a_curve_along_a_line_labels_its_axis_with_the_position(tmp_path):
    x = torch.randn(80, 3)
    probe = CurveProbe(x, x.sum(1), schedule=Schedule.every(1))
    with Monitor(
        nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), [probe], run_dir=tmp_path / "r"
    ) as m:
        m.step()
    renderer = FrameRenderer(open_run(tmp_path / "r").probe(probe.name))
    assert renderer.figure.axes[0].get_xlabel() == "t (along the line)"
