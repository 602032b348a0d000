"""History: cheap appends on the training thread, reads that convert each entry once."""

import numpy as np
import pytest
import torch

from probescope.history import History


def _devices():
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", _devices())
def test_reads_up_to_a_cut_see_every_value_once_converted(device):
    history = History()
    rng = np.random.default_rng(0)
    expected = rng.normal(size=300)
    for i, value in enumerate(expected):
        # Mixed kinds, as a loop passes them: tensors (0-d or one element) and floats.
        given = torch.tensor([value], device=device) if i % 3 else float(value)
        history.append("loss", i + 1, i // 100, given)
    cuts = [history.lengths()]  # a job's cut, taken before later appends
    history.append("loss", 301, 3, torch.tensor(9.0, device=device))
    for length in (0, 1, 7, 64, 65, 300):  # growth past the first buffer, reads that shrink
        series = history.read({"loss": length})["loss"]
        np.testing.assert_allclose(series.values, expected[:length], rtol=1e-6)
        np.testing.assert_array_equal(series.steps, np.arange(1, length + 1))
        np.testing.assert_array_equal(series.epochs, np.arange(length) // 100)
    assert len(history.read(cuts[0])["loss"].values) == 300
    full = history.read()["loss"]
    assert full.values[-1] == 9.0 and full.steps[-1] == 301
    with pytest.raises(ValueError, match="read-only"):
        full.values[0] = 1.0  # a reader cannot change what the next reader sees


def test_a_tensor_with_more_than_one_element_is_refused():
    with pytest.raises(ValueError, match="expected a scalar"):
        History().append("loss", 1, 0, torch.ones(2))


@pytest.mark.parametrize("value", ["high", [0.1, 0.2], {"loss": 0.1}])
def test_a_value_that_is_no_number_is_refused_with_its_name_and_type(value):
    with pytest.raises(TypeError, match=rf"^accuracy: expected a number .*, got {type(value).__name__} "):
        History().append("accuracy", 1, 0, value)


def test_cpu_tensors_are_kept_as_floats():
    history = History()
    history.append("loss", 1, 0, torch.tensor(0.5, requires_grad=True) * 2)
    assert history._columns["loss"].raw == [1.0]


@pytest.mark.parametrize("device", _devices())
def test_device_scalars_are_stacked_into_blocks_and_read_back_exactly(device, monkeypatch):
    # On CPU, tensors are kept as they are (as CUDA ones always are): the same blocks and reads.
    monkeypatch.setattr("probescope.history._deferred", lambda value: True)
    found = []
    history = History(on_nonfinite=lambda *report: found.append(report))
    n = History.COMPACT
    values = torch.randn(4 * n + 7, dtype=torch.float64, device=device)
    values[n + 17] = float("nan")  # inside the second block
    for i in range(values.shape[0]):
        if i == 2 * n + 5:
            given = float(values[i])  # a host value ends a run of device scalars
        elif i == 2 * n + 9:
            given = values[i].reshape(1).clone()  # another shape: the run it is in stays loose
        else:
            given = values[i].clone()  # one allocation each, as a loss is
        history.append("loss", i, i // 100, given)
    column = history._columns["loss"]
    # Blocks: [0, n), [n, 2n), not the run [2n + 6, 3n + 6) with the odd shape, then the next.
    assert [(first, len(block)) for first, block in column.blocks] == [(0, n), (n, n), (3 * n + 6, n)]
    assert sum(isinstance(v, torch.Tensor) for v in column.raw) == n + 6  # the rest stay loose
    want = values.cpu().numpy()
    for length in (1, n - 1, n + 17, n + 18, 2 * n + 10, 3 * n + 12, 4 * n + 6, 4 * n + 7):  # across blocks
        series = history.read({"loss": length})["loss"]
        np.testing.assert_array_equal(series.values, want[:length])
        np.testing.assert_array_equal(series.steps, np.arange(length))
        assert found == ([] if length <= n + 17 else [("loss", n + 17, found[0][2])])
    assert np.isnan(found[0][2])
    assert not column.blocks and all(v is None for v in column.raw)  # everything converted is let go
    # Host values after them (read at once, in C: no device scalar among them), then one more.
    for i in range(5):
        history.append("loss", 4 * n + 7 + i, 0, 0.25 * i)
    assert history.read()["loss"].values[-5:].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    history.append("loss", 4 * n + 12, 0, torch.tensor(2.0, dtype=torch.float64, device=device))
    history.append("loss", 4 * n + 13, 0, 3.0)
    assert history.read()["loss"].values[-3:].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("device", _devices())
def test_the_first_value_that_is_not_finite_is_reported_once_per_series_with_its_step(device):
    found = []
    history = History(on_nonfinite=lambda *report: found.append(report))
    for step, value in enumerate([0.5, 0.4, float("nan"), float("inf"), 0.3], start=1):
        given = torch.tensor(value, device=device) if step % 2 else value  # tensors and floats
        history.append("loss", step, 0, given)
        history.append("accuracy", step, 0, 0.5)
    history.append("valid_loss", 5, 0, float("-inf"))
    history.read()
    history.read()  # read again: nothing new to report
    reports = {name: (step, value) for name, step, value in found}  # a host value's at once
    assert len(found) == 2 and set(reports) == {"loss", "valid_loss"}
    assert reports["loss"][0] == 3 and np.isnan(reports["loss"][1])
    assert reports["valid_loss"] == (5, float("-inf"))
    assert set(history.nonfinite()) == {"loss", "valid_loss"}  # accuracy stayed finite
    assert history.nonfinite()["valid_loss"] == (5, float("-inf"))


@pytest.mark.parametrize("order", ["steps", "shuffled"])
def test_epoch_means_match_a_per_epoch_reference_with_nans_and_empty_epochs(order):
    from probescope.history import Series, epoch_means

    rng = np.random.default_rng(3)
    epochs = np.sort(rng.integers(0, 40, 5000)).astype(np.int64)
    steps = np.arange(1, 5001, dtype=np.int64)
    values = rng.normal(size=5000)
    values[rng.random(5000) < 0.05] = np.nan
    values[epochs == epochs[100]] = np.inf  # an epoch with no finite value: NaN
    if order == "shuffled":  # (not a history's order: its epochs never decrease)
        shuffle = rng.permutation(5000)
        steps, epochs, values = steps[shuffle], epochs[shuffle], values[shuffle]
    got = epoch_means(Series(steps, epochs, values))
    want_epochs = np.unique(epochs)
    assert got.epochs.tolist() == want_epochs.tolist()
    assert got.steps.tolist() == [int(steps[epochs == e].max()) for e in want_epochs]
    for e, mean in zip(want_epochs, got.values, strict=True):
        kept = values[(epochs == e) & np.isfinite(values)]
        if kept.size:
            assert mean == pytest.approx(kept.mean(), rel=1e-12, abs=1e-13)
        else:
            assert np.isnan(mean)
    empty = Series(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    assert len(epoch_means(empty).values) == 0
