"""HistogramProbe: each frame's histograms are the kernel reference's of the snapshot's tensors;
the picture over training, its colours and readouts; the viewer, the figures, TensorBoard."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import probescope as ps
from probescope.kernels import tensor_histogram_reference
from probescope.probes.histogram import (
    GREY,
    DistributionPicture,
    Distributions,
    distributions_readout,
    distributions_rgba,
    rebin,
)
from probescope.probes.neurons import GAP


def train(model, x, y, probe, run_dir, steps=30, lr=0.05, final_frame=True):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with ps.Monitor(model, [probe], run_dir=run_dir, overwrite=True, final_frame=final_frame) as monitor:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            monitor.step(loss=loss)
            monitor.drain()  # every due frame taken: none skipped on a busy machine
            opt.step()
    return ps.open_run(run_dir).probe(probe.name)


@pytest.fixture
def task():
    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randint(0, 4, (64,))
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, x, y


def test_each_frame_holds_the_histograms_of_the_snapshots_tensors(task, tmp_path):
    model, x, y = task
    twin = copy.deepcopy(model)
    probe = ps.HistogramProbe(targets=("weights", "grads", "activations"), batch=x[:20], bins=17)
    record = train(model, x, y, probe, tmp_path / "run", final_frame=False, steps=31)
    names = [str(n) for n in record.static["names"]]
    assert names == [
        *(f"weight/{p}" for p in ("0.weight", "0.bias", "2.weight", "2.bias")),
        *(f"grad/{p}" for p in ("0.weight", "0.bias", "2.weight", "2.bias")),
        "act/0", "act/1", "act/2",
    ]  # fmt: skip
    frame = record.frame(-1)
    assert frame.step == 30 and record.config["bins"] == 17 and record.config["tensors"] == 11
    # The frame of step 30 is the snapshot at the 30th Monitor.step: after 29 updates, with the
    # gradient of the 30th backward (taken before its update). A twin trained the same way:
    opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    for i in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        if i < 29:
            opt.step()
    acts = [twin[0](x[:20])]
    acts += [twin[1](acts[0]), twin[2](twin[1](acts[0]))]
    tensors = [p.detach() for p in twin.parameters()] + [p.grad for p in twin.parameters()] + acts
    for i, tensor in enumerate(tensors):
        ref = tensor_histogram_reference(tensor.detach(), 17).numpy()
        np.testing.assert_allclose(frame.data["range"][i], ref[:2], rtol=1e-6, err_msg=names[i])
        # One float's rounding may move an entry at a bin edge; a frame holds every entry.
        assert np.abs(frame.data["counts"][i] - ref[3:]).sum() <= 2, names[i]
        assert frame.data["counts"][i].sum() == tensor.numel() and frame.data["nonfinite"][i] == 0
    assert frame.data["counts"].dtype == np.int64


def test_a_gradient_not_there_yet_has_no_range_and_nothing_counted(task, tmp_path):
    model, x, y = task
    record = train(model, x, y, ps.HistogramProbe("0", targets=("grads",)), tmp_path / "run")
    first = record.frame(0)  # step 0: before the first backward
    assert first.step == 0 and np.isnan(first.data["range"]).all()
    assert (first.data["counts"] == 0).all() and (first.data["nonfinite"] == 0).all()
    assert (record.frame(-1).data["counts"].sum(axis=1) == [48, 16]).all()


def test_a_frozen_parameter_has_an_empty_gradient_histogram_until_it_trains(task, caplog):
    model, x, y = task
    model[0].bias.requires_grad_(False)
    probe = ps.HistogramProbe("0", targets=("weights", "grads"), bins=5)
    probe.attach(model)
    assert probe.names == ["weight/0.weight", "weight/0.bias", "grad/0.weight", "grad/0.bias"]
    nn.functional.cross_entropy(model(x), y).backward()
    frame = probe.evaluate(model, ps.ProbeContext(1, 0))
    assert frame["counts"].sum(axis=1).tolist() == [48, 16, 48, 0]
    model[0].bias.requires_grad_(True)  # unfrozen
    nn.functional.cross_entropy(model(x), y).backward()
    frame = probe.evaluate(model, ps.ProbeContext(2, 0))
    assert frame["counts"].sum(axis=1).tolist() == [48, 16, 48, 16]
    assert "no gradient at the step boundary" not in caplog.text


def test_non_finite_weights_are_counted_apart(tmp_path):
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, :3] = torch.tensor([float("nan"), float("inf"), 0.5])
    probe = ps.HistogramProbe("*", bins=4)
    probe.attach(model)
    frame = probe.evaluate(model, ps.ProbeContext(0, 0))
    assert frame["nonfinite"].tolist() == [2, 0] and frame["counts"].sum(axis=1).tolist() == [6, 2]


def test_bad_arguments_are_refused_with_the_reason(task):
    model, _, _ = task
    for bins in (0, 2000, 2.5, True):
        with pytest.raises(ValueError, match="bins must be an int from 1 to 1024"):
            ps.HistogramProbe(bins=bins)
    with pytest.raises(ValueError, match="activations need a fixed input batch"):
        ps.HistogramProbe(targets=("activations",))
    with pytest.raises(ValueError, match="targets must be among"):
        ps.HistogramProbe(targets=("weights", "biases"))
    with pytest.raises(ValueError, match=r"hook patterns \['enc\*'\] match no module"):
        ps.HistogramProbe("enc*").attach(model)


def test_the_spec_rebuilds_the_probe_with_its_batch(task, tmp_path):
    model, x, y = task
    probe = ps.HistogramProbe("2", targets=("weights", "activations"), batch=x[:5], bins=9, name="h")
    train(model, x, y, probe, tmp_path / "run", steps=3)
    (rebuilt,) = ps.load_probes(tmp_path / "run")
    assert isinstance(rebuilt, ps.HistogramProbe) and rebuilt.bins == 9 and rebuilt.name == "h"
    assert torch.equal(rebuilt.points.batch, x[:5]) and rebuilt.points.targets == ("weights", "activations")


# ---------------------------------------------------------------- the picture over training


def bin_overlap_reference(counts, start, end, lo, hi, rows):
    """rebin's definition by a loop: each bin's count shared by overlap length."""
    out = np.zeros(rows)
    bins = len(counts)
    width = (end - start) / bins
    for b, r in itertools.product(range(bins), range(rows)):
        a0, a1 = start + b * width, start + (b + 1) * width
        r0, r1 = lo + (hi - lo) * r / rows, lo + (hi - lo) * (r + 1) / rows
        out[r] += counts[b] * max(0.0, min(a1, r1) - max(a0, r0)) / width
    return out


@pytest.mark.parametrize(("bins", "rows"), [(1, 1), (7, 5), (40, 48), (3, 64)])
def test_rebin_shares_each_bins_count_by_overlap_and_keeps_the_total(bins, rows):
    rng = np.random.default_rng(bins)
    counts = rng.integers(0, 50, (4, bins)).astype(np.float64)
    starts = rng.uniform(-3, 0, 4)
    ranges = np.stack([starts, starts + rng.uniform(0.5, 3, 4)], 1)
    ranges[2] = np.nan  # a frame with nothing finite
    lo, hi = np.nanmin(ranges[:, 0]), np.nanmax(ranges[:, 1])
    out = rebin(counts, ranges, lo, hi, rows)
    for t in (0, 1, 3):
        expected = bin_overlap_reference(counts[t], *ranges[t], lo, hi, rows)
        np.testing.assert_allclose(out[t], expected, rtol=1e-9, atol=1e-9)
        assert out[t].sum() == pytest.approx(counts[t].sum())
    assert np.isnan(out[2]).all()


def test_rebin_onto_the_same_bins_is_the_identity():
    counts = np.array([[3.0, 0.0, 5.0, 1.0]])
    np.testing.assert_allclose(rebin(counts, np.array([[-1.0, 3.0]]), -1.0, 3.0, 4), counts, atol=1e-12)


def frame_of(counts, ranges, nonfinite=None):
    counts = np.asarray(counts, np.int64)
    nonfinite = np.zeros(len(counts), np.int64) if nonfinite is None else np.asarray(nonfinite)
    return {"counts": counts, "range": np.asarray(ranges, np.float64), "nonfinite": nonfinite}


def test_the_history_spreads_its_columns_restarts_on_a_replay_and_keeps_a_steps_newest_copy():
    history = Distributions(rows=4, max_columns=5)
    for step in range(0, 100, 10):
        history.add(step, frame_of([[step, 1]], [[0.0, 1.0]]))
    picture = history.picture()
    assert picture.steps.tolist() == [0, 20, 40, 70, 90]  # evenly spread, the first and the newest
    assert picture.cells.shape == (1, 4, 5)
    history.add(90, frame_of([[1, 1]], [[0.0, 1.0]]))  # the same step again
    assert len(history) == 10 and history.frames[-1]["counts"].tolist() == [[1, 1]]
    history.add(30, frame_of([[1, 1]], [[0.0, 1.0]]))  # a replay went back
    assert len(history) == 1 and history.steps == [30.0]


def test_the_picture_puts_the_highest_values_on_top_over_the_range_of_every_frame():
    history = Distributions(rows=4)
    history.add(0, frame_of([[4, 0]], [[0.0, 2.0]]))  # everything in [0, 1)
    history.add(1, frame_of([[0, 4]], [[2.0, 4.0]]))  # everything in [3, 4]
    picture = history.picture()
    assert picture.spans.tolist() == [[0.0, 4.0]]
    # rows over [0, 4]: row 0 is [3, 4] on top
    np.testing.assert_allclose(picture.cells[0, :, 0], [0, 0, 0, 4])
    np.testing.assert_allclose(picture.cells[0, :, 1], [4, 0, 0, 0])


def test_colours_white_empty_red_most_magenta_nothing_finite_grey_not_there():
    from probescope.kernels.colormap import DIVERGING_ANCHORS

    history = Distributions(rows=3)
    history.add(0, frame_of([[0, 0, 0], [0, 0, 0]], [[np.nan, np.nan], [np.nan, np.nan]], [5, 0]))
    history.add(1, frame_of([[9, 0, 0], [1, 2, 3]], [[0.0, 3.0], [0.0, 3.0]]))
    picture = history.picture()
    rgba = distributions_rgba(picture)
    assert rgba.shape == (3, 2 * 2 + GAP, 4)  # two tiles of 3 rows x 2 columns, side by side
    red = np.asarray(DIVERGING_ANCHORS[-1], float)
    assert np.abs(rgba[2, 1, :3] - red).max() <= 1  # tensor 0's mode (values [0, 1): the bottom row)
    white = np.asarray(DIVERGING_ANCHORS[len(DIVERGING_ANCHORS) // 2])
    assert (rgba[:2, 1, :3] == white).all()  # nothing above it: the ramp's white
    assert (rgba[:, 0] == [255, 0, 255, 255]).all()  # step 0: every entry NaN or infinite
    right = 2 + GAP
    assert (rgba[:, right] == GREY).all()  # tensor 1 at step 0: not measured (a gradient before any)
    # tensor 1 at step 1: 1, 2, 3 entries, shaded by log(1 + count) against its fullest cell
    shades = rgba[::-1, right + 1, 1].astype(float)  # green falls from 255 (white) as shade rises
    assert shades[0] > shades[1] > shades[2] and np.abs(rgba[0, right + 1, :3] - red).max() <= 1


def test_the_readout_names_the_tensor_the_step_the_slice_and_its_share():
    picture = DistributionPicture(
        cells=np.array([[[1.0, 0.0], [3.0, 0.0]], [[2.0, np.nan], [2.0, np.nan]]]),
        spans=np.array([[0.0, 2.0], [-1.0, 1.0]]),
        steps=np.array([10.0, 20.0]),
        missing=np.array([[False, True], [False, False]]),
    )
    names = ["weight/a", "grad/b"]
    top, bottom = 1.5, 0.5  # one row of two tiles, 2 rows each: row 0 on top
    assert distributions_readout(names, picture, 0.5, top) == "weight/a at step 10: [1, 2) holds 25.0%"
    assert distributions_readout(names, picture, 0.5, bottom) == "weight/a at step 10: [0, 1) holds 75.0%"
    assert distributions_readout(names, picture, 1.5, 0.5) == "weight/a at step 20: not there"
    left = 2 + GAP
    assert distributions_readout(names, picture, left + 0.5, 0.5) == "grad/b at step 10: [-1, 0) holds 50.0%"
    assert distributions_readout(names, picture, left + 1.5, 0.5) == "grad/b at step 20: nothing finite"
    assert distributions_readout(names, picture, 2.5, 0.5) is None  # in the gap
    assert distributions_readout(names, picture, 0.5, 5.0) is None  # above the mosaic


# ---------------------------------------------------------------- where it is drawn


@pytest.fixture
def recorded(task, tmp_path):
    model, x, y = task
    probe = ps.HistogramProbe(targets=("weights", "grads"), bins=12, schedule=ps.Schedule.every(3))
    return train(model, x, y, probe, tmp_path / "run", steps=20), tmp_path / "run"


def history_of(record, upto=None):
    history = Distributions()
    for frame in list(record.frames())[: upto or len(record)]:
        history.add(frame.step, frame.data)
    return history.picture()


def test_the_figure_draws_the_whole_history_and_the_run_exports_it(recorded, tmp_path):
    from probescope.export import export_final_pictures, export_probe
    from probescope.figures import plot_frame

    record, run_dir = recorded
    figure = plot_frame(record)
    (image,) = figure.axes[0].images
    np.testing.assert_array_equal(np.asarray(image.get_array()), distributions_rgba(history_of(record)))
    texts = [t.get_text().split("\n")[0] for t in figure.axes[0].texts]
    assert texts == [str(n) for n in record.static["names"]]
    written = export_final_pictures(ps.open_run(run_dir), tmp_path / "pictures")
    assert [p.name for p in written] == ["histograms_final.png"]  # no small multiples: it is one already
    (gif,) = export_probe(record, tmp_path / "anim", ["gif"], interpolate=2)
    import imageio.v3 as iio

    assert iio.improps(gif).shape[0] == 3 * (len(record) - 1) + 1


def test_the_final_picture_of_many_tensors_grows_so_that_no_two_names_overlap(tmp_path):
    """100 tensors (50 layers' weights and biases) at FIGURE_SIZE ran their names together."""
    from probescope.figures import FIGURE_SIZE, picture_size, plot_frame

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(50)])
    x, y = torch.randn(16, 4), torch.randint(0, 4, (16,))
    record = train(
        model, x, y, ps.HistogramProbe(bins=8, schedule=ps.Schedule.every(2)), tmp_path / "run", steps=4
    )
    width, height = picture_size(record)
    assert width > FIGURE_SIZE[0] and height > FIGURE_SIZE[1]
    figure = plot_frame(record)
    assert tuple(round(v) for v in figure.get_size_inches() * figure.dpi) == (width, height)
    figure.canvas.draw()
    boxes = [t.get_window_extent() for t in figure.axes[0].texts]
    assert len(boxes) == 100
    overlapping = [(i, j) for i in range(100) for j in range(i + 1, 100) if boxes[i].overlaps(boxes[j])]
    assert overlapping == []
    few = train(nn.Linear(4, 4), x, y, ps.HistogramProbe(bins=8), tmp_path / "few", steps=2)
    assert picture_size(few) == FIGURE_SIZE


