"""The live view in a Jupyter notebook, in a real kernel (ipykernel, driven by jupyter_client).

The cell's output is followed through the kernel's messages, as a frontend sees them: one
output displayed when the Monitor starts, replaced by pictures of the panels while the cell is
still training, the last one the run's final frames as a fresh canvas draws them.
"""

import base64
import importlib.util
import io
import logging
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from probescope import LossProbe, Monitor
from tests.conftest import train_steps

if importlib.util.find_spec("ipykernel") is None:  # not imported here: tqdm.auto would take
    pytest.skip("needs ipykernel", allow_module_level=True)  # pytest for a notebook
pytest.importorskip("jupyter_client")

viewer_module = pytest.importorskip("probescope.viewers.viewer")
from PIL import Image  # noqa: E402

from benchmarks.notebook import Kernel, result  # noqa: E402
from probescope.viewers.backend import ViewerUnavailable, use_backend  # noqa: E402

try:
    use_backend(offscreen=True)
except ViewerUnavailable as err:  # .ci/run installs Mesa's EGL, so CI always runs these
    pytest.skip(f"no EGL: {err}", allow_module_level=True)

# A cell that trains an MLP on blobs with a map, predictions and losses, until the view has
# sent a few pictures (so the test never depends on how fast this machine is), then prints
# the time training ended.
TRAIN = """
import json, time, torch, probescope as ps
from probescope.datasets import make_dataset
torch.manual_seed(0)
data = make_dataset("blobs7", seed=3, n=700)
model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, data.num_classes))
opt = torch.optim.Adam(model.parameters(), 1e-2)
probes = [
    ps.GridProbe(data.x_train, data.y_train, resolution=48, schedule=ps.Schedule.every(3)),
    ps.PredictionProbe(data.x_valid, data.y_valid, schedule=ps.Schedule.every(3)),
    ps.LossProbe(schedule=ps.Schedule.every(3)),
]
deadline = time.time() + 120
with ps.Monitor(model, probes, optimizer=opt, run_dir={run!r}, viewer={viewer!r}, viewer_fps=4) as monitor:
    step = 0
    def more():
        view = monitor.viewer
        return view is not None and view.images < {pictures} and time.time() < deadline
    while step < 12 or more():
        i = (step * 64) % (len(data.x_train) - 64)
        loss = torch.nn.functional.cross_entropy(model(data.x_train[i : i + 64]), data.y_train[i : i + 64])
        opt.zero_grad(); loss.backward(); opt.step()
        monitor.step(loss=loss)
        started = time.time() if step == 0 else started
        step += 1
        time.sleep(0.01)
    ended = time.time()
view = monitor.viewer
print("RESULT", json.dumps({{"started": started, "ended": ended, "steps": monitor.step_count,
    "view": type(view).__name__,
    "images": getattr(view, "images", None), "error": getattr(view, "error", None),
    "shown": getattr(view, "shown", None), "renderer": getattr(view, "renderer", None),
    "newest": {{name: monitor.latest(name).seq for name in monitor.probes}}}}))
"""


@pytest.fixture(scope="module")
def kernel(request, tmp_path_factory):
    # The benchmark's kernel driver: its spec is written for this interpreter, so neither a
    # kernel installed on the machine nor the lookup of the native one (which imports ipykernel
    # into pytest, and tqdm.auto then takes pytest for a notebook) is involved.
    k = Kernel(request.config.rootpath, tmp_path_factory.mktemp("kernels"))
    yield k
    k.close()


def outputs(messages):
    """(display_data messages, update_display_data messages, printed text, errors)."""
    shown = [m for m in messages if m["msg_type"] == "display_data"]
    updates = [m for m in messages if m["msg_type"] == "update_display_data"]
    text = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
    errors = [m["content"] for m in messages if m["msg_type"] == "error"]
    return shown, updates, text, errors


