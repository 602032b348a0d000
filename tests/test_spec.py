"""Probe specs: probes written down as JSON and arrays, built again identical."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probescope
from probescope import (
    CurveProbe,
    GridProbe,
    LossProbe,
    Monitor,
    NeuronProbe,
    PredictionProbe,
    Probe,
    ProbeContext,
    Schedule,
    StatsProbe,
    StepInfo,
    load_probes,
    open_run,
    save_probes,
)
from probescope.cli import main
from probescope.spec import describe_spec, spec_digest
from tests.conftest import train_steps


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.argmax(1) == target).double().mean()


def on_odd_steps(info: StepInfo) -> bool:
    return info.step % 2 == 1


class EchoProbe(Probe):
    """Keeps whatever it was given; a frame says nothing. For round trips of argument values."""

    kind = "echo"

    def __init__(self, value, *rest, option=None, name=None, schedule=None, **extra):
        super().__init__(name=name, schedule=schedule)
        self.value, self.rest, self.option, self.extra = value, rest, option, extra

    def evaluate(self, model, context):
        return {}


class Unwritable:
    """Claims to be JSON-able but fails to say how."""

    def to_json(self):
        raise RuntimeError("no JSON today")

    @classmethod
    def from_json(cls, data):
        return cls()


def _classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 4))


def _regressor():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.GELU(), nn.Linear(8, 2))


def _data(n=60, d=3, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, torch.randint(0, classes, (n,), generator=g)


def _probes_of_every_kind():
    """(model, probe) pairs, every argument that a spec must carry set away from its default."""
    x, y = _data()
    xr = torch.linspace(-2, 2, 41).reshape(-1, 1)
    yr = torch.cat([xr.sin(), xr.cos()], 1)
    plane = (x[0].numpy(), x[1].numpy(), x[2].numpy())
    return [
        (
            _classifier(),
            GridProbe(
                x, y, resolution=(13, 7), mode="boundary", plane=plane, margin=0.3, point_sparsity=3,
                smoothing=0.5, name="map", schedule=Schedule.every(7),
            ),
        ),
        (_classifier(), NeuronProbe(x, "0", units=[1, 4, 5], resolution=9, columns=2, scale=2.0)),
        (_classifier(), PredictionProbe(x, y, show_perc=0.5, seed=4, jitter=0.1)),
        (
            _classifier(),
            LossProbe(valid=(x, y), loss_fn=F.cross_entropy, metrics={"acc": accuracy}, batch_size=17),
        ),
        (
            _classifier(),
            StatsProbe(
                ["0", "2"], targets=("weights", "activations"), batch=x[:5], spectral_iterations=2,
                valid=(x, y), loss_fn=F.cross_entropy, schedule=Schedule.log_spaced(3),
            ),
        ),
        (_regressor(), CurveProbe(xr, yr, output=1, loss="mae", loss_smoothing=5, band="rms")),
    ]  # fmt: skip


def _same_arrays(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.mark.parametrize("index", range(6), ids=["grid", "neurons", "prediction", "loss", "stats", "curve"])
def test_every_probe_kind_built_from_its_spec_gives_the_same_frames(tmp_path, index):
    model, probe = _probes_of_every_kind()[index]
    assert save_probes([probe], tmp_path / "spec.json") == []
    (loaded,) = load_probes(tmp_path / "spec.json")
    assert type(loaded) is type(probe) and loaded.name == probe.name
    for p in (probe, loaded):
        p.attach(model)
    assert loaded.config() == probe.config()
    assert loaded.schedule.describe() == probe.schedule.describe()
    _same_arrays(loaded.static(), probe.static())
    for step in (0, 1):
        context = ProbeContext(step, 0, {})
        _same_arrays(loaded.evaluate(model, context), probe.evaluate(model, context))


SCHEDULES = {
    "every": Schedule.every(3),
    "every_epoch": Schedule.every_epoch(2),
    "steps": Schedule.steps(s for s in (0, 5, 9)),  # an iterator: consumed when built
    "mask": Schedule.mask(np.arange(40) % 3 == 0),
    "when": Schedule.when(on_odd_steps),
    "log_spaced": Schedule.log_spaced(4),
    "budget": Schedule.budget(0.03, start=4, max_interval=50),
    "never": Schedule.never(),
    "any": Schedule.every(10) | Schedule.steps([3]) | Schedule.every_epoch(3),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_is_due_at_the_same_steps_after_a_round_trip(tmp_path, name):
    schedule = SCHEDULES[name]
    save_probes([EchoProbe(0, schedule=schedule)], tmp_path)
    (loaded,) = load_probes(tmp_path)
    got = loaded.schedule
    assert type(got) is type(schedule) and got is not schedule
    assert got.describe() == schedule.describe()
    if name == "budget":
        assert (got.fraction, got.start, got.max_interval) == (0.03, 4, 50)
        return  # its steps depend on measured times
    steps = [s for s in range(120) if got.due(StepInfo(s, 0))]
    assert steps == [s for s in range(120) if schedule.due(StepInfo(s, 0))]
    epochs = [e for e in range(12) if got.due_at_epoch_end(e)]
    assert epochs == [e for e in range(12) if schedule.due_at_epoch_end(e)]


def test_argument_values_keep_their_types_through_json_and_npz(tmp_path):
    value = {
        "tuple": (1, 2.5, "three", None, True),
        "list": [[1, 2], [3]],
        "$odd key": 1,
        "floats": [math.inf, -math.inf, np.float32(0.25), np.int64(7)],
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "tokens": torch.tensor([[3, 1, 4]], dtype=torch.int64),
        "array": np.linspace(0, 1, 5, dtype=np.float16),
        "path": Path("some/where.json"),
        "function": F.mse_loss,
        "class": nn.Linear,
    }
    probe = EchoProbe(value, "a", ("b",), option={"k": [1]}, name="echo-1", extra_arg=3)
    assert save_probes([probe], tmp_path) == []
    (got,) = load_probes(tmp_path)
    v = got.value
    assert v["tuple"] == (1, 2.5, "three", None, True) and isinstance(v["tuple"], tuple)
    assert v["list"] == [[1, 2], [3]] and v["$odd key"] == 1
    assert v["floats"] == [math.inf, -math.inf, 0.25, 7]
    assert v["bf16"].dtype == torch.bfloat16 and torch.equal(v["bf16"], value["bf16"])
    assert v["tokens"].dtype == torch.int64 and torch.equal(v["tokens"], value["tokens"])
    assert v["array"].dtype == np.float16 and np.array_equal(v["array"], value["array"])
    assert v["path"] == "some/where.json"
    assert v["function"] is F.mse_loss and v["class"] is nn.Linear
    assert got.rest == ("a", ("b",)) and got.option == {"k": [1]} and got.extra == {"extra_arg": 3}
    assert got.name == "echo-1"


def test_what_cannot_be_written_down_is_named_when_saved_and_when_loaded(tmp_path, caplog):
    x, y = _data()
    probes = [LossProbe(valid=(x, y), loss_fn=lambda p, t: F.cross_entropy(p, t), name="valid")]
    with caplog.at_level(logging.WARNING, logger="probescope"):
        missing = save_probes(probes, tmp_path)
    assert [(m.probe, m.argument) for m in missing] == [("valid", "loss_fn")]
    assert "a lambda at test_spec.py:" in missing[0].what
    assert "valid.loss_fn" in caplog.text and "overrides={'valid': {'loss_fn': ...}}" in caplog.text
    with pytest.raises(ValueError, match=r"valid\.loss_fn \(a lambda at test_spec\.py:\d+\).*overrides="):
        load_probes(tmp_path)
    (loaded,) = load_probes(tmp_path, overrides={"valid": {"loss_fn": F.cross_entropy}})
    model = _classifier()
    loaded.attach(model)
    want = F.cross_entropy(model(x), y).item()
    got = loaded.evaluate(model, ProbeContext(0, 0, {}))["series/valid_loss/values"]
    assert got[-1] == pytest.approx(want, rel=1e-6)


def test_overrides_replace_any_argument_and_unknown_names_are_refused(tmp_path):
    x, y = _data()
    save_probes([GridProbe(x, y, resolution=16), PredictionProbe(x, y)], tmp_path)
    grid, _ = load_probes(tmp_path, overrides={"grid": {"resolution": 5, "mode": "prob"}})
    assert (grid.width, grid.height, grid.mode) == (5, 5, "prob")
    with pytest.raises(ValueError, match=r"overrides name probes \['gird'\]"):
        load_probes(tmp_path, overrides={"gird": {"resolution": 5}})
    with pytest.raises(ValueError, match=r"GridProbe 'grid' has no argument \['resoluton'\]"):
        load_probes(tmp_path, overrides={"grid": {"resoluton": 5}})


def test_wrong_arguments_to_a_probe_name_its_class():
    with pytest.raises(TypeError, match=r"^NeuronProbe\(\): missing a required argument: 'layer'$"):
        probescope.NeuronProbe(torch.zeros(3, 2))
    with pytest.raises(TypeError, match=r"^GridProbe\(\): got an unexpected keyword argument 'resolutions'$"):
        probescope.GridProbe(torch.zeros(3, 2), resolutions=4)


def test_a_probe_class_defined_inside_a_function_is_written_but_cannot_be_built(tmp_path):
    class LocalProbe(EchoProbe):
        kind = "local"

    missing = save_probes([LocalProbe(1)], tmp_path)
    assert [(m.probe, m.argument) for m in missing] == [("local", "class")]
    with pytest.raises(ValueError, match=r"LocalProbe.*define it at the top level of a module"):
        load_probes(tmp_path)


def test_files_that_are_not_specs_are_refused_with_the_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="no probe spec"):
        load_probes(tmp_path)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="recorded without a probe spec"):
        load_probes(tmp_path / "old")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a probescope probe spec"):
        load_probes(tmp_path / "other.json")
    save_probes([EchoProbe(0)], tmp_path / "new.json")
    document = json.loads((tmp_path / "new.json").read_text())
    document["version"] += 1
    (tmp_path / "new.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="newer probescope"):
        load_probes(tmp_path / "new.json")
    document = {"format": "probescope-probes", "version": 1, "probes": [
        {"name": "x", "kind": "x", "class": "probescope.schedule:Schedule", "arguments": {}}
    ]}  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="not a Probe"):
        load_probes(tmp_path / "bad.json")


def test_a_run_records_its_spec_and_a_second_run_built_from_it_records_the_same_frames(tmp_path, blobs):
    def run(path, probes):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 7))
        with Monitor(model, probes, run_dir=path, final_frame=False) as monitor:
            train_steps(monitor, model, blobs.x_train, blobs.y_train, 6)
        return open_run(path)

    probes = [
        GridProbe(blobs.x_train, blobs.y_train, resolution=24, schedule=Schedule.every(2)),
        PredictionProbe(blobs.x_valid, blobs.y_valid, schedule=Schedule.steps([0, 3, 5])),
        LossProbe(
            valid=(blobs.x_valid, blobs.y_valid),
            loss_fn=F.cross_entropy,
            metrics={"acc": accuracy},
            schedule=Schedule.every(3),
        ),
    ]
    first = run(tmp_path / "a", probes)
    assert first.meta["spec"] == {"file": "probes.json", "missing": []}
    second = run(tmp_path / "b", load_probes(tmp_path / "a"))
    assert json.loads((tmp_path / "b" / "probes.json").read_text()) == json.loads(
        (tmp_path / "a" / "probes.json").read_text()
    )
    for name, record in first.probes.items():
        other = second.probe(name)
        assert record.config == other.config
        assert record.steps() == other.steps() and len(record) > 1
        for a, b in zip(record.frames(), other.frames(), strict=True):
            _same_arrays(a.data, b.data)


def test_a_spec_that_cannot_be_written_costs_a_warning_and_the_run_goes_on(tmp_path, mlp, blobs, caplog):
    probes = [EchoProbe(Unwritable(), schedule=Schedule.every(1))]
    with (
        caplog.at_level(logging.WARNING, logger="probescope"),
        Monitor(mlp, probes, run_dir=tmp_path / "run") as monitor,
    ):
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 3)
    assert "probe spec is not written (RuntimeError: no JSON today)" in caplog.text
    run = open_run(tmp_path / "run")
    assert run.meta["status"] == "finished" and "spec" not in run.meta
    assert run.probe("echo").steps() == [0, 1, 2, 3]


def test_spec_command_lists_probes_with_their_arguments_and_array_shapes(tmp_path, capsys):
    x, y = _data(n=30)
    save_probes([GridProbe(x, y, resolution=(8, 4), schedule=Schedule.every(5)), StatsProbe("2")], tmp_path)
    assert main(["spec", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 probes" in out and "grid (grid): probescope.probes.grid:GridProbe" in out
    assert "data = tensor float32[30, 3]" in out and "labels = tensor int64[30]" in out
    assert "resolution = (8, 4)" in out and "schedule = EveryNSteps(n=5)" in out
    assert 'hooks = "2"' in out
    assert out.strip() == describe_spec(tmp_path)


def test_digest_follows_the_content_not_the_files(tmp_path):
    x, y = _data()
    save_probes([GridProbe(x, y, resolution=8)], tmp_path / "a")
    save_probes([GridProbe(x.clone(), y, resolution=8)], tmp_path / "b")  # npz bytes differ (time stamps)
    x[0, 0] += 1e-3
    save_probes([GridProbe(x, y, resolution=8)], tmp_path / "c")
    save_probes([GridProbe(x, y, resolution=9)], tmp_path / "d")
    a, b, c, d = (spec_digest(tmp_path / n) for n in "abcd")
    assert a == b and len({a, c, d}) == 3


def test_top_level_names_are_exported():
    assert probescope.save_probes is save_probes and probescope.load_probes is load_probes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_probe_keeps_no_device_tensor_of_its_arguments_for_the_spec(tmp_path):
    x, y = (t.cuda() for t in _data())
    probe = LossProbe(valid=(x, y), loss_fn=F.cross_entropy)
    kept = probe.spec_arguments()["valid"]
    assert all(t.device.type == "cpu" for t in kept)
    save_probes([probe], tmp_path)
    (loaded,) = load_probes(tmp_path)
    assert torch.equal(loaded.valid.x, x.cpu()) and torch.equal(loaded.valid.y, y.cpu())


def test_a_run_lists_what_its_spec_lacks_without_a_warning(tmp_path, mlp, blobs, caplog):
    valid = (blobs.x_valid, blobs.y_valid)
    probes = [LossProbe(valid=valid, loss_fn=lambda p, t: F.cross_entropy(p, t), schedule=Schedule.every(2))]
    with (
        caplog.at_level(logging.INFO, logger="probescope"),
        Monitor(mlp, probes, run_dir=tmp_path / "run") as monitor,
    ):
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 2)
    # (The Monitor's hint on CPU threads, a warning where training leaves no core, is not the spec's.)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "cores" not in r.getMessage()]
    assert "the probe spec lacks loss.loss_fn (a lambda at test_spec.py:" in caplog.text
    assert open_run(tmp_path / "run").meta["spec"]["missing"] == ["loss.loss_fn"]
    (loaded,) = load_probes(tmp_path / "run", overrides={"loss": {"loss_fn": F.cross_entropy}})
    assert loaded.valid.loss_fn is F.cross_entropy
