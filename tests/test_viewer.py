"""The OpenGL viewer, rendered offscreen through EGL (Mesa's llvmpipe on a CPU machine).

Each panel's pixels are checked against the frame data at points mapped through the panel's
own transform; replay visits every recorded step; a closed viewer never stops training.
"""

import itertools
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from probescope import CurveProbe, GridProbe, Monitor, Schedule, open_run
from probescope.ring import Frame
from tests.conftest import fit_curve, record_blobs_run, train_steps

viewer_module = pytest.importorskip("probescope.viewers.viewer")
from probescope.viewers.backend import ViewerUnavailable, use_backend  # noqa: E402
from probescope.viewers.panels import BAND, DIVERGED, GREY, PanelSpec  # noqa: E402

try:
    use_backend(offscreen=True)
except ViewerUnavailable as err:  # .ci/run installs Mesa's EGL, so CI always runs these
    pytest.skip(f"no EGL: {err}", allow_module_level=True)

Viewer, RunSource = viewer_module.Viewer, viewer_module.RunSource


class FrameSource:
    """A viewer source that hands out frames set by the test."""

    def __init__(self, *specs):
        self.specs = list(specs)
        self.frames: dict[str, Frame] = {}
        self.out_dir = None

    def show(self, name, data, step, epoch=0):
        seq = self.frames[name].seq + 1 if name in self.frames else 0
        self.frames[name] = Frame(name, seq, step, epoch, 0.0, data)

    def latest(self, name):
        return self.frames.get(name)

    def upload_path(self):
        return "host"


def pixel(image, panel, x, y):
    """The rendered RGB at data point (x, y) of ``panel``."""
    cx, cy = panel.data_to_canvas(x, y)
    return image[int(cy), int(cx), :3].astype(int)


def distance_near(image, panel, x, y, colour, radius=1):
    """The smallest colour distance to ``colour`` within ``radius`` pixels of data point (x, y)."""
    cx, cy = (int(v) for v in panel.data_to_canvas(x, y))
    patch = image[cy - radius : cy + radius + 1, cx - radius : cx + radius + 1, :3].astype(float)
    return float(np.abs(patch - np.asarray(colour, float)).max(-1).min())


@pytest.fixture(scope="module")
def trained_map():
    from probescope.datasets import make_dataset

    data = make_dataset("blobs7", seed=1, n=400)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 7))
    probe = GridProbe(
        data.x_train, data.y_train, resolution=(37, 23), points=False, schedule=Schedule.every(10)
    )
    with Monitor(model, [probe]) as monitor:
        train_steps(monitor, model, data.x_train, data.y_train, 30)
    return PanelSpec.of_probe(probe), monitor.latest(probe.name)


def test_map_pixels_have_the_colour_of_their_grid_point(trained_map):
    spec, frame = trained_map
    source = FrameSource(spec)
    source.show(spec.name, frame.data, frame.step)
    viewer = Viewer(source, offscreen=True, size=(700, 520))
    assert viewer.refresh()
    image = viewer.render()
    panel = viewer.panels[spec.name]
    us, vs = spec.static["us"], spec.static["vs"]
    rgba, probs = frame.data["rgba"], frame.data["probs"]
    palette = spec.static["palette"].astype(int)
    rng = np.random.default_rng(0)
    for r, c in zip(rng.integers(0, len(vs), 40), rng.integers(0, len(us), 40), strict=True):
        got = pixel(image, panel, us[c], vs[r])
        np.testing.assert_allclose(got, rgba[r, c, :3], atol=2, err_msg=f"grid point ({r}, {c})")
    sure = np.argwhere(probs.max(-1) > 0.97)  # a sure point shows its class's colour itself
    assert len(sure) >= 5
    for r, c in sure[rng.choice(len(sure), 5, replace=False)]:
        got = pixel(image, panel, us[c], vs[r])
        assert np.abs(got - palette[probs[r, c].argmax()]).max() <= 12, f"grid point ({r}, {c})"
    viewer.close()


def test_caption_follows_the_frames_step(trained_map):
    spec, frame = trained_map
    source = FrameSource(spec)
    viewer = Viewer(source, offscreen=True, size=(600, 480))
    captions, images = [], []
    for step in (10, 20):
        source.show(spec.name, frame.data, step, epoch=step // 10)
        assert viewer.refresh()
        captions.append(viewer.panels[spec.name].caption.text)
        images.append(viewer.render())
    assert "step 10" in captions[0] and "epoch 1" in captions[0] and "step 20" in captions[1]
    top = slice(0, 40)  # the caption's band; the map itself is identical in both frames
    assert np.any(images[0][top] != images[1][top])
    assert not viewer.refresh()  # nothing new: nothing redrawn
    viewer.close()


def test_curve_panel_draws_the_curve_and_its_loss_band():
    x = np.linspace(-2.0, 2.0, 41).astype(np.float32)
    spec = PanelSpec(
        "curve",
        "curve",
        {},
        {"x": x, "scatter_x": np.array([-2.0, 2.0]), "scatter_y": np.array([-3.0, 3.0])},
    )
    y = np.sin(x)
    source = FrameSource(spec)
    source.show("curve", {"y_pred": y, "band_lower": y - 0.6, "band_upper": y + 0.6}, 5)
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    viewer.refresh()
    image = viewer.render()
    panel = viewer.panels["curve"]
    line = np.array(BAND) * 255
    band = 0.25 * line + 0.75 * 255  # the band: 25 % of the curve's colour over white
    for i in (8, 20, 31):
        xm, ym = (x[i] + x[i + 1]) / 2, (y[i] + y[i + 1]) / 2  # on the polyline, between vertices
        assert distance_near(image, panel, xm, ym, line) <= 40, f"curve at x={xm}"
        assert np.abs(pixel(image, panel, x[i], y[i] + 0.35) - band).max() <= 12, f"band at x={x[i]}"
        assert np.all(pixel(image, panel, x[i], y[i] + 1.2) >= 250), f"outside the band at x={x[i]}"
    viewer.close()


def _render_one(spec: PanelSpec, data: dict, step: int):
    """An offscreen viewer of ``spec``'s one panel showing ``data``: (viewer, image, panel)."""
    source = FrameSource(spec)
    source.show(spec.name, data, step)
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    viewer.refresh()
    return viewer, viewer.render(), viewer.panels[spec.name]


def test_prediction_markers_sit_at_each_sample_in_its_class_colour():
    from probescope.kernels import default_palette

    y_true = np.array([0, 1, 2, 0, 1, 2], np.int64)
    jitter = np.zeros(6, np.float32)
    spec = PanelSpec(
        "pred", "prediction", {"task": "multiclass", "num_classes": 3}, {"y_true": y_true, "jitter": jitter}
    )
    prob_true = np.array([0.9, 0.2, 0.6, 0.1, 0.95, 0.4], np.float32)
    data = {"prob_true": prob_true, "class_mean": np.zeros(3), "accuracy": np.float64(0.5)}
    viewer, image, panel = _render_one(spec, data, 3)
    palette = default_palette(3).numpy().astype(float)
    for cls, p in zip(y_true, prob_true, strict=True):
        expected = 0.6 * palette[cls] + 0.4 * 255  # markers at 60 % opacity over white
        assert np.abs(pixel(image, panel, cls, p) - expected).max() <= 14, f"class {cls} at {p}"
    assert np.all(pixel(image, panel, 1.0, 0.55) >= 250)  # no marker there
    assert "accuracy 0.500" in panel.caption.text
    viewer.close()


def test_label_markers_sit_at_each_labels_true_state_paled_where_absent():
    from probescope.kernels import default_palette

    y_true = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]], np.float64)
    jitter = np.zeros(4, np.float32)
    config = {"task": "multilabel", "num_classes": 3, "outputs": 3, "threshold": 0.5}
    spec = PanelSpec("labels", "prediction", config, {"y_true": y_true, "jitter": jitter})
    prob_true = np.array([[0.9, 0.15, 0.3], [0.7, 0.35, 0.5], [0.5, 0.55, 0.7], [0.3, 0.75, 0.9]])
    counts = np.array([[[2, 0], [0, 2]], [[1, 1], [1, 1]], [[1, 0], [1, 2]]])  # each label's 2x2
    data = {"prob_true": prob_true, "class_mean": prob_true.mean(0), "accuracy": np.float64(0.75),
            "exact_match": np.float64(0.25), "f1": np.float64(0.8), "label_confusion": counts}  # fmt: skip
    viewer, image, panel = _render_one(spec, data, 3)
    palette = default_palette(3).numpy().astype(float)
    for (i, j), p in np.ndenumerate(prob_true):
        colour = palette[j] if y_true[i, j] else 0.5 * palette[j] + 0.5 * 255  # absent: paled
        expected = 0.6 * colour + 0.4 * 255  # markers at 60 % opacity over white
        assert np.abs(pixel(image, panel, j, p) - expected).max() <= 14, f"sample {i}, label {j}"
    assert np.all(pixel(image, panel, 1.0, 0.95) >= 250)  # no marker there
    assert "accuracy 0.750  exact 0.250  F1 0.800" in panel.caption.text
    viewer._on_mouse(_Pointer(panel.data_to_canvas(2.1, 0.6)))
    assert "label 2: 3 of 4 right; present in 3, 1 missed; 0 marked where absent" in panel.caption.text
    assert viewer.toggle_confusion() == []  # each label has its own 2x2: the pointer reads it
    viewer.close()