def test_the_viewer_draws_the_history_and_reads_it(recorded):
    viewer_module = pytest.importorskip("probescope.viewers.viewer")
    from probescope.viewers.backend import ViewerUnavailable, use_backend

    try:
        use_backend(offscreen=True)
    except ViewerUnavailable as err:
        pytest.skip(f"no EGL: {err}")
    record, run_dir = recorded
    viewer = viewer_module.Viewer(viewer_module.RunSource(run_dir), offscreen=True, size=(640, 480))
    viewer.show_step(record.frame(-1).step)
    image = viewer.render()
    panel = viewer.panels["histograms"]
    assert type(panel).__name__ == "HistogramsPanel" and len(panel.history) == len(record)
    picture = history_of(record)
    mosaic = distributions_rgba(picture)
    height, width = mosaic.shape[:2]
    # every other pixel off the view's edges (its border line covers the outermost rows)
    for r, c in itertools.product(range(1, height - 1, 2), range(0, width, 2)):
        cx, cy = panel.data_to_canvas(c + 0.5, height - r - 0.5)
        np.testing.assert_allclose(image[int(cy), int(cx), :3], mosaic[r, c, :3], atol=2, err_msg=f"{r}, {c}")
    names = [str(n) for n in record.static["names"]]
    assert f"{len(names)} tensors, {len(record)} frames" in panel.caption.text
    assert panel.readout(0.5, height - 0.5) == distributions_readout(names, picture, 0.5, height - 0.5)
    assert panel.readout(0.5, height - 0.5).startswith(f"{names[0]} at step 0: [")
    viewer.close()


