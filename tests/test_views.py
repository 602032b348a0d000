"""Probes of the user's own kind: how their frames are laid out, coloured and counted
(probescope.probes.views), checked against numpy and the colour kernel's torch reference, and
drawn by the figures and the exporters. The viewer's panel is tested in test_viewer.py."""

import io
from typing import ClassVar

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

from probescope import Monitor, Probe, Schedule, open_run
from probescope.export import export_final_pictures, export_run
from probescope.figures import FrameRenderer, figure_panel, plot_frame
from probescope.kernels.colormap import DIVERGING_ANCHORS, probs_to_rgba_reference
from probescope.probes.views import (
    MAGENTA,
    check_views,
    default_view,
    fixed_range,
    frame_layout,
    heatmap_range,
    heatmap_rgba,
    histogram,
    image_rgba,
    is_own_kind,
    picture_readout,
    scalars_caption,
)


@pytest.mark.parametrize(
    ("value", "view"),
    [
        (np.float32(2.5), "series"),
        (np.array([3], np.int64), "series"),
        (np.array(True), "series"),
        (np.zeros(7, np.float32), "histogram"),
        (np.zeros((3, 5), np.float64), "heatmap"),
        (np.zeros((4, 6, 3), np.uint8), "image"),
        (np.zeros((4, 6, 4), np.uint8), "image"),
        (np.zeros((4, 6, 3), np.float32), "maps"),  # numbers, not bytes: 4 maps of 6x3
        (np.zeros((2, 3, 5), np.uint8), "maps"),  # bytes, but not 3 or 4 channels
        (np.zeros((2, 3, 4, 5)), "hidden"),
        (np.array(["a", "b"]), "hidden"),
        (np.zeros(0), "hidden"),
    ],
)
def test_an_entry_is_drawn_by_its_shape(value, view):
    assert default_view(np.asarray(value)) == view


def test_the_first_picture_is_drawn_and_the_numbers_are_listed():
    data = {
        "loss": np.float32(0.5),
        "margins": np.arange(5.0),
        "weights": np.ones((2, 2)),
        "wrong": np.int64(3),
    }
    layout = frame_layout(data)
    assert layout.picture == ("margins", "histogram")
    assert layout.scalars == {"loss": 0.5, "wrong": 3.0}
    assert not layout.misfits
    # views choose another picture, hide one, and draw a 1-D array as a line
    assert frame_layout(data, {"margins": "hidden"}).picture == ("weights", "heatmap")
    assert frame_layout(data, {"margins": "line"}).picture == ("margins", "line")
    assert frame_layout(data, {"loss": "hidden"}).scalars == {"wrong": 3.0}
    # a view the value does not fit is said, and the entry drawn by its shape
    misfit = frame_layout(data, {"margins": "image"})
    assert misfit.picture == ("margins", "histogram") and misfit.misfits == ["margins"]
    assert frame_layout({"n": np.float32(1.0)}).picture is None


def test_a_heat_map_may_keep_one_range_for_the_run():
    views = check_views("P", {"w": ("heatmap", -2, 2), "m": "histogram"})
    assert views == {"w": ["heatmap", -2.0, 2.0], "m": "histogram"}  # as run.json holds it
    assert fixed_range(views, "w") == (-2.0, 2.0) and fixed_range(views, "m") is None
    assert frame_layout({"w": np.ones((2, 3))}, views).picture == ("w", "heatmap")
    for bad in (("heatmap", 1, 1), ("heatmap", 0, np.inf), ("heatmap", "a", 1)):
        with pytest.raises(ValueError, match=r"views\['w'\]: a heatmap view's value_range must be"):
            check_views("P", {"w": bad})
    with pytest.raises(ValueError, match=r"or \(view, lo, hi\) for one of \('heatmap', 'maps'\)"):
        check_views("P", {"w": ("histogram", 0, 1)})
    # over a fixed range: values beyond it take its ends, the same value the same colour
    frames = [np.array([[-5.0, 0.0, 1.0]]), np.array([[0.0, 1.0, 7.0]])]
    coloured = [heatmap_rgba(f, (-2.0, 2.0)) for f in frames]
    assert all(r == (-2.0, 2.0) for _, r in coloured)
    first, second = (rgba for rgba, _ in coloured)
    np.testing.assert_array_equal(first[0, 2], second[0, 1])  # 1.0 in both frames
    np.testing.assert_allclose(first[0, 0, :3], DIVERGING_ANCHORS[0], atol=1)
    np.testing.assert_allclose(second[0, 2, :3], DIVERGING_ANCHORS[-1], atol=1)
    reference = probs_to_rgba_reference(
        torch.from_numpy(frames[1]).float()[..., None], "value", torch.zeros(1, 3), 0, (-2.0, 2.0)
    ).numpy()
    np.testing.assert_allclose(second.astype(int), reference.astype(int), atol=1)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 5), (7, 4, 4), (10, 1, 9)])