def test_regression_markers_of_each_output_in_its_colour():
    from probescope.kernels import default_palette

    y_true = np.array([[-1.0, 1.0], [0.0, -0.5], [1.0, 0.5]])
    y_pred = np.array([[-0.8, 0.6], [0.3, -0.9], [0.7, 0.2]])
    config = {"task": "regression", "num_classes": None, "outputs": 2}
    spec = PanelSpec("fit", "prediction", config, {"y_true": y_true, "jitter": np.zeros(3)})
    data = {"y_pred": y_pred, "mse": np.float64(0.1), "r2": np.float64(0.8)}
    viewer, image, panel = _render_one(spec, data, 2)
    palette = default_palette(2).numpy().astype(float)
    for (i, j), truth in np.ndenumerate(y_true):
        expected = 0.6 * palette[j] + 0.4 * 255
        assert np.abs(pixel(image, panel, truth, y_pred[i, j]) - expected).max() <= 14, (
            f"sample {i}, output {j}"
        )
    assert list(panel.legend.text.text) == ["output 0", "output 1"]
    viewer.close()


def test_loss_panel_plots_log10_loss_over_steps():
    steps = np.arange(1, 51, dtype=np.float64)
    loss = 2.0 * np.exp(-steps / 15.0)
    spec = PanelSpec("loss", "loss", {}, {})
    source = FrameSource(spec)
    source.show("loss", {"series/train_loss/steps": steps, "series/train_loss/values": loss}, 50)
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    viewer.refresh()
    image = viewer.render()
    panel = viewer.panels["loss"]
    for i in (5, 25, 45):
        grey = np.array(GREY[:3]) * 255
        # an antialiased 2-px line: well away from white (140 from the line's grey)
        near = distance_near(image, panel, steps[i], np.log10(loss[i]), grey)
        assert near <= 100, f"loss at step {steps[i]}"
        assert np.all(pixel(image, panel, steps[i], np.log10(loss[i]) + 0.3) >= 250)
    viewer.close()


def test_a_new_frame_does_not_build_a_line_shader_again(monkeypatch):
    # A line's pixel transform is updated in place: a new transform object each frame made
    # vispy build the line's shader program again at every draw (7 ms a frame on llvmpipe).
    from vispy.visuals.shaders import program as shader_program

    steps = np.arange(1, 51, dtype=np.float64)
    source = FrameSource(PanelSpec("loss", "loss", {}, {}))
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    builds = []
    real_build = shader_program.ModularProgram._build
    for i, scale in enumerate((2.0, 3.0, 5.0, 9.0)):  # each frame rescales the axes
        data = {"series/train_loss/steps": steps, "series/train_loss/values": scale / steps}
        # and has an epoch mean of one point so far, as a LossProbe's frames in a first epoch
        data |= {"series/train_loss_epoch/steps": steps[-1:], "series/train_loss_epoch/values": [0.1]}
        source.show("loss", data, 50)
        viewer.refresh()
        viewer.render()
        if i == 0:  # the first frame builds every program; count the builds after it
            counted = lambda program: builds.append(program) or real_build(program)  # noqa: E731
            monkeypatch.setattr(shader_program.ModularProgram, "_build", counted)
    viewer.close()
    assert builds == []


def test_loss_panel_marks_and_names_the_step_where_a_series_turned_nan():
    steps = np.arange(1, 41, dtype=np.float64)
    loss = 2.0 * np.exp(-steps / 15.0)
    loss[24:] = np.nan  # the run blew up at step 25
    valid = np.array([1.5, 1.0, np.inf])
    spec = PanelSpec("loss", "loss", {}, {})
    source = FrameSource(spec)
    data = {"series/train_loss/steps": steps, "series/train_loss/values": loss,
            "series/valid_loss/steps": np.array([10.0, 20.0, 30.0]),
            "series/valid_loss/values": valid}  # fmt: skip
    source.show("loss", data, 40)
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    viewer.refresh()
    image = viewer.render()
    panel = viewer.panels["loss"]
    assert panel.caption.text.endswith("train_loss nan at step 25")
    red = np.array(DIVERGED[:3]) * 255
    for y in np.log10([0.6, 1.0, 1.4]):  # the line runs the panel's height at step 25
        assert distance_near(image, panel, 25.0, y, red) <= 60
        assert distance_near(image, panel, 21.0, y, red) > 100
    source.show("loss", {"series/train_loss/steps": steps[:20], "series/train_loss/values": loss[:20]}, 20)
    viewer.refresh()  # a replay back before it: no line, no words
    assert "nan" not in panel.caption.text and not panel.diverged.visible
    viewer.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    return record_blobs_run(path, grid_every=3, other_every=5, steps=15, epoch_every=5)


def test_replay_visits_every_recorded_step(recorded):
    run = open_run(recorded)
    viewer = Viewer(RunSource(recorded), offscreen=True, size=(900, 400))
    expected = sorted({s for name in run.probes for s in run.probe(name).steps()})
    assert viewer.timeline == expected
    shown = {name: [] for name in viewer.panels}
    for i in range(len(viewer.timeline)):
        assert viewer.go_to(i) == expected[i]
        for name, panel in viewer.panels.items():
            if panel.step is not None and (not shown[name] or shown[name][-1] != panel.step):
                shown[name].append(panel.step)
    for name in viewer.panels:
        assert shown[name] == run.probe(name).steps(), name
    viewer.close()


def test_panels_keep_the_order_the_probes_were_given_in(recorded):
    assert list(open_run(recorded).probes) == ["grid", "prediction", "loss"]  # not alphabetical
    viewer = Viewer(RunSource(recorded), offscreen=True, size=(900, 400))
    assert list(viewer.panels) == ["grid", "prediction", "loss"]
    viewer.close()


def test_the_same_frames_draw_the_same_pixels_on_every_canvas(recorded):
    # The layout solver once chose among equally good layouts anew for each canvas: legends
    # and axes moved, so a replay, an export and the live view drew one frame differently.
    images = []
    for _ in range(6):
        viewer = Viewer(RunSource(recorded), offscreen=True)
        assert viewer.refresh()
        images.append(viewer.render())
        for name, panel in viewer.panels.items():  # legend entries start at the top of the view
            if panel.legend is not None:
                tops = panel.legend.positions()[:, 1]
                entries = 2 if name == "loss" else 7  # train_loss and its epoch means; 7 classes
                assert len(tops) == entries and tops[0] == panel.view.pos[1] + 0.5 * panel.legend.ROW
                assert np.allclose(np.diff(tops), panel.legend.ROW)
        viewer.close()
    for image in images[1:]:
        np.testing.assert_array_equal(image, images[0])


def test_closing_the_viewer_never_stops_training(mlp, blobs, caplog):
    probe = GridProbe(blobs.x_train, blobs.y_train, resolution=16, schedule=Schedule.every(2))
    monitor = Monitor(mlp, [probe], viewer="offscreen", viewer_fps=1000.0).start()
    assert monitor.viewer is not None
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 4)
    assert monitor.viewer.shown.get(probe.name) is not None  # it drew frames while training
    monitor.viewer.close()  # the user closes the window
    written = monitor.ring(probe.name).written
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 6)
    assert monitor.viewer is None and monitor.step_count == 10
    assert monitor.ring(probe.name).written > written  # probes went on
    monitor.close()


def test_gl_export_and_offscreen_view_command(recorded, tmp_path):
    from probescope.cli import main
    from probescope.export import export_probe

    run = open_run(recorded)
    files = export_probe(run.probe("grid"), tmp_path / "gl", ["png", "gif"], renderer="gl", size=(400, 300))
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) == len(run.probe("grid"))
    import imageio.v3 as iio

    assert iio.imread(pngs[0]).shape == (300, 400, 3)
    assert iio.imread(tmp_path / "gl" / "grid.gif", index=None).shape[0] == len(pngs)
    out = tmp_path / "view.png"
    assert main(["view", str(recorded), "--offscreen", "--step", "6", "--out", str(out)]) == 0
    assert iio.imread(out).shape[2] in (3, 4)