def test_tensorboard_gets_each_tensors_histogram_as_it_was_made(recorded, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from probescope.sinks import export_tensorboard

    record, run_dir = recorded
    export_tensorboard(ps.open_run(run_dir), tmp_path / "tb", progress=False)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    names = [str(n) for n in record.static["names"]]
    assert sorted(events.Tags()["histograms"]) == sorted(f"histograms/{n}" for n in names)
    written = events.Histograms("histograms/weight/2.weight")
    frames = list(record.frames())
    assert [h.step for h in written] == [f.step for f in frames]
    i = names.index("weight/2.weight")
    last, frame = written[-1].histogram_value, frames[-1].data
    lo, hi = frame["range"][i]
    assert (last.min, last.max, last.num) == (pytest.approx(lo), pytest.approx(hi), frame["counts"][i].sum())
    assert list(last.bucket) == frame["counts"][i].tolist()
    np.testing.assert_allclose(last.bucket_limit, np.linspace(lo, hi, 13)[1:])
    # a gradient not there yet (step 0) is no histogram
    assert events.Histograms("histograms/grad/0.weight")[0].step == frames[1].step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_histograms_are_counted_on_the_device_as_the_reference_counts(task):
    model, x, _ = task
    model = model.cuda()
    model[0].weight.grad = torch.randn_like(model[0].weight)
    probe = ps.HistogramProbe("0", targets=("weights", "grads", "activations"), batch=x[:9], bins=23)
    probe.attach(model)
    frame = probe.evaluate(model, ps.ProbeContext(1, 0))
    tensors = [model[0].weight, model[0].bias, model[0].weight.grad, torch.zeros(0), model[0](x[:9].cuda())]
    for i, tensor in enumerate(tensors):
        if i == 3:  # the bias has no gradient: not there
            assert np.isnan(frame["range"][i]).all() and frame["counts"][i].sum() == 0
            continue
        ref = tensor_histogram_reference(tensor.detach().cpu(), 23).numpy()
        np.testing.assert_array_equal(frame["range"][i], ref[:2])
        np.testing.assert_array_equal(frame["counts"][i], ref[3:])
