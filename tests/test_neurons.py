"""NeuronProbe: every unit's map over the grid, held to the layer's own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from probescope import Monitor, NeuronProbe, Schedule, open_run
from probescope.export import export_probe
from probescope.figures import plot_frame
from probescope.kernels.colormap import DIVERGING_ANCHORS, NONFINITE_RGBA
from probescope.probes.neurons import GAP, neuron_mosaic
from tests.conftest import train_steps


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 7))


@pytest.mark.parametrize(("units", "resolution"), [(5, 17), ([11, 0, 4], 24), (12, 1)])
def test_each_map_is_the_units_output_at_every_grid_point(blobs, units, resolution):
    model = _model()
    probe = NeuronProbe(blobs.x_train, "1", units=units, resolution=resolution, schedule=Schedule.every(1))
    with Monitor(model, [probe], snapshot="sync") as monitor:
        train_steps(monitor, model, blobs.x_train, blobs.y_train, 3)
    frame = monitor.latest(probe.name).data
    chosen = list(range(units)) if isinstance(units, int) else units
    with torch.no_grad():
        hidden = torch.tanh(model[0](probe.grid.points()))  # pixel (r, c) is point r * W + c
    expected = hidden[:, chosen].T.reshape(len(chosen), resolution, resolution)
    np.testing.assert_allclose(frame["activations"], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert float(frame["scale"]) == pytest.approx(float(expected.abs().max()))
    np.testing.assert_array_equal(
        frame["rgba"], neuron_mosaic(expected, float(expected.abs().max()), probe.columns).numpy()
    )
    assert probe.static()["units"].tolist() == chosen


@pytest.mark.parametrize(("units", "columns"), [(1, 1), (5, 2), (7, 3)])
def test_the_mosaic_places_each_unit_and_colours_it_by_sign(units, columns):
    size = 3
    activations = torch.zeros(units, size, size)
    activations[:, 0, 0] = 2.0  # +scale: red
    activations[:, 1, 1] = -5.0  # beyond -scale: clipped to blue
    activations[-1, 2, 2] = float("nan")
    mosaic = neuron_mosaic(activations, 2.0, columns).numpy()
    rows = -(-units // columns)
    assert mosaic.shape == (rows * (size + GAP) - GAP, columns * (size + GAP) - GAP, 4)
    painted = np.zeros(mosaic.shape[:2], bool)
    for u in range(units):
        r, c = divmod(u, columns)
        tile = mosaic[r * (size + GAP) : r * (size + GAP) + size, c * (size + GAP) : c * (size + GAP) + size]
        painted[r * (size + GAP) : r * (size + GAP) + size, c * (size + GAP) : c * (size + GAP) + size] = True
        np.testing.assert_array_equal(tile[0, 0, :3], DIVERGING_ANCHORS[-1])
        np.testing.assert_array_equal(tile[1, 1, :3], DIVERGING_ANCHORS[0])
        np.testing.assert_array_equal(tile[0, 1, :3], DIVERGING_ANCHORS[2])  # zero: the middle
        if u == units - 1:
            np.testing.assert_array_equal(tile[2, 2], NONFINITE_RGBA)
    assert np.all(mosaic[~painted] == 255)  # white between (and after) the maps


def test_bad_layers_and_units_are_refused_with_the_reason(blobs):
    model = _model()
    with pytest.raises(ValueError, match=r"no module named 'hidden'; the modules are '0', '1', '2'"):
        Monitor(model, [NeuronProbe(blobs.x_train, "hidden")])
    with pytest.raises(ValueError, match=r"units \[12\] are not among the 12 outputs of '1'"):
        Monitor(model, [NeuronProbe(blobs.x_train, "1", units=[0, 12])])
    with pytest.raises(ValueError, match="units must be a count or a list"):
        NeuronProbe(blobs.x_train, "1", units=[-1])
    with pytest.raises(ValueError, match="scale must be a positive number"):
        NeuronProbe(blobs.x_train, "1", scale=0.0)
    with pytest.raises(TypeError, match=r"got Tensor \(the data come first: NeuronProbe\(data, layer\)\)"):
        NeuronProbe("1", blobs.x_train)


def test_a_recorded_run_exports_interpolated_mosaics(blobs, tmp_path):
    import imageio.v3 as iio

    model = _model()
    probe = NeuronProbe(blobs.x_train, "1", units=6, resolution=16, schedule=Schedule.every(2))
    with Monitor(model, [probe], run_dir=tmp_path / "run") as monitor:
        train_steps(monitor, model, blobs.x_train, blobs.y_train, 6)
    record = open_run(tmp_path / "run").probe(probe.name)
    files = export_probe(record, tmp_path / "out", ["gif"], interpolate=2)
    frames = iio.imread(files[0], index=None)
    assert frames.shape[0] == len(record) + 2 * (len(record) - 1)
    figure = plot_frame(record)
    assert "units of '1'" in figure.axes[0].get_xlabel()


def test_a_fixed_scale_colours_every_frame_alike(blobs):
    model = _model()
    probe = NeuronProbe(blobs.x_train, "1", units=4, resolution=12, scale=0.25)
    with Monitor(model, [probe], snapshot="sync") as monitor:
        pass
    frame = monitor.latest(probe.name).data
    assert float(frame["scale"]) == 0.25
    acts = torch.as_tensor(frame["activations"])
    np.testing.assert_array_equal(frame["rgba"], neuron_mosaic(acts, 0.25, probe.columns).numpy())
    saturated = acts.abs() >= 0.25  # beyond the scale: full colour
    assert saturated.any() and not saturated.all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_maps_come_from_the_snapshot_on_the_probe_stream(blobs):
    model = _model().cuda()
    probe = NeuronProbe(blobs.x_train, "1", units=[3, 1, 7], resolution=21, schedule=Schedule.every(2))
    x, y = blobs.x_train.cuda(), blobs.y_train.cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, [probe], optimizer=optimizer) as monitor:
        for _ in range(6):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss=loss.detach())
    assert monitor.stats[probe.name].failed == 0
    frame = monitor.latest(probe.name)
    assert frame.step == 6  # the final frame: the weights as training left them
    with torch.no_grad():
        hidden = torch.tanh(model[0](probe.grid.points().cuda())).cpu()
    expected = hidden[:, [3, 1, 7]].T.reshape(3, 21, 21)
    np.testing.assert_allclose(np.asarray(frame.data["activations"]), expected.numpy(), rtol=1e-4, atol=1e-5)
    mosaic = neuron_mosaic(expected, float(frame.data["scale"]), probe.columns).numpy().astype(int)
    # the CUDA colour kernel against the CPU one: equal to one level of rounding
    np.testing.assert_allclose(np.asarray(frame.data["rgba"]).astype(int), mosaic, rtol=0, atol=1)