def test_no_display_gives_a_clear_message_and_training_goes_on(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    code = (
        "import logging, torch\n"
        "from torch import nn\n"
        "from probescope import Monitor, LossProbe\n"
        "from probescope.viewers.backend import use_backend, ViewerUnavailable\n"
        "try:\n"
        "    use_backend(offscreen=False)\n"
        "except ViewerUnavailable as err:\n"
        "    print('MESSAGE', err)\n"
        "logging.basicConfig()\n"
        "model = nn.Linear(2, 2)\n"
        "with Monitor(model, [LossProbe()], viewer=True) as m:\n"
        "    for _ in range(3):\n"
        "        m.step(loss=model(torch.ones(1, 2)).sum())\n"
        "print('STEPS', m.step_count)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "MESSAGE no display here" in done.stdout and "--follow" in done.stdout
    assert "STEPS 3" in done.stdout
    assert "the viewer could not open (ViewerUnavailable: no display here" in done.stderr


# A training script as users write them: no ``if __name__ == "__main__":`` guard.
WINDOW_SCRIPT = """
import json, time, torch
from torch import nn
from probescope import GridProbe, LossProbe, Monitor, PredictionProbe, Probe, Schedule
from probescope.datasets import make_dataset
print("TOP")
class Margins(Probe):  # a probe of the user's own kind: a histogram and a number
    kind = "margins"
    def evaluate(self, model, context):
        logits = model(data.x_valid)
        top2 = logits.topk(2, dim=1).values
        return {"margins": top2[:, 0] - top2[:, 1], "mean": top2.mean()}
data = make_dataset("blobs7", seed=3, n=700)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 7))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
probes = [GridProbe(data.x_train, data.y_train, resolution=48, schedule=Schedule.every(3)),
          PredictionProbe(data.x_valid, data.y_valid, schedule=Schedule.every(3)),
          LossProbe(schedule=Schedule.every(3)), Margins(schedule=Schedule.every(3))]
with Monitor(model, probes, optimizer=opt, viewer=True) as monitor:
    view = monitor.viewer
    for step in range(STEPS):
        i = (step * 50) % 600
        loss = nn.functional.cross_entropy(model(data.x_train[i : i + 50]), data.y_train[i : i + 50])
        opt.zero_grad(); loss.backward(); opt.step()
        monitor.step(loss=loss)
        time.sleep(0.01)
        if step == CLOSE_AT:
            view._renderer.process.terminate()  # as closing the window ends its process
            time.sleep(1.0)
    newest = {name: monitor.latest(name).seq for name in monitor.probes}
print("RESULT", json.dumps({"view": type(view).__name__, "backend": view.backend, "sent": view.shown,
    "window_shown": view.window_shown, "newest": newest, "steps": monitor.step_count,
    "after": type(monitor.viewer).__name__}))
"""


def window_run(tmp_path, steps: int, close_at: int = -1) -> tuple[dict, str]:
    """WINDOW_SCRIPT run as a file under a virtual X display; (its RESULT, its log)."""
    import json
    import shutil

    if shutil.which("xvfb-run") is None:
        pytest.skip("needs xvfb-run (Debian: xvfb xauth); .ci/run installs it")
    pytest.importorskip("glfw")
    script = tmp_path / "train.py"
    script.write_text(WINDOW_SCRIPT.replace("STEPS", str(steps)).replace("CLOSE_AT", str(close_at)))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    done = subprocess.run(["xvfb-run", "-a", sys.executable, str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), done.stdout + done.stderr


def test_the_window_draws_in_a_process_of_its_own(tmp_path):
    outcome, log = window_run(tmp_path, steps=60)
    assert log.count("TOP") == 1  # the script did not run again in the render process
    assert outcome["view"] == "WindowView" and outcome["backend"] in ("glfw", "pyqt6", "pyside6", "pyqt5")
    # The window got every probe's newest frame and said so when training ended.
    assert outcome["sent"] == outcome["newest"] == outcome["window_shown"]
    assert outcome["steps"] == 60 and outcome["after"] == "WindowView"
    assert "could not open" not in log and "Traceback" not in log


def test_a_window_closed_while_training_leaves_training_as_it_was(tmp_path):
    outcome, log = window_run(tmp_path, steps=40, close_at=10)
    assert outcome["steps"] == 40 and outcome["after"] == "NoneType"  # the Monitor let it go
    assert outcome["window_shown"] is None
    assert "Traceback" not in log


def test_curve_probe_run_replays_in_the_curve_panel(tmp_path):
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 200).unsqueeze(1)
    y = torch.sin(2 * x)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
    probe = CurveProbe(x, y, schedule=Schedule.every(5))
    with Monitor(model, [probe], run_dir=tmp_path / "run") as monitor:
        fit_curve(monitor, model, x, y, 10)
    viewer = Viewer(RunSource(tmp_path / "run"), offscreen=True, size=(500, 400))
    viewer.go_to(len(viewer.timeline) - 1)
    frame = open_run(tmp_path / "run").probe(probe.name).frame(-1)
    panel = viewer.panels[probe.name]
    np.testing.assert_allclose(panel.curve[:, 1], frame.data["y_pred"], rtol=1e-6)
    # the line's vertices are in pixels, its transform takes them back to the data
    np.testing.assert_allclose(
        panel.line.transform.map(panel.line.pos)[:, :2], panel.curve, rtol=1e-5, atol=1e-5
    )
    image = viewer.render()
    i = len(panel.x) // 2
    assert pixel(image, panel, panel.x[i], frame.data["y_pred"][i]).min() < 250  # the curve is drawn there
    viewer.close()


def test_the_map_texture_has_a_gl_name_for_cuda_registration(trained_map):
    from vispy.gloo import gl

    from probescope.viewers.interop import gl_texture_name

    spec, frame = trained_map
    source = FrameSource(spec)
    source.show(spec.name, frame.data, frame.step)
    viewer = Viewer(source, offscreen=True, size=(500, 400))
    viewer.refresh()
    viewer.render()  # creates the texture on the GL side
    panel = viewer.panels[spec.name]
    name = gl_texture_name(viewer.canvas, panel.image._texture)
    viewer.canvas.set_current()
    assert name > 0 and gl.glIsTexture(name)
    assert panel.image._texture._internalformat == "rgba8"  # a sized format CUDA can register
    viewer.close()


def test_device_frames_fall_back_to_host_upload_and_say_why(trained_map):
    spec, frame = trained_map
    viewer = Viewer(FrameSource(spec), offscreen=True, size=(600, 450))
    panel = viewer.panels[spec.name]
    rgba = torch.from_numpy(frame.data["rgba"].copy())
    rgba[..., :3] = 255 - rgba[..., :3]  # a frame the panel has not shown before
    panel.update_device(rgba, 7, 1)
    assert panel.upload_path == "host (frames are not on a CUDA device)"
    assert viewer.upload_paths() == {spec.name: panel.upload_path}
    image = viewer.render()
    us, vs = spec.static["us"], spec.static["vs"]
    for r, c in ((0, 0), (len(vs) // 2, len(us) // 3), (len(vs) - 1, len(us) - 1)):
        np.testing.assert_allclose(pixel(image, panel, us[c], vs[r]), rgba[r, c, :3].numpy(), atol=2)
    assert "step 7" in panel.caption.text
    viewer.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_frames_reach_the_texture_through_interop_or_say_why(trained_map):
    spec, frame = trained_map
    viewer = Viewer(FrameSource(spec), offscreen=True, size=(600, 450))
    panel = viewer.panels[spec.name]
    panel.update({"rgba": frame.data["rgba"]}, 1, 0)
    viewer.render()  # the texture exists: interop can register it
    rgba = torch.from_numpy(frame.data["rgba"].copy()).cuda()
    rgba[..., :3] = 255 - rgba[..., :3]
    panel.update_device(rgba, 2, 0)
    image = viewer.render()
    us, vs = spec.static["us"], spec.static["vs"]
    expected = rgba.cpu().numpy()
    for r, c in ((1, 1), (len(vs) // 2, len(us) // 2)):
        np.testing.assert_allclose(pixel(image, panel, us[c], vs[r]), expected[r, c, :3], atol=2)
    if os.environ.get("PROBESCOPE_EXPECT_INTEROP"):  # set where the GL context is on the GPU
        assert panel.upload_path == "cuda-gl interop", panel.upload_path
    else:
        assert panel.upload_path == "cuda-gl interop" or panel.upload_path.startswith("host (")
    viewer.close()


def test_follow_sees_a_run_grow_while_it_is_written(tmp_path, mlp, blobs):
    probe = GridProbe(blobs.x_train, blobs.y_train, resolution=16, schedule=Schedule.every(2))
    monitor = Monitor(mlp, [probe], run_dir=tmp_path / "live").start()
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 2)
    open_run(tmp_path / "live").wait_for_frames(10)
    viewer = Viewer(RunSource(tmp_path / "live", follow=True), offscreen=True, size=(400, 300))
    assert viewer.refresh()
    first = viewer.panels[probe.name].step
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 6)
    monitor.drain(10)
    deadline = time.time() + 10
    while viewer.panels[probe.name].step == first and time.time() < deadline:
        viewer.refresh()  # the recorder writes frames to disk on its own thread
        time.sleep(0.05)
    assert viewer.panels[probe.name].step > first
    monitor.close()
    viewer.close()


def test_follow_waits_for_a_run_that_has_not_started_yet(tmp_path, mlp, blobs, capsys):
    import threading

    import imageio.v3 as iio

    from probescope.cli import main

    run_dir = tmp_path / "later"
    probe = GridProbe(blobs.x_train, blobs.y_train, resolution=16, schedule=Schedule.every(1))

    def train_later():  # the training job starts after its viewer
        time.sleep(1.0)
        with Monitor(mlp, [probe], run_dir=run_dir) as monitor:
            train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 3)

    job = threading.Thread(target=train_later)
    job.start()
    out = tmp_path / "view.png"
    try:
        assert main(["view", str(run_dir), "--follow", "--offscreen", "--out", str(out)]) == 0
    finally:
        job.join()
    assert f"waiting for a run to start in {run_dir}" in capsys.readouterr().err
    assert iio.imread(out).shape[2] in (3, 4)


def test_follow_reads_past_a_frame_moved_aside_as_it_was_listed(recorded, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(recorded, run_dir)
    source = RunSource(run_dir, follow=True)
    record = source.run.probe("grid")
    listed, moved = record.refresh, []

    def then_superseded():  # a resumed run moves the newest frame aside right after a listing
        count = listed()
        if not moved:
            newest = record.paths[-1]
            (newest.parent.parent / "superseded").mkdir(exist_ok=True)
            moved.append(newest.rename(newest.parent.parent / "superseded" / newest.name))
        return count

    record.refresh = then_superseded
    steps = [frame.step for frame in record.frames()]
    frame = source.latest("grid")
    assert moved and frame is not None and frame.step == steps[-2]  # the newest still there


def test_keys_pause_save_record_step_and_quit(recorded, tmp_path):
    class Key:
        def __init__(self, name):
            self.key = type("K", (), {"name": name})()
            self.text = name

    viewer = Viewer(RunSource(recorded), offscreen=True, size=(640, 320))
    viewer.source.out_dir = tmp_path
    viewer.go_to(0)
    viewer._on_key(Key("Right"))
    assert viewer.position == 1
    viewer._on_key(Key("Left"))
    assert viewer.position == 0
    viewer._on_key(Key("S"))
    assert len(list(tmp_path.glob("view_step*.png"))) == 1
    viewer._on_key(Key("R"))  # start recording; every change is a video frame
    for i in range(1, 5):
        viewer.go_to(i)
    viewer._on_key(Key("R"))  # stop
    import imageio.v3 as iio

    (video,) = tmp_path.glob("view_*.mp4")
    assert iio.imread(video, index=None).shape[0] == 5  # the frame at start plus four changes
    viewer._on_key(Key("Space"))  # a replay: space plays and pauses
    assert viewer.playing
    viewer._on_key(Key("Q"))
    assert viewer.closed


@pytest.mark.parametrize("task", ["classification", "binary"])
def test_key_c_shows_the_confusion_matrix_in_place_of_the_predictions_and_back(task):
    from probescope.viewers.panels import CONFUSION_BLUE

    classes = 3 if task == "classification" else 2
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2][: 9 if classes == 3 else 5], np.float32)
    spec = PanelSpec("prediction", "prediction", {"task": task, "num_classes": classes, "threshold": 0.5},
                     {"y_true": y, "jitter": np.zeros_like(y)})  # fmt: skip
    regression = PanelSpec(
        "fit", "prediction", {"task": "regression"}, {"y_true": y, "jitter": np.zeros_like(y)}
    )
    source = FrameSource(spec, regression)
    confusion = np.array([[3, 0, 0], [1, 1, 0], [0, 3, 1]])[:classes, :classes]
    data = {"prob_true": np.full(len(y), 0.8), "prob_pos": np.full(len(y), 0.8), "accuracy": np.float64(0.5),
            "class_mean": np.full(classes, 0.5), "confusion": confusion}  # fmt: skip
    source.show("prediction", data, 4)
    source.show("fit", {"y_pred": y, "mse": np.float64(0.0), "r2": np.float64(1.0)}, 4)
    viewer = Viewer(source, offscreen=True, size=(1000, 480))
    viewer.refresh()
    panel = viewer.panels["prediction"]
    marker = (0.0, 0.8) if task == "classification" else (0.8, 0.0)  # a sample's marker, class 0
    before = viewer.render()
    assert pixel(before, panel, *marker).max() < 250  # the markers are drawn

    class Key:
        key = type("K", (), {"name": "C"})()
        text = "c"

    viewer._on_key(Key())
    assert panel.confusion_shown and not viewer.panels["fit"].confusion_shown  # a regression has none
    image = viewer.render()
    shares = confusion / confusion.sum(1, keepdims=True)
    for (r, c), share in np.ndenumerate(shares):
        expected = 255 + (np.asarray(CONFUSION_BLUE) - 255) * share
        assert np.abs(pixel(image, panel, c + 0.35, r + 0.35) - expected).max() <= 3, (
            r,
            c,
        )  # beside the count
    assert list(panel.counts.text) == [str(n) for n in confusion.reshape(-1)]
    assert panel.x_axis.axis.axis_label == "predicted class" and panel.y_axis.axis.axis_label == "true class"
    viewer.render()
    viewer._on_mouse(_Pointer(panel.data_to_canvas(1.1, 0.9)))
    assert "true class 1, predicted 1: 1 samples (50% of the class)" in panel.caption.text
    confusion = confusion.copy()
    confusion[1], confusion[1, 1] = 0, 2  # a new frame: the matrix follows it
    source.show("prediction", {**data, "confusion": confusion}, 5)
    viewer.refresh()
    assert np.abs(pixel(viewer.render(), panel, 1.35, 1.35) - np.asarray(CONFUSION_BLUE)).max() <= 3
    assert viewer.toggle_confusion() == ["prediction"]  # and back to the predictions
    after = viewer.render()
    np.testing.assert_array_equal(pixel(after, panel, *marker), pixel(before, panel, *marker))
    assert panel.x_axis.axis.axis_label == panel.x_label
    viewer.close()


def test_stats_panel_shows_the_latent_state_of_every_frame():
    from vispy.color import Color

    from probescope.analysis.report import state_colour

    column = "weight/0.weight/l2"
    spec = PanelSpec("stats", "stats", {}, {"columns": np.array([column])})
    source = FrameSource(spec)
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    states = [0] * 5 + [2] * 5
    for step, state in enumerate(states):
        probs = np.eye(3)[state] * 0.9 + 0.1 / 3
        source.show(
            "stats", {"values": np.array([1.0 + step]), "state": np.int64(state), "state_probs": probs}, step
        )
        viewer.refresh()
    image = viewer.render()
    panel = viewer.panels["stats"]
    rect = panel.view.camera.rect
    y = rect.bottom + 0.03 * rect.height  # the band along the bottom
    for step, state in ((1.5, 0), (3.5, 0), (5.5, 2), (8.5, 2)):
        colour = np.array(Color(state_colour(state)).rgb) * 255
        assert distance_near(image, panel, step, y, colour) <= 30, f"state {state} at step {step}"
    assert "latent state 2 (p=0.93)" in panel.caption.text
    viewer.close()


def test_several_runs_side_by_side_one_row_each(recorded, tmp_path):
    from probescope.cli import main
    from probescope.viewers.viewer import RunsSource

    short = record_blobs_run(tmp_path / "short", grid_every=3, other_every=5, steps=6, epoch_every=5)
    source = RunsSource([recorded, short], probes=["grid", "loss"])
    viewer = Viewer(source, offscreen=True, size=(900, 700))
    a, b = recorded.name, short.name
    assert list(viewer.panels) == [f"{a} · grid", f"{a} · loss", f"{b} · grid", f"{b} · loss"]
    recorded_steps = {
        s for run in (recorded, short) for p in ("grid", "loss") for s in open_run(run).probe(p).steps()
    }
    assert viewer.timeline == sorted(recorded_steps)
    for step in (6, viewer.timeline[-1]):
        viewer.go_to(viewer.timeline.index(step))
        image = viewer.render()
        for run, label in ((recorded, a), (short, b)):
            record = open_run(run).probe("grid")
            steps = record.steps()
            frame = record.frame(int(np.searchsorted(steps, step, side="right")) - 1)
            panel = viewer.panels[f"{label} · grid"]
            assert panel.step == frame.step  # each run at its own newest frame up to the step
            assert _map_pixels_checked(image, panel, record.static, frame.data["rgba"], seed=1) >= 10
        # one probe in two runs: the same axes, so the runs compare at a glance
        rect_a, rect_b = (viewer.panels[f"{label} · loss"].view.camera.rect for label in (a, b))
        assert (rect_a.left, rect_a.right, rect_a.bottom, rect_a.top) == pytest.approx(
            (rect_b.left, rect_b.right, rect_b.bottom, rect_b.top)
        )
    viewer.close()
    with pytest.raises(ValueError, match=r"no run has the probes \['nope'\]"):
        RunsSource([recorded, short], probes=["nope"])
    out = tmp_path / "both.png"
    assert main(["view", str(recorded), str(short), "--offscreen", "--out", str(out)]) == 0
    import imageio.v3 as iio

    assert iio.imread(out).shape[0] > 600  # two rows of panels


def _map_pixels_checked(image, panel, static, rgba, seed: int) -> int:
    """Checks 40 random grid points of a map panel against the frame's colours (±2), those
    not under a training point's marker; returns how many it checked."""
    us, vs = static["us"], static["vs"]
    checked = 0
    for r, c in np.random.default_rng(seed).integers(0, [len(vs), len(us)], (40, 2)):
        if _near_a_marker(panel, static["points_uv"], us[c], vs[r]):
            continue  # the training points are drawn over the map
        np.testing.assert_allclose(
            pixel(image, panel, us[c], vs[r]), rgba[r, c, :3], atol=2, err_msg=f"{r},{c}"
        )
        checked += 1
    return checked


def _near_a_marker(panel, points, x, y, pixels=10.0) -> bool:
    cx, cy = panel.data_to_canvas(x, y)
    return any(np.hypot(px - cx, py - cy) < pixels for px, py in (panel.data_to_canvas(*p) for p in points))


class _Pointer:
    def __init__(self, pos):
        self.pos = pos


def test_the_pointer_reads_values_off_every_panel(trained_map):
    spec, frame = trained_map
    steps = np.arange(1, 51, dtype=np.float64)
    loss = 2.0 * np.exp(-steps / 15.0)
    loss_spec = PanelSpec("loss", "loss", {}, {})
    source = FrameSource(spec, loss_spec)
    source.show(spec.name, frame.data, frame.step)
    source.show("loss", {"series/train_loss/steps": steps, "series/train_loss/values": loss}, 50)
    viewer = Viewer(source, offscreen=True, size=(1100, 480))
    viewer.refresh()
    viewer.render()  # laid out: each panel has its place on the canvas
    grid, losses = viewer.panels[spec.name], viewer.panels["loss"]
    us, vs, probs = spec.static["us"], spec.static["vs"], frame.data["probs"]
    for r, c in ((2, 3), (11, 30), (20, 17)):
        viewer._on_mouse(_Pointer(grid.data_to_canvas(us[c], vs[r])))
        best = int(probs[r, c].argmax())
        assert f"class {best} {probs[r, c, best]:.2f}" in grid.caption.text, (r, c, grid.caption.text)
        assert losses.hover == ""  # the pointer is not over the loss panel
    viewer._on_mouse(_Pointer(losses.data_to_canvas(20.2, np.log10(loss[19]))))
    assert f"step 20: train_loss {loss[19]:.4g}" in losses.caption.text and grid.hover == ""
    # a new frame under a pointer that stays: the caption reads the new values
    source.show("loss", {"series/train_loss/steps": steps, "series/train_loss/values": loss / 2}, 51)
    viewer.refresh()
    assert f"step 20: train_loss {loss[19] / 2:.4g}" in losses.caption.text
    viewer._on_mouse(_Pointer((1, 1)))  # the canvas's corner: over no panel
    assert grid.hover == losses.hover == "" and "train_loss 0" not in losses.caption.text
    viewer.close()


def test_captions_start_at_the_panels_left_edge():
    spec = PanelSpec("loss", "loss", {}, {})
    source = FrameSource(spec)
    steps = np.arange(1, 11, dtype=np.float64)
    source.show("loss", {"series/train_loss/steps": steps, "series/train_loss/values": 1 / steps}, 10)
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    viewer.refresh()
    image = viewer.render()[..., :3].astype(int)
    caption = image[:24]  # the caption's row, above the axes
    dark = np.argwhere(caption.max(-1) < 110)[:, 1]
    assert len(dark) and dark.min() < 30, "the caption's text starts at the left"
    assert dark.max() < 400  # "loss · step 10 · epoch 0 · train_loss" fits well inside the panel
    viewer.close()


def test_the_pointer_over_a_class_reads_its_row_of_the_confusion_matrix():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2], np.float32)
    spec = PanelSpec("prediction", "prediction", {"task": "classification", "num_classes": 3},
                     {"y_true": y, "jitter": np.zeros_like(y)})  # fmt: skip
    source = FrameSource(spec)
    confusion = np.array([[3, 0, 0], [1, 1, 0], [0, 3, 1]])
    data = {"prob_true": np.full(9, 0.5), "pred": np.zeros(9, np.int64), "accuracy": np.float64(5 / 9),
            "class_mean": np.full(3, 0.5), "confusion": confusion}  # fmt: skip
    source.show("prediction", data, 4)
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    viewer.refresh()
    viewer.render()
    panel = viewer.panels["prediction"]
    viewer._on_mouse(_Pointer(panel.data_to_canvas(2.1, 0.4)))
    assert "class 2: 1 of 4 right, 3 taken for class 1" in panel.caption.text
    viewer._on_mouse(_Pointer(panel.data_to_canvas(0.0, 0.7)))
    assert "class 0: 3 of 3 right" in panel.caption.text and "taken for" not in panel.caption.text
    viewer.close()