def test_maps_are_tiled_heat_maps_over_one_range(shape):
    from probescope.probes.neurons import GAP
    from probescope.probes.views import maps_rgba, mosaic_columns

    n, h, w = shape
    rng = np.random.default_rng(n * 100 + h * 10 + w)
    values = rng.normal(size=shape)
    values[0, 0, 0] = np.nan
    for value_range in (None, (-0.5, 2.0)):
        mosaic, used = maps_rgba(values, value_range)
        assert used == (value_range or heatmap_range(values))  # one range for every map
        columns = mosaic_columns(n)
        rows = -(-n // columns)
        assert mosaic.shape == (rows * (h + GAP) - GAP, columns * (w + GAP) - GAP, 4)
        for i in range(n):  # each map where it belongs, coloured as a heat map over that range
            r0, c0 = (i // columns) * (h + GAP), (i % columns) * (w + GAP)
            alone, _ = heatmap_rgba(values[i], used)
            np.testing.assert_array_equal(mosaic[r0 : r0 + h, c0 : c0 + w], alone)
            x, y = c0 + w - 0.5, mosaic.shape[0] - (r0 + h - 1) - 0.5  # its last pixel
            assert picture_readout("maps", values, x, y) == (
                f"map {i}, row {h - 1}, column {w - 1}: {values[i, h - 1, w - 1]:.4g}"
            )
        if columns > 1:  # the gap between the first two maps is white, and reads nothing
            assert np.all(mosaic[:h, w : w + GAP] == 255)
            assert picture_readout("maps", values, w + 0.5, mosaic.shape[0] - 0.5) is None
    assert check_views("P", {"a": ("maps", 0, 1)}) == {"a": ["maps", 0.0, 1.0]}


def test_views_are_checked_before_training():
    assert check_views("P", None) == {} and check_views("P", {"a": "line"}) == {"a": "line"}
    with pytest.raises(ValueError, match=r"views\['a'\] must be one of"):
        check_views("P", {"a": "bars"})
    with pytest.raises(ValueError, match="must map frame entries"):
        check_views("P", ["a"])

    class Bad(Probe):
        kind = "bad"
        views: ClassVar = {"x": "pie"}

        def evaluate(self, model, context):
            return {}

    with pytest.raises(ValueError, match=r"Bad: views\['x'\] must be one of"):
        Monitor(nn.Linear(2, 2), Bad())


def test_built_in_kinds_draw_themselves():
    for kind in ("grid", "curve", "prediction", "loss", "stats", "neurons", "checkpoint"):
        assert not is_own_kind(kind)
    assert is_own_kind("margins")
    assert figure_panel("stats") is None and figure_panel("margins").__name__ == "FramePanel"


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 4), (13, 3, 3)])
def test_images_become_rgba(shape):
    rng = np.random.default_rng(sum(shape))
    as_bytes = rng.integers(0, 256, shape, dtype=np.uint8)
    rgba = image_rgba(as_bytes)
    assert rgba.shape == (*shape[:2], 4) and rgba.dtype == np.uint8
    np.testing.assert_array_equal(rgba[..., : shape[2]], as_bytes)
    if shape[2] == 3:
        assert np.all(rgba[..., 3] == 255)
    floats = rng.uniform(-0.5, 1.5, shape)
    floats[0, 0, 0] = np.nan
    rgba = image_rgba(floats)
    expected = np.round(np.clip(floats, 0, 1) * 255)
    np.testing.assert_array_equal(rgba[1:, :, : shape[2]], expected[1:])  # exact: 0-1 read as 0-255
    np.testing.assert_array_equal(rgba[0, 0], MAGENTA)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([-1.0, 3.0], (-3.0, 3.0)),  # both signs: symmetric about 0
        ([0.25, 2.0], (0.25, 2.0)),
        ([-4.0, -1.0], (-4.0, -1.0)),
        ([2.0, 2.0], (1.5, 2.5)),  # one number: a unit around it
        ([np.nan, np.inf], (-1.0, 1.0)),
        ([np.nan, -2.0, 5.0], (-5.0, 5.0)),
    ],
)
def test_heatmap_ranges(values, expected):
    assert heatmap_range(np.asarray(values)) == expected


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 3), (17, 19)])
@pytest.mark.parametrize("signed", [True, False])
def test_heatmaps_colour_as_the_reference_ramp(shape, signed):
    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    values = rng.normal(size=shape) if signed else rng.uniform(0.5, 4.0, shape)
    if values.size > 2:
        values.flat[1] = np.nan
    rgba, value_range = heatmap_rgba(values)
    assert value_range == heatmap_range(values)
    reference = probs_to_rgba_reference(
        torch.from_numpy(values).float()[..., None], "value", torch.zeros(1, 3), 0, value_range
    ).numpy()
    # the kernel against the float32 torch reference: uint8 rounding may differ by 1
    np.testing.assert_allclose(rgba.astype(int), reference.astype(int), atol=1)
    finite = np.isfinite(values)
    if values.size > 2:
        np.testing.assert_array_equal(rgba.reshape(-1, 4)[1], MAGENTA)
    rgb = rgba[..., :3].reshape(-1, 3)
    flat = np.where(finite, values, np.nan).reshape(-1)
    if finite.sum() == 1:  # one number: the middle of its range, white
        np.testing.assert_allclose(rgb[np.nanargmax(flat)], DIVERGING_ANCHORS[len(DIVERGING_ANCHORS) // 2])
    elif np.nanmin(flat) < 0 < np.nanmax(flat):  # symmetric: the farthest from 0 at its end
        far = np.nanargmax(np.abs(flat))
        end = DIVERGING_ANCHORS[-1] if flat[far] > 0 else DIVERGING_ANCHORS[0]
        np.testing.assert_allclose(rgb[far], end, atol=1)
    else:  # the largest red, the smallest blue
        np.testing.assert_allclose(rgb[np.nanargmax(flat)], DIVERGING_ANCHORS[-1], atol=1)
        np.testing.assert_allclose(rgb[np.nanargmin(flat)], DIVERGING_ANCHORS[0], atol=1)


@pytest.mark.parametrize("n", [1, 2, 29, 1000])
def test_histograms_count_as_numpy(n):
    rng = np.random.default_rng(n)
    values = rng.normal(size=n)
    values[::7] = np.inf if n > 1 else values[::7]
    counts, edges, nonfinite = histogram(values, bins=13)
    finite = values[np.isfinite(values)]
    assert nonfinite == n - finite.size and counts.sum() == finite.size
    if finite.size and finite.min() < finite.max():
        ref_counts, ref_edges = np.histogram(finite, bins=13)
        np.testing.assert_array_equal(counts, ref_counts)
        np.testing.assert_allclose(edges, ref_edges)
    else:  # one value: bins centred on it
        assert edges[0] < finite[0] < edges[-1]
    counts, edges, nonfinite = histogram(np.full(4, np.nan))
    assert counts.sum() == 0 and nonfinite == 4


def test_readouts_say_the_value_under_the_pointer():
    values = np.arange(12.0).reshape(3, 4)
    # pixel (r, c) spans x in [c, c + 1], y in [H - r - 1, H - r] (row 0 on top)
    assert picture_readout("heatmap", values, 2.5, 2.5) == "row 0, column 2: 2"
    assert picture_readout("heatmap", values, 0.1, 0.1) == "row 2, column 0: 8"
    assert picture_readout("heatmap", values, 4.5, 0.5) is None
    counts, edges, _ = histogram(np.array([0.0, 0.0, 1.0]), bins=2)
    assert picture_readout("histogram", None, 0.2, 1.0, (counts, edges)) == "[0, 0.5): 2"
    assert picture_readout("histogram", None, 1.0, 1.0, (counts, edges)) == "[0.5, 1]: 1"  # its edge too
    assert picture_readout("histogram", None, 1.5, 1.0, (counts, edges)) is None
    assert picture_readout("line", np.array([5.0, 6.0]), 0.9, 0.0) == "index 1: 6"
    assert scalars_caption({"a": 1.0, "b": 2.5, "c": 3, "d": 4, "e": 5}, limit=2) == "a 1, b 2.5, +3 more"


class Margins(Probe):
    """Each held-out sample's margin (a histogram), how many are wrong and the first layer's
    weights (a heat map)."""

    kind = "margins"
    views: ClassVar = {"weight": ("heatmap", -1.5, 1.5)}  # one colour scale for every frame

    def __init__(self, x, y, *, name=None, schedule=None):
        super().__init__(name=name, schedule=schedule)
        self.x, self.y = x, y

    def evaluate(self, model, context):
        logits, y = model(self.x), self.y[:, None]
        margins = logits.gather(1, y)[:, 0] - logits.scatter(1, y, float("-inf")).amax(1)
        return {"margins": margins, "wrong": (margins < 0).sum(), "weight": model[0].weight.clone()}


class Norms(Probe):
    """Numbers alone: each parameter's norm."""

    kind = "norms"

    def evaluate(self, model, context):
        return {f"p{i}": p.norm() for i, p in enumerate(model.parameters())}


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    torch.manual_seed(0)
    x, y = torch.randn(128, 2), torch.randint(0, 3, (128,))
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), 0.2)
    path = tmp_path_factory.mktemp("own") / "run"
    probes = [Margins(x[:40], y[:40], schedule=Schedule.every(5)), Norms(schedule=Schedule.every(5))]
    with Monitor(model, probes, run_dir=path) as monitor:
        for _ in range(30):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss=loss)
    return path


