"""The main job end to end: the demo command, then info and export on its run."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

from probescope import open_run
from probescope.cli import main
from probescope.kernels import default_palette


@pytest.fixture(scope="module")
def blobs7_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "blobs7"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    return out


def _independent_model(meta: dict) -> nn.Module:
    spec = meta["metadata"]["demo"]
    assert spec["activation"] == "relu"
    widths = spec["widths"]
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def test_demo_reaches_95_percent_and_prints_a_summary(blobs7_run, capsys):
    run = open_run(blobs7_run)
    accuracy = run.probe("prediction").frame(-1).data["accuracy"]
    assert float(accuracy) >= 0.95
    assert run.meta["status"] == "finished"


def test_the_demos_report_puts_its_slowdown_beside_the_step_time_it_comes_from(tmp_path):
    from probescope.demo import DemoResult

    probes = {"grid": {"frames": 26, "mean_ms": 6.5, "skipped": 3, "failed": 0}}
    accuracy = {"valid_accuracy": 0.98}
    result = DemoResult(
        "blobs7", tmp_path, 20, 880, accuracy, 0.66, 0.44, 0.01, probes, [tmp_path / "grid.mp4"]
    )
    lines = result.report().splitlines()
    assert lines[5] == (
        "  training loop: 0.66 s with probes, 0.44 s without (1.50x); final frames and flush 0.01 s"
    )
    assert lines[6].startswith("    (steps of 0.50 ms, mostly Python") and "Schedule.budget(0.05)" in lines[6]
    text = DemoResult("blobs7", tmp_path, 20, 880, accuracy, 0.66, None, 0.0, probes).report()
    assert "steps of" not in text and "training loop: 0.66 s with probes" in text


def test_demo_leaves_an_mp4_and_a_gif_whose_frames_change(blobs7_run):
    for name in ("grid.mp4", "grid.gif"):
        frames = list(iio.imiter(blobs7_run / name))
        assert len(frames) > 10
        first, last = frames[0].astype(int), frames[-1].astype(int)
        assert np.abs(first - last).mean() > 5, f"{name}: the map does not change over training"


def test_last_map_matches_an_independent_evaluation_of_model_pt(blobs7_run):
    run = open_run(blobs7_run)
    model = _independent_model(run.meta)
    model.load_state_dict(torch.load(blobs7_run / "model.pt", weights_only=True))
    config = run.probe("grid").config
    u0, u1, v0, v1 = config["domain"]
    w, h = config["resolution"]
    us = u0 + (np.arange(w) + 0.5) * (u1 - u0) / w
    vs = v1 - (np.arange(h) + 0.5) * (v1 - v0) / h  # row 0 at the top
    points = np.stack(np.meshgrid(us, vs), -1).reshape(-1, 2).astype(np.float32)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(points)), 1).numpy().reshape(h, w, -1)
    last = run.probe("grid").frame(-1)
    np.testing.assert_allclose(last.data["probs"], probs, rtol=1e-4, atol=1e-5)
    # The map image is that probability map in region colours: argmax class, shaded by confidence.
    png = iio.imread(blobs7_run / "grid_final_map.png")
    palette = default_palette(probs.shape[-1]).numpy().astype(np.float64)
    chance = 1 / probs.shape[-1]
    shade = np.clip((probs.max(-1) - chance) / (1 - chance), 0, 1)
    expected = np.floor(255 + (palette[probs.argmax(-1)] - 255) * shade[..., None] + 0.5)
    assert png.shape == (h, w, 4)
    assert np.abs(png[..., :3] - expected).max() <= 1


def test_demo_keeps_the_weights_of_its_best_valid_accuracy(blobs7_run):
    from probescope.datasets import make_dataset

    run = open_run(blobs7_run)
    index = json.loads((blobs7_run / "checkpoints" / "checkpoints.json").read_text())
    logged = run.probe("loss").frame(-1).data  # the accuracies the loop logged, per epoch
    accuracies = logged["series/valid_accuracy/values"]
    assert index["best"]["value"] == pytest.approx(float(accuracies.max()))
    step = int(logged["series/valid_accuracy/steps"][int(np.argmax(accuracies))])
    assert index["best"]["step"] == step
    model = _independent_model(run.meta)
    model.load_state_dict(torch.load(blobs7_run / "checkpoints" / "model.pt", weights_only=True))
    data = make_dataset("blobs7", seed=run.meta["metadata"]["demo"]["seed"])
    with torch.no_grad():
        accuracy = (model(data.x_valid).argmax(1) == data.y_valid).float().mean()
    assert float(accuracy) == pytest.approx(index["best"]["value"])


def test_demo_draws_its_layers_distributions_over_training(blobs7_run):
    """A HistogramProbe on the Linear layers, a frame with every epoch's others (no snapshot of
    its own), drawn whole in histograms_final.png."""
    record = open_run(blobs7_run).probe("histograms")
    names = [str(n) for n in record.static["names"]]
    layers = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
    assert names == [
        *(f"weight/{p}" for p in layers),
        *(f"grad/{p}" for p in layers),
        "act/0",
        "act/2",
        "act/4",
    ]
    assert record.steps() == open_run(blobs7_run).probe("prediction").steps()  # every epoch's end
    last = record.frame(-1).data
    assert last["counts"][names.index("act/4")].sum() == 512 * 7  # the valid batch's outputs
    assert iio.imread(blobs7_run / "histograms_final.png").shape[-1] in (3, 4)


def test_info_describes_the_run(blobs7_run, capsys):
    assert main(["info", str(blobs7_run)]) == 0
    text = capsys.readouterr().out
    assert "finished" in text and "grid" in text and "frames" in text
    assert "snapshot  copy: " in text and "in the model's device" in text  # what the copy holds
    history = open_run(blobs7_run).history()
    assert f"history   history.npz: {', '.join(history)} (up to " in text and "train_loss" in history
    run = open_run(blobs7_run)
    grid = run.probe("grid")
    held = run.meta["summary"]["probes"]["grid"]["ring_bytes"]
    frame_bytes = sum(np.asarray(a).nbytes for a in grid.frame(-1).data.values())
    assert held == {"host": min(len(grid), 8) * frame_bytes, "device": 0}  # its 8 slots, full
    assert f"0 failed, ring {held['host'] / 2**20:.1f} MiB\n" in text
    assert main(["info", str(blobs7_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "probescope-run"


def test_export_command_writes_each_format(blobs7_run, tmp_path, capsys):
    code = main(
        [
            "export",
            str(blobs7_run),
            "--format",
            "gif,png",
            "--probe",
            "loss",
            "--out",
            str(tmp_path),
            "--interpolate",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    n = len(open_run(blobs7_run).probe("loss"))
    assert len(list(iio.imiter(tmp_path / "loss.gif"))) == 2 * n - 1
    assert len(list((tmp_path / "loss").glob("*.png"))) == 2 * n - 1


def test_a_run_with_nothing_to_draw_says_so_instead_of_writing_nothing(tmp_path, capsys):
    """Statistics are drawn over training as a whole, not frame by frame: export says which
    probes the run has; their numbers still export to TensorBoard. A probe of the user's own
    kind is drawn from its frames (probescope.probes.views): exported and viewed."""
    from probescope import Monitor, Probe, StatsProbe

    class Norm(Probe):
        kind = "norm"

        def evaluate(self, model, context):
            return {"norm": torch.cat([p.reshape(-1) for p in model.parameters()]).norm()}

    for name, probe in (("stats", StatsProbe(spectral=False)), ("norm", Norm(schedule=None))):
        with Monitor(nn.Linear(2, 2), probe, run_dir=tmp_path / name) as monitor:
            for _ in range(3):
                monitor.step()
    assert main(["export", str(tmp_path / "stats"), "--format", "png", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nothing to draw as png" in err and "stats (stats, " in err and "--format tensorboard" in err
    assert not (tmp_path / "stats" / "exports").exists()
    assert main(["export", str(tmp_path / "stats"), "--format", "tensorboard", "--quiet"]) == 0
    assert main(["export", str(tmp_path / "norm"), "--format", "png", "--quiet"]) == 0
    assert len(list((tmp_path / "norm" / "exports" / "norm").glob("*.png"))) == len(
        open_run(tmp_path / "norm").probe("norm")
    )
    assert main(["view", str(tmp_path / "norm"), "--offscreen"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "norm")]) == 0
    lines = capsys.readouterr().out.splitlines()
    where = next(i for i, line in enumerate(lines) if line.strip().startswith("norm "))
    assert lines[where + 1].strip() == 'schedule {"kind": "every", "n": 10}'  # no empty config line


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "not a probescope run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--format", "avi"])


def test_wave_demo_leaves_the_curve_animation(tmp_path):
    out = tmp_path / "wave"
    assert (
        main(["demo", "--dataset", "wave", "--out", str(out), "--epochs", "6", "--no-baseline", "--quiet"])
        == 0
    )
    run = open_run(out)
    assert run.probe("curve").kind == "curve" and len(run.probe("curve")) > 5
    frames = list(iio.imiter(out / "curve.mp4"))
    assert len(frames) > 10 and np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1
    assert (out / "curve_final.png").exists()


def test_info_shows_a_shared_budget_and_what_each_probe_learned(tmp_path, capsys):
    import torch

    from probescope import LossProbe, Monitor, StatsProbe

    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), 0.1)
    x, y = torch.randn(64, 2), torch.randint(0, 3, (64,))
    probes = [LossProbe(), StatsProbe(spectral=False)]
    with Monitor(model, probes, optimizer=opt, run_dir=tmp_path / "run", budget=0.05) as monitor:
        for _ in range(40):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss=loss)
    assert main(["info", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "budget    0.05 of training time, shared by 2 probe(s)" in text
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("budget 0.025: every ")]
    assert len(lines) == 2  # one per probe: its half of the budget, what it measured
    assert all("a frame costs training" in line and "ms a step" in line for line in lines)


def test_export_of_the_final_pictures_alone_needs_no_format(blobs7_run, tmp_path, capsys):
    assert main(["export", str(blobs7_run), "--final-pictures", "--out", str(tmp_path), "--quiet"]) == 0
    names = {p.name for p in tmp_path.rglob("*.png")}
    assert {"loss_metrics.png", "prediction_confusion.png"} <= names
    assert not list(tmp_path.rglob("*.gif")) and not list(tmp_path.rglob("*.mp4"))
    assert main(["export", str(blobs7_run), "--out", str(tmp_path / "none")]) == 2
    assert "nothing to export: give --format" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_info_shortens_a_long_list_of_a_probes_config_and_json_keeps_it_whole(tmp_path, capsys):
    from probescope import Monitor, StatsProbe

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])  # 16 parameters
    with Monitor(model, [StatsProbe(schedule=None)], run_dir=tmp_path / "run") as monitor:
        monitor.step()
    assert main(["info", str(tmp_path / "run")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if '"parameters"' in line)
    config = json.loads(line.strip())
    assert config["parameters"] == ["0.weight", "0.bias", "1.weight", "1.bias", "... 16 in all"]
    assert config["hooks"] == ["*"]  # a short list as it is
    assert main(["info", str(tmp_path / "run"), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert len(meta["probes"]["stats"]["config"]["parameters"]) == 16


def test_peaks_demo_maps_the_regressions_values_and_learns_the_surface(tmp_path):
    """The 2-D regression demo: a value map over the targets' range (symmetric about 0), whose
    last frame is near the noiseless surface (R² against it), and a video of it."""
    import torch

    from probescope.datasets import make_dataset, peaks_surface

    data = make_dataset("peaks")
    assert (data.task, data.input_dim, data.output_dim) == ("regression", 2, 1)
    out = tmp_path / "peaks"
    assert (
        main(["demo", "--dataset", "peaks", "--out", str(out), "--epochs", "8", "--no-baseline", "--quiet"])
        == 0
    )
    grid = open_run(out).probe("grid")
    extent = float(data.y_train.abs().max())
    assert grid.config["mode"] == "value" and grid.config["value_range"] == pytest.approx([-extent, extent])
    assert "points_value" in grid.static and "neurons" in open_run(out).probes
    last = grid.frame(len(grid) - 1).data["probs"][..., 0]
    us, vs = grid.static["us"], grid.static["vs"]
    points = torch.tensor(np.stack(np.meshgrid(us, vs), -1).reshape(-1, 2), dtype=torch.float32)
    inside = (points.abs() <= 3).all(1)  # the data's square (the map's margin is extrapolation)
    surface = peaks_surface(points[inside])
    residual = last.reshape(-1)[inside.numpy()] - surface.numpy()
    r2 = 1 - residual.var() / surface.numpy().var()
    assert r2 > 0.9, r2  # (the first frame's: about 0)
    assert len(list(iio.imiter(out / "grid.mp4"))) > 10