def test_gl_export_animates_a_stats_probe_frame_by_frame(tmp_path):
    from probescope import StatsProbe
    from probescope.export import export_run

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(64, 2)
    y = (x[:, 0] > 0).long()
    probe = StatsProbe("*", schedule=Schedule.every(2))
    with Monitor(model, [probe], snapshot="sync", run_dir=tmp_path / "run", ring_capacity=16) as monitor:
        train_steps(monitor, model, x, y, 8, batch=16)
    run = open_run(tmp_path / "run")
    files = export_run(run, tmp_path / "gl", ["gif"], renderer="gl")
    import imageio.v3 as iio

    assert iio.imread(files["stats"][0], index=None).shape[0] == len(run.probe("stats"))


def test_neuron_maps_draw_each_unit_and_the_pointer_names_it(blobs):
    from probescope import NeuronProbe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 9), nn.Tanh(), nn.Linear(9, 7))
    probe = NeuronProbe(blobs.x_train, "1", units=[8, 2, 5, 0], resolution=20)
    with Monitor(model, [probe], snapshot="sync") as monitor:
        pass
    frame = monitor.latest(probe.name)
    spec = PanelSpec.of_probe(probe)
    source = FrameSource(spec)
    source.show(spec.name, frame.data, frame.step)
    viewer = Viewer(source, offscreen=True, size=(640, 560))
    viewer.refresh()
    image = viewer.render()
    panel = viewer.panels[spec.name]
    rgba, acts = frame.data["rgba"], frame.data["activations"]
    pitch = probe.resolution + 2
    for unit, (r, c) in ((0, (3, 4)), (1, (15, 9)), (3, (10, 18))):
        row, col = divmod(unit, probe.columns)
        # the centre of mosaic pixel (row*pitch + r, col*pitch + c): x right, y up from the bottom
        x, y = col * pitch + c + 0.5, panel.height - (row * pitch + r + 0.5)
        np.testing.assert_allclose(
            pixel(image, panel, x, y), rgba[row * pitch + r, col * pitch + c, :3], atol=2
        )
        viewer._on_mouse(_Pointer(panel.data_to_canvas(x, y)))
        us, vs = probe.static()["us"], probe.static()["vs"]
        said = f"unit {probe.units[unit]} at ({us[c]:.3g}, {vs[r]:.3g}): {acts[unit, r, c]:.3g}"
        assert said in panel.caption.text, panel.caption.text
    assert "4 units of '1'" in panel.caption.text
    viewer.close()