def test_the_run_records_the_probes_views(own_run):
    run = open_run(own_run)
    assert run.probe("margins").config["views"] == {"weight": ["heatmap", -1.5, 1.5]}
    assert "views" not in run.probe("norms").config


def test_a_figure_draws_the_picture_and_lists_the_numbers(own_run):
    record = open_run(own_run).probe("margins")
    frame = record.frame(-1)
    renderer = FrameRenderer(record)
    renderer.draw(frame.data, frame.step, frame.epoch)
    ax = renderer.panel.ax
    (bars,) = ax.patches
    counts, edges, _ = histogram(frame.data["margins"])
    np.testing.assert_array_equal(bars.get_data().values, counts)
    np.testing.assert_array_equal(bars.get_data().edges, edges)
    assert f"wrong {int(frame.data['wrong'])}" in ax.get_title() and "margins (40)" in ax.get_title()
    assert renderer.image().shape == (512, 768, 3)


def test_a_figure_of_numbers_alone_draws_them_over_every_frame(own_run):
    record = open_run(own_run).probe("norms")
    figure = plot_frame(record)
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["p0", "p1", "p2", "p3"]
    steps = [record.frame(i).step for i in range(len(record))]
    for i, line in enumerate(lines):
        np.testing.assert_array_equal(line.get_xdata(), steps)
        expected = [float(record.frame(k).data[f"p{i}"]) for k in range(len(record))]
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-6)