def picture(message) -> np.ndarray:
    data = base64.b64decode(message["content"]["data"]["image/png"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def final_render(run_dir) -> np.ndarray:
    """The viewer's canvas, offscreen in this process, showing the run's last frames."""
    viewer = viewer_module.Viewer(viewer_module.RunSource(run_dir), offscreen=True)
    assert viewer.refresh()
    image = viewer.render()[..., :3]
    viewer.close()
    return image


def test_the_cell_shows_the_panels_while_it_trains(kernel, tmp_path):
    run_dir = tmp_path / "run"
    messages = kernel.run(TRAIN.format(run=str(run_dir), viewer=True, pictures=3))
    shown, updates, text, errors = outputs(messages)
    assert not errors, errors
    outcome = result(text)
    # viewer=True in a notebook is the notebook view; it drew while the cell trained.
    assert outcome["view"] == "NotebookView" and outcome["error"] is None
    assert outcome["images"] >= 4  # three while training (the loop waited for them) + the final
    assert "notebook view" not in text and "Traceback" not in text

    assert len(shown) == 1  # one output, displayed when the Monitor started
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert "first frames" in shown[0]["content"]["data"]["text/plain"]
    assert all(m["content"]["transient"]["display_id"] == display_id for m in updates)
    assert len(updates) == outcome["images"]
    # Each picture reached the frontend when it was drawn: the first before the first step
    # (the Monitor waits for it, as for compiling), two more while the loop trained.
    dates = [m["header"]["date"].timestamp() for m in updates]
    assert dates[0] < outcome["started"]
    assert sum(outcome["started"] < d < outcome["ended"] for d in dates) >= 2
    pictures = [picture(m) for m in updates]
    assert len({p.tobytes() for p in pictures}) >= 3  # newer frames, newer pictures

    # The last picture is the run's final frames as the viewer draws them: the view drew the
    # newest frame of every probe, and the picture is a fresh canvas's of the run directory's
    # last frames (the map pixel for pixel; elsewhere, anti-aliased edges of a line drawn
    # over many frames may round differently, by one level in a few pixels).
    assert outcome["shown"] == outcome["newest"]
    expected = final_render(run_dir)
    assert pictures[-1].shape == expected.shape
    third = expected.shape[1] // 3
    np.testing.assert_array_equal(pictures[-1][:, :third], expected[:, :third])
    differ = np.abs(pictures[-1].astype(int) - expected.astype(int))
    assert differ.max() <= 2 and (differ > 0).mean() < 1e-4


def without_egl(code: str) -> str:
    """``code`` run with an EGL platform that does not exist, as on a machine without EGL: the
    render process the view spawns inherits it, and OpenGL cannot render there."""
    return (
        "import os\nsaved = os.environ.get('EGL_PLATFORM')\nos.environ['EGL_PLATFORM'] = 'none-such'\n"
        f"try:\n{textwrap.indent(code, '    ')}\n"
        "finally:\n    os.environ['EGL_PLATFORM'] = saved or 'surfaceless'\n"
    )


def test_without_opengl_the_cell_shows_the_exporters_figures(kernel, tmp_path):
    from probescope.viewers.notebook import FigureCanvas

    run_dir = tmp_path / "run"
    code = without_egl(TRAIN.format(run=str(run_dir), viewer=True, pictures=3))
    shown, updates, text, errors = outputs(kernel.run(code))
    assert not errors, errors
    outcome = result(text)
    assert outcome["view"] == "NotebookView" and outcome["error"] is None
    assert outcome["renderer"] == "figures"
    assert "no OpenGL here (no OpenGL backend could start" in text and "drawing matplotlib's figures" in text
    assert len(shown) == 1
    assert outcome["shown"] == outcome["newest"] and len(updates) == outcome["images"] >= 4
    pictures = [picture(m) for m in updates]
    assert pictures[0].shape == (460, 3 * 560, 3) and len({p.tobytes() for p in pictures}) >= 3
    # The last picture: the figures of the run's final frames, tiled.
    canvas = FigureCanvas(viewer_module.RunSource(run_dir))
    assert canvas.refresh()
    np.testing.assert_array_equal(pictures[-1], canvas.render())


def test_a_view_that_cannot_open_says_why_in_the_cell_and_training_goes_on(kernel, tmp_path):
    # No OpenGL, and no probe with a matplotlib figure either (statistics only).
    cell = f"""
import torch, probescope as ps
model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
with ps.Monitor(model, [ps.StatsProbe()], run_dir={str(tmp_path / "run")!r}, viewer=True) as monitor:
    for step in range(12):
        model(torch.randn(16, 2)).sum().backward()
        monitor.step()
print("RESULT", json.dumps({{"steps": monitor.step_count, "view": type(monitor.viewer).__name__}}))
"""
    shown, updates, text, errors = outputs(kernel.run("import json\n" + without_egl(cell)))
    assert not errors, errors
    assert result(text) == {"steps": 12, "view": "NoneType"}  # the Monitor let go of the view
    assert "notebook view: could not open (ValueError: no probe here has a figure" in text
    assert "training goes on" in text
    assert len(shown) == 1 and len(updates) == 1
    said = updates[0]["content"]["data"]
    assert "image/png" not in said and "could not open" in said["text/plain"]


def test_a_render_process_that_dies_costs_a_warning_and_training_goes_on(kernel, tmp_path):
    # The render process is killed (out of memory, say) while the cell trains.
    cell = TRAIN.replace(
        "        step += 1\n",
        "        step += 1\n        if step == 20: monitor.viewer._renderer.kill()\n"
        "        if step == 20: time.sleep(1.0)\n",
    ).format(run=str(tmp_path / "run"), viewer=True, pictures=10**6)
    shown, updates, text, errors = outputs(kernel.run(cell))
    assert len(shown) == 1
    assert not errors, errors
    outcome = result(text)
    assert outcome["view"] == "NoneType" and outcome["steps"] > 20  # training went on
    assert "notebook view: failed" in text and "training goes on" in text
    assert "image/png" in updates[0]["content"]["data"]  # it drew until it died
    assert "failed" in updates[-1]["content"]["data"]["text/plain"]


def test_watch_shows_a_finished_run(kernel, tmp_path):
    run_dir = tmp_path / "run"
    code = TRAIN.format(run=str(run_dir), viewer=False, pictures=0)
    shown, updates, text, errors = outputs(kernel.run(code))
    assert not errors, errors
    expected = final_render(run_dir)
    for follow in (False, True):  # following a run that has ended draws it once and stops
        code = (
            "from probescope.viewers.notebook import watch\n"
            f"view = watch({str(run_dir)!r}, follow={follow})\n"
            "view._thread.join(60)\n"
            "print('RESULT', json.dumps({'alive': view._thread.is_alive(), 'images': view.images}))\n"
        )
        shown, updates, text, errors = outputs(kernel.run(code))
        assert not errors, errors
        assert result(text) == {"alive": False, "images": 1}
        assert len(shown) == 1 and len(updates) == 1
        np.testing.assert_array_equal(picture(updates[0]), expected)


def test_outside_a_notebook_the_notebook_view_is_a_warning(caplog):
    model = nn.Linear(2, 3)
    with (
        caplog.at_level(logging.WARNING, logger="probescope"),
        Monitor(model, [LossProbe()], viewer="notebook") as monitor,
    ):
        train_steps(monitor, model, torch.randn(64, 2), torch.randint(0, 3, (64,)), 3)
    assert monitor.step_count == 3 and monitor.viewer is None
    assert "needs a Jupyter kernel" in caplog.text


@pytest.mark.parametrize("bad", [{"viewer": "window"}, {"viewer_fps": 0}, {"viewer_fps": -1.0}])
def test_viewer_arguments_are_checked(bad):
    with pytest.raises(ValueError, match="viewer"):
        Monitor(nn.Linear(2, 2), [LossProbe()], **bad)