def test_a_noisy_batch_loss_is_drawn_as_one_unbroken_line():
    steps = np.arange(1, 881, dtype=np.float64)
    loss = 10.0 ** (
        -1.6 + 0.3 * np.random.default_rng(0).standard_normal(len(steps))
    )  # noisy, a point a step
    source = FrameSource(PanelSpec("loss", "loss", {}, {}))
    source.show("loss", {"series/train_loss/steps": steps, "series/train_loss/values": loss}, 880)
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    viewer.refresh()
    image = viewer.render()[..., :3].astype(int)
    panel = viewer.panels["loss"]
    dark = image.max(-1) < 200
    points = np.array([panel.data_to_canvas(s, np.log10(v)) for s, v in zip(steps, loss, strict=True)])
    columns = points[:, 0].astype(int)
    wanted = drawn = 0
    for c in np.unique(columns):  # a column's points span rows lo..hi: the line crosses each of them
        ys = points[columns == c, 1]
        lo, hi = int(np.ceil(ys.min())), int(np.floor(ys.max()))
        wanted += max(hi - lo, 0)
        drawn += dark[lo:hi, c - 1 : c + 2].any(axis=1).sum()
    assert drawn / wanted > 0.95, f"the line covers {drawn / wanted:.0%} of the rows it spans"  # agg: 26 %
    viewer.close()