def test_exports_animate_and_picture_probes_of_the_users_kind(own_run, tmp_path):
    run = open_run(own_run)
    files = export_run(run, tmp_path, ["gif"], interpolate=1)
    assert set(files) == {"margins", "norms"}
    n = len(run.probe("margins"))
    assert len(list(iio.imiter(tmp_path / "margins.gif"))) == 2 * n - 1
    written = {p.name for p in export_final_pictures(run, tmp_path)}
    assert {"margins_final.png", "margins_small_multiples.png", "norms_final.png"} <= written
    assert "norms_small_multiples.png" not in written  # numbers alone: their series is the picture


def test_tensorboard_gets_every_picture_and_number_of_a_probe_of_the_users_kind(own_run, tmp_path):
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from probescope.sinks import export_tensorboard

    run = open_run(own_run)
    export_tensorboard(run, tmp_path)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    record = run.probe("margins")
    frames = [record.frame(i) for i in range(len(record))]
    assert [h.step for h in events.Histograms("margins/margins")] == [f.step for f in frames]
    last = events.Histograms("margins/margins")[-1].histogram_value
    assert last.num == 40 and last.sum == pytest.approx(float(frames[-1].data["margins"].sum()), rel=1e-5)
    images = events.Images("margins/weight")  # the heat map, as the viewer colours it
    assert [i.step for i in images] == [f.step for f in frames]
    decoded = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)))
    np.testing.assert_array_equal(decoded, heatmap_rgba(frames[-1].data["weight"], (-1.5, 1.5))[0])
    assert {e.step: e.value for e in events.Scalars("margins/wrong")} == {
        f.step: float(f.data["wrong"]) for f in frames
    }
    assert "norms/p3" in events.Tags()["scalars"] and events.Tags()["images"] == ["margins/weight"]


def test_compare_lists_the_last_numbers_of_a_probe_of_the_users_kind(own_run):
    from probescope.compare import compare_runs

    run = open_run(own_run)
    row = compare_runs([own_run]).iloc[0]
    last = run.probe("margins").frame(-1).data
    assert row["margins/wrong"] == float(last["wrong"])
    assert "margins/margins" not in row and "margins/weight" not in row  # pictures, not numbers
    norms = run.probe("norms").frame(-1).data
    assert [row[f"norms/p{i}"] for i in range(4)] == [float(norms[f"p{i}"]) for i in range(4)]