def test_checkpoint_panel_draws_the_metric_and_stars_the_best(tmp_path):
    """A recorded run's CheckpointProbe, replayed: the metric's line through every frame, a
    star at the best checkpoint's step and value, the caption naming it (as checkpoints.json)."""
    import json

    from probescope import CheckpointProbe
    from probescope.datasets import make_dataset
    from probescope.viewers.panels import CheckpointPanel

    data = make_dataset("blobs7", seed=1, n=400)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 7))
    probe = CheckpointProbe(valid=(data.x_valid, data.y_valid), loss_fn=nn.functional.cross_entropy,
                            keep="best", schedule=Schedule.every(2))  # fmt: skip
    with Monitor(model, [probe], run_dir=tmp_path / "run") as monitor:
        train_steps(monitor, model, data.x_train, data.y_train, 20)
    index = json.loads((tmp_path / "run" / "checkpoints" / "checkpoints.json").read_text())
    record = open_run(tmp_path / "run").probe(probe.name)
    frames = [record.frame(i) for i in range(len(record))]
    values = {f.step: float(f.data["value"]) for f in frames}
    assert len(values) >= 10 and len({round(v, 4) for v in values.values()}) > 3  # the metric moves

    viewer = Viewer(RunSource(tmp_path / "run"), offscreen=True, size=(640, 400))
    panel = viewer.panels[probe.name]
    assert isinstance(panel, CheckpointPanel)
    viewer.go_to(len(viewer.timeline) - 1)  # straight to the end: the replay feeds the history
    assert sorted(panel.history) == sorted(values)
    image = viewer.render()
    best, best_step = index["best"]["value"], index["best"]["step"]
    assert f"best {best:.4g} at step {best_step}" in panel.caption.text
    assert distance_near(image, panel, best_step, best, np.array(CheckpointPanel.BEST[:3]) * 255, 2) <= 40
    line = np.array(CheckpointPanel.VALUE[:3]) * 255
    steps = sorted(values)
    for a, b in itertools.pairwise(steps):  # the line passes between consecutive frames
        if b != best_step and a != best_step:
            mid = ((a + b) / 2, (values[a] + values[b]) / 2)
            assert distance_near(image, panel, *mid, line, 2) <= 60, (a, b)
    assert panel.readout(steps[3], values[steps[3]]) == f"step {steps[3]}: valid_loss {values[steps[3]]:.4g}"
    viewer.go_to(viewer.timeline.index(steps[4]))  # back: the frames up to there, from the start
    assert sorted(panel.history) == steps[:5]
    viewer.close()


def test_checkpoint_panel_rings_saved_frames_and_starts_over_when_a_replay_goes_back():
    from probescope.viewers.panels import CheckpointPanel

    spec = PanelSpec("ckpt", "checkpoint", {"metric": "valid_loss"}, {})
    source = FrameSource(spec)
    viewer = Viewer(source, offscreen=True, size=(640, 400))
    values, best, best_step = [1.0, 0.6, 0.8, 0.5, 0.7, 0.9], np.inf, -1
    for step, value in enumerate(values):
        saved = value < best
        best, best_step = (value, step) if saved else (best, best_step)
        frame = {"value": np.float64(value), "best": np.float64(best), "best_step": np.int64(best_step),
                 "saved": np.bool_(saved)}  # fmt: skip
        source.show("ckpt", frame, step)
        viewer.refresh()
    image = viewer.render()
    panel = viewer.panels["ckpt"]
    assert panel.caption.text.endswith("valid_loss 0.9  ·  best 0.5 at step 3")
    white, purple = np.full(3, 255), np.array(CheckpointPanel.VALUE[:3]) * 255
    gold = np.array(CheckpointPanel.BEST[:3]) * 255
    assert distance_near(image, panel, 3, 0.5, gold, 2) <= 40  # the best: a star
    for step in (0, 1):  # saved, no longer the best: a ring, white inside
        assert np.abs(pixel(image, panel, step, values[step]) - white).max() <= 30, step
    for step in (2, 4, 5):  # not saved: only the line passes
        assert distance_near(image, panel, step, values[step], purple, 1) <= 40, step
    # the whole line is drawn: vispy's agg lines faded out along segments like these when their
    # vertices were in data units (now in pixels, see panels.in_pixels)
    for step in range(5):
        for t in (0.3, 0.5, 0.7):
            x, y = step + t, values[step] + t * (values[step + 1] - values[step])
            assert distance_near(image, panel, x, y, purple, 1) <= 40, (x, y)
    # a replay that goes back to step 1 starts the history over
    source.show("ckpt", {"value": np.float64(0.6), "best": np.float64(0.6), "best_step": np.int64(1),
                         "saved": np.bool_(True)}, 1)  # fmt: skip
    viewer.refresh()
    assert list(panel.history) == [1.0] and "best 0.6 at step 1" in panel.caption.text
    viewer.close()


def test_frames_reach_a_render_process_whole_with_their_arrays_out_of_band():
    import multiprocessing
    import threading

    from probescope.viewers.process import receive_out_of_band, send_out_of_band

    ours, theirs = multiprocessing.Pipe()
    rng = np.random.default_rng(0)
    frames = {
        "grid": Frame("grid", 3, 30, 1, 0.5, {"rgba": rng.integers(0, 255, (257, 129, 4), dtype=np.uint8),
                                              "probs": rng.random((257, 129, 7), dtype=np.float32)}),
        "loss": Frame("loss", 1, 30, 1, 0.5, {"series": rng.random(1001)[::2], "name": np.array("loss")}),
    }  # fmt: skip
    got = []
    reader = threading.Thread(target=lambda: got.extend(receive_out_of_band(theirs) for _ in range(2)))
    reader.start()
    send_out_of_band(ours, frames)
    send_out_of_band(ours, None)
    reader.join(10)
    received, end = got
    assert end is None and list(received) == ["grid", "loss"]
    for name, frame in frames.items():
        assert (received[name].seq, received[name].step) == (frame.seq, frame.step)
        for key, value in frame.data.items():
            np.testing.assert_array_equal(received[name].data[key], value)
            assert received[name].data[key].dtype == value.dtype


def test_loss_panel_legend_names_each_series_in_its_colour_as_it_appears():
    steps = np.arange(1, 41, dtype=np.float64)
    source = FrameSource(PanelSpec("loss", "loss", {}, {}))
    source.show("loss", {"series/train_loss/steps": steps, "series/train_loss/values": 1.0 / steps}, 40)
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    viewer.refresh()
    panel = viewer.panels["loss"]
    orange = np.array(panel.COLOURS["valid_loss"][:3]) * 255

    def legend_has(image, colour):
        """Whether text of ``colour`` is drawn right of the plot, where the legend is."""
        right, top = (int(v) for v in panel.data_to_canvas(steps[-1], 0.0))
        area = image[: top + 200, right + 20 : right + 120, :3].astype(float)
        return bool((np.abs(area - colour).max(-1) < 60).any())

    image = viewer.render()
    assert list(panel.legend.text.text) == ["train_loss"] and not legend_has(image, orange)
    valid = {"series/valid_loss/steps": np.array([20.0, 40.0]), "series/valid_loss/values": [0.5, 0.3]}
    source.show(
        "loss", {"series/train_loss/steps": steps, "series/train_loss/values": 1.0 / steps} | valid, 40
    )
    viewer.refresh()
    image = viewer.render()
    assert list(panel.legend.text.text) == ["train_loss", "valid_loss"]
    np.testing.assert_allclose(panel.legend.text.color.rgba[1], panel.COLOURS["valid_loss"])
    assert legend_has(image, orange)
    assert "valid_loss" not in panel.caption.text  # named by the legend, not the caption
    viewer.close()


def test_the_stats_legend_spreads_its_lines_over_the_model_with_names_that_fit():
    from probescope.figures import spread
    from probescope.viewers.panels import legend_names

    layers = [f"weight/model.blocks.{i}.mlp.fc.weight/l2" for i in range(12)]
    assert spread(layers, 4) == [layers[0], layers[4], layers[7], layers[11]]  # first to last
    assert spread(layers[:3], 6) == layers[:3]
    names = legend_names(spread(layers, 4))
    assert names == ["0.mlp.fc/l2", "4.mlp.fc/l2", "7.mlp.fc/l2", "11.mlp.fc/l2"]  # shared prefix gone
    mixed = ["weight/bert.encoder.layer.0.attention.self.query.weight/spectral", "act/classifier/l2"]
    assert legend_names(mixed) == ["…self.query/spectral", "act/classifier/l2"]
    assert all(len(n) <= 20 for n in legend_names(mixed))
    assert legend_names(["weight/fc.weight/l2"]) == ["weight/fc/l2"]


def test_a_value_map_draws_its_values_and_its_points_in_their_targets_colour():
    """A regression's map: pixels as its frame colours them, each data point in its target's
    colour on the same ramp, the legend naming the ramp's ends, the pointer reading values."""
    from probescope.kernels.colormap import DIVERGING_ANCHORS
    from probescope.probes.grid import point_colours

    g = torch.Generator().manual_seed(3)
    x = torch.rand(12, 2, generator=g) * 4 - 2
    y = torch.linspace(-3.0, 3.0, 12)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    probe = GridProbe(x, y, mode="value", resolution=(31, 25), schedule=Schedule.every(1))
    with Monitor(model, [probe]) as monitor:
        monitor.step()
    frame, spec = monitor.latest(probe.name), PanelSpec.of_probe(probe)
    viewer, image, panel = _render_one(spec, frame.data, frame.step)
    assert list(panel.legend.text.text) == ["output 0 -3", "3"]
    us, vs, uv = spec.static["us"], spec.static["vs"], spec.static["points_uv"]
    assert _map_pixels_checked(image, panel, spec.static, frame.data["rgba"], seed=2) >= 10
    colours = point_colours(spec.config, spec.static)
    assert tuple(colours[0]) == DIVERGING_ANCHORS[0] and tuple(colours[-1]) == DIVERGING_ANCHORS[-1]
    for point, colour in zip(uv, colours, strict=True):  # a marker's centre is its target's colour
        assert distance_near(image, panel, *point, colour) <= 8, (point, colour)  # (neighbours: 17+ off)
    r, c = 5, 9
    viewer._on_mouse(_Pointer(panel.data_to_canvas(us[c], vs[r])))
    assert f"value {frame.data['probs'][r, c, 0]:.4g}" in panel.caption.text
    viewer.close()


def test_class_names_name_the_legend_and_the_readouts(trained_map):
    """A map's legend and pointer, and a prediction panel's pointer over a class, over a cell
    of its confusion matrix and over a label, say the classes' names."""
    from probescope.viewers.panels import _label_readout

    spec, frame = trained_map
    names = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
    named = PanelSpec(spec.name, spec.kind, {**spec.config, "class_names": names}, spec.static)
    viewer, _, panel = _render_one(named, frame.data, frame.step)
    assert list(panel.legend.text.text) == names
    us, vs, probs = spec.static["us"], spec.static["vs"], frame.data["probs"]
    viewer._on_mouse(_Pointer(panel.data_to_canvas(us[4], vs[6])))
    best = int(probs[6, 4].argmax())
    assert f"{names[best]} {probs[6, 4, best]:.2f}" in panel.caption.text
    viewer.close()
    y = np.array([0, 0, 1, 1, 1], np.float32)
    prediction = PanelSpec("prediction", "prediction",
                           {"task": "classification", "num_classes": 2, "class_names": ["no", "yes"]},
                           {"y_true": y, "jitter": np.zeros_like(y)})  # fmt: skip
    data = {"prob_true": np.full(5, 0.8), "accuracy": np.float64(0.6), "class_mean": np.full(2, 0.8),
            "confusion": np.array([[2, 0], [2, 1]])}  # fmt: skip
    viewer, _, panel = _render_one(prediction, data, 3)
    assert panel.readout(1.1, 0.5) == "yes: 1 of 3 right, 2 taken for no"
    panel.confusion_shown = True
    assert panel.readout(0.0, 1.0) == "true yes, predicted no: 2 samples (67% of the class)"
    viewer.close()
    counts = np.array([[[3, 1], [0, 2]]])  # one label: 3 right absent, 1 marked, 2 right present
    assert _label_readout(counts, 0.1, {"class_names": ["urgent"]}).startswith("urgent: 5 of 6 right")


def test_a_curve_along_a_line_says_so_on_its_axis():
    x = torch.randn(60, 4)
    probe = CurveProbe(x, x[:, 0] - x[:, 2], loss_smoothing=3)
    frame = _evaluate_once(probe, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    viewer, _, panel = _render_one(PanelSpec.of_probe(probe), frame, 1)
    assert panel.x_axis.axis.axis_label == "t (along the line)"
    viewer.close()


def _evaluate_once(probe, model) -> dict:
    from probescope.probes.base import ProbeContext

    probe.attach(model)
    return {
        k: (v.numpy() if isinstance(v, torch.Tensor) else v)
        for k, v in probe.evaluate(model, ProbeContext(1, 0)).items()
    }


def _own_kind(name: str, frames: list[tuple[int, dict]], views=None):
    """An offscreen viewer of one probe of the user's own kind that has been shown ``frames``
    (step, data) in turn: (viewer, image, panel)."""
    spec = PanelSpec(name, "mine", {"views": views} if views else {}, {})
    source = FrameSource(spec)
    viewer = Viewer(source, offscreen=True, size=(640, 480))
    for step, data in frames:
        source.show(name, data, step)
        viewer.refresh()
    return viewer, viewer.render(), viewer.panels[name]


@pytest.mark.parametrize("shape", [(1, 1), (6, 9), (13, 4)])
def test_a_probe_of_your_own_kind_draws_its_images_and_heat_maps(shape):
    from probescope.probes.views import heatmap_rgba

    rng = np.random.default_rng(shape[0])
    picture = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    viewer, image, panel = _own_kind("mine", [(7, {"picture": picture, "wrong": np.int64(3)})])
    assert type(panel).__name__ == "FramePanel"
    height, width = shape
    for r, c in itertools.product(range(height), range(width)):
        np.testing.assert_allclose(pixel(image, panel, c + 0.5, height - r - 0.5), picture[r, c], atol=2)
    assert f"picture ({height}x{width}x3)" in panel.caption.text and "wrong 3" in panel.caption.text
    viewer.close()

    values = rng.normal(size=shape)
    viewer, image, panel = _own_kind("mine", [(7, {"w": values})])
    rgba, (lo, _) = heatmap_rgba(values)
    for r, c in itertools.product(range(height), range(width)):
        np.testing.assert_allclose(pixel(image, panel, c + 0.5, height - r - 0.5), rgba[r, c, :3], atol=2)
    assert f"blue {lo:.3g}" in panel.caption.text
    assert panel.readout(0.5, height - 0.5) == f"row 0, column 0: {values[0, 0]:.4g}"
    viewer.close()


def test_maps_draw_as_a_mosaic_and_the_pointer_names_the_map():
    from probescope.probes.views import maps_rgba

    values = np.random.default_rng(5).normal(size=(5, 3, 4))  # e.g. 5 attention heads
    viewer, image, panel = _own_kind("mine", [(2, {"heads": values})])
    mosaic, (lo, _) = maps_rgba(values)
    height, width = mosaic.shape[:2]
    for r, c in itertools.product(range(height), range(width)):
        np.testing.assert_allclose(pixel(image, panel, c + 0.5, height - r - 0.5), mosaic[r, c, :3], atol=2)
    assert f"heads (5x3x4): blue {lo:.3g}" in panel.caption.text
    # map 4 is the second map of the second row (3 a row); its row 1, column 2
    x, y = (4 + 2) + 2 + 0.5, height - ((3 + 2) + 1) - 0.5
    assert panel.readout(x, y) == f"map 4, row 1, column 2: {values[4, 1, 2]:.4g}"
    viewer.close()


def test_a_heat_map_over_a_fixed_range_keeps_its_colours_from_frame_to_frame():
    frames = [(1, {"w": np.array([[-1.0, 0.5]])}), (2, {"w": np.array([[0.5, 3.0]])})]
    views = {"w": ["heatmap", -2.0, 2.0]}
    first = _own_kind("mine", frames[:1], views=views)
    second = _own_kind("mine", frames, views=views)
    (_, image1, panel1), (_, image2, panel2) = first, second
    # 0.5 is the same colour in both frames (each frame's own range would have made it a pale
    # red in the first, over -1..1, and the bluest blue in the second, over 0.5..3)
    np.testing.assert_allclose(pixel(image1, panel1, 1.5, 0.5), pixel(image2, panel2, 0.5, 0.5), atol=2)
    assert "w (1x2): blue -2, white 0, red 2" in panel2.caption.text
    first[0].close()
    second[0].close()


def test_a_probe_of_your_own_kind_draws_a_histogram_and_a_line():
    bar = (np.array([0.58, 0.40, 0.74]) * 255).round()  # METRIC_COLOURS[1] at alpha 0.8 on white
    bar = 0.8 * bar + 0.2 * 255
    values = np.array([0.0] * 3 + [1.0] * 7 + [np.nan])
    viewer, image, panel = _own_kind("mine", [(3, {"margins": values})])
    width = 1.0 / 30  # 30 bins over [0, 1]
    assert np.abs(pixel(image, panel, width / 2, 1.5) - bar).max() <= 3  # 3 zeros: a bar of 3
    assert np.all(pixel(image, panel, width / 2, 4.0) >= 250)  # and no higher
    assert np.abs(pixel(image, panel, 1 - width / 2, 6.5) - bar).max() <= 3  # 7 ones
    assert np.all(pixel(image, panel, 0.5, 1.5) >= 250)  # nothing in between
    assert "margins (11): 1 not finite" in panel.caption.text
    assert panel.readout(width / 2, 1.0) == "[0, 0.03333): 3"
    viewer.close()

    ys = np.sin(np.arange(12) / 2.0)
    viewer, image, panel = _own_kind("mine", [(3, {"margins": ys})], views={"margins": "line"})
    line = np.array([0.58, 0.40, 0.74]) * 255
    for i in range(12):
        assert distance_near(image, panel, i, ys[i], line, radius=2) <= 40, f"point {i}"
    assert panel.readout(4.2, 0.0) == f"index 4: {ys[4]:.4g}"
    viewer.close()


def test_numbers_alone_draw_as_series_over_the_frames_seen_and_start_over_on_a_replay_back():
    from probescope.viewers.panels import METRIC_COLOURS

    frames = [(s, {"acc": np.float32(s / 100), "wrong": np.int64(50 - s)}) for s in range(0, 50, 5)]
    viewer, image, panel = _own_kind("mine", frames)
    assert set(panel.series) == {"acc", "wrong"}
    for i, name in enumerate(("acc", "wrong")):
        colour = np.array(METRIC_COLOURS[i]) * 255
        for step, data in frames[1:-1]:
            assert distance_near(image, panel, step, float(data[name]), colour, radius=2) <= 60, (name, step)
    assert "acc 0.45, wrong 5" in panel.caption.text
    assert panel.readout(20.4, 10.0) == "step 20: acc 0.2, wrong 30"
    panel.update(*frames[2][::-1], 0)  # a replay that went back: only the frames from there on
    assert len(panel.series["acc"]) == 2  # (one point is drawn twice as a line of two)
    viewer.close()


def test_a_view_that_does_not_fit_its_entry_is_said():
    viewer, _, panel = _own_kind("mine", [(1, {"m": np.arange(4.0)})], views={"m": "image"})
    assert "m: drawn by shape (its view does not fit it)" in panel.caption.text
    assert panel.layout.picture == ("m", "histogram")
    viewer.close()


def test_probes_of_your_own_kind_export_through_the_gl_panels_and_the_notebook_figures(tmp_path):
    import imageio.v3 as iio

    from probescope import Probe
    from probescope.export import export_run
    from probescope.viewers.notebook import FigureCanvas

    class Spread(Probe):  # a histogram of the first layer's weights and their norm
        kind = "spread"

        def evaluate(self, model, context):
            return {"w": model[0].weight.reshape(-1).clone(), "norm": model[0].weight.norm()}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(200, 2), torch.randint(0, 3, (200,))
    with Monitor(model, [Spread(schedule=Schedule.every(4))], run_dir=tmp_path / "run") as monitor:
        train_steps(monitor, model, x, y, 12)
    run = open_run(tmp_path / "run")
    files = export_run(run, tmp_path / "gl", ["gif"], renderer="gl")
    frames = iio.imread(files["spread"][0], index=None)
    assert frames.shape[0] == len(run.probe("spread")) == 4
    assert len({f.tobytes() for f in frames}) == 4  # each frame its own histogram and caption
    canvas = FigureCanvas(RunSource(tmp_path / "run"))
    assert list(canvas.renderers) == ["spread"] and canvas.refresh()
    assert canvas.render().std() > 10  # a figure, not a blank canvas


def test_asking_the_viewer_for_no_probe_of_the_run_names_those_it_has(recorded):
    with pytest.raises(ValueError, match=r"no probe to show \(the probes: grid, prediction, loss\)"):
        Viewer(RunSource(recorded), offscreen=True, probes=["nope"])


def test_hyperplanes_are_drawn_over_the_map_where_each_first_layer_unit_is_zero():
    """GridProbe(hyperplanes=True): a line across the map where each unit of the first layer
    is zero, in the viewer and the figures alike, moving with the frame."""
    from matplotlib.figure import Figure

    from probescope.figures import GridPanel
    from probescope.probes.grid import line_segments
    from probescope.viewers.panels import HYPERPLANE

    x = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]])
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():  # unit 0 is zero on x1 = 0.5, unit 1 on x2 = -0.25
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        model[0].bias.copy_(torch.tensor([-0.5, 0.5]))
    probe = GridProbe(x, torch.tensor([0, 1, 0, 1]), margin=0.0, resolution=40, points=False,
                      hyperplanes=True, schedule=Schedule.every(1))  # fmt: skip
    with Monitor(model, [probe]) as monitor:
        monitor.step()
    frame, spec = monitor.latest(probe.name), PanelSpec.of_probe(probe)
    np.testing.assert_allclose(frame.data["hyperplanes"], [[1.0, 0.0, -0.5], [0.0, 2.0, 0.5]])
    data = {**frame.data, "rgba": np.full_like(frame.data["rgba"], 255)}  # a white map: lines stand out
    viewer, image, panel = _render_one(spec, data, frame.step)
    ink = 255 - (255 - 255 * np.array(HYPERPLANE[:3])) * HYPERPLANE[3]  # the line blended on white
    for v in (-0.8, 0.3, 0.9):
        assert distance_near(image, panel, 0.5, v, ink, radius=1) <= 25, v
        assert np.all(pixel(image, panel, 0.6, v) >= 250)  # a few pixels away: the map
    for u in (-0.7, 0.1):
        assert distance_near(image, panel, u, -0.25, ink, radius=1) <= 25, u
    moved = {**data, "hyperplanes": np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]], np.float32)}
    panel.update(moved, 2, 0)  # unit 0 now at x1 = -0.5, unit 1 zero nowhere
    image = viewer.render()
    assert distance_near(image, panel, -0.5, 0.3, ink, radius=1) <= 25
    assert np.all(pixel(image, panel, 0.5, 0.3) >= 250) and np.all(pixel(image, panel, 0.1, -0.25) >= 250)
    viewer.close()
    figure_panel = GridPanel(Figure().add_subplot(), spec)  # (a spec has what a record has)
    figure_panel.update(frame.data)
    np.testing.assert_allclose(
        np.asarray(figure_panel.hyperplanes.get_segments()),
        line_segments(frame.data["hyperplanes"], spec.config["domain"]),
    )
