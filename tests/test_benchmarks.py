"""The kernels suite's baselines compute what the ops compute: a speed-up over a baseline that
does less (or something else) would be a false figure."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import kernels as suite
from probescope import LossProbe, open_run
from probescope.kernels import (
    GridSpec,
    default_palette,
    ema_frames_reference,
    lds_weights_reference,
    probs_to_rgba_reference,
    smooth_1d_reference,
    tensor_stats_reference,
)
from probescope.kernels.grid_mlp import grid_mlp_reference
from probescope.kernels.mlp import FusableMLP


@pytest.fixture
def g():
    return torch.Generator().manual_seed(3)


def test_naive_grid_baselines_give_the_reference_map():
    model = suite.build_mlp((2, 16, 16, 5), torch.float32, "cpu")
    grid = GridSpec.rectangle((-3.0, 3.0, -2.0, 2.0), 13, 7)
    ref = grid_mlp_reference(FusableMLP.from_module(model), grid).reshape(-1, 5).numpy()
    torch_way = suite.naive_torch(model, grid, torch.float32, "cpu")()
    np.testing.assert_allclose(torch_way.numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(suite.numpy_mlp(model, grid)(), ref, atol=1e-5)


def test_numpy_region_colours_like_the_reference_with_non_finite_pixels(g):
    probs = torch.softmax(3 * torch.randn(19, 11, 7, generator=g), -1)
    probs[2, 3, 1], probs[5, 0, 6] = float("nan"), float("inf")
    palette = default_palette(7)
    expected = probs_to_rgba_reference(probs, "region", palette).numpy()
    got = suite.numpy_region(probs.numpy(), palette.numpy())
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # float32 against float32
    np.testing.assert_array_equal(got[2, 3], [255, 0, 255, 255])


def test_numpy_blend_colours_like_the_reference_with_non_finite_and_empty_pixels(g):
    probs = torch.softmax(3 * torch.randn(13, 17, 5, generator=g), -1)
    probs[2, 3, 1], probs[5, 0, 4] = float("nan"), float("inf")
    probs[7, 7] = 0.0  # no weight: white
    palette = default_palette(5)
    expected = probs_to_rgba_reference(probs, "blend", palette).numpy()
    got = suite.numpy_blend(probs.numpy(), palette.numpy())
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(got[2, 3], [255, 0, 255, 255])
    np.testing.assert_array_equal(got[7, 7], [255, 255, 255, 255])


def test_numpy_frame_and_vector_baselines_match_the_references(g):
    frames = torch.rand(4, 9, 5, 7, generator=g)
    np.testing.assert_allclose(
        suite.numpy_ema(frames.numpy(), 0.3), ema_frames_reference(frames, 0.3), atol=1e-6
    )
    x = torch.randn(50_001, generator=g)
    np.testing.assert_allclose(suite.numpy_stats(x.numpy()), tensor_stats_reference(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(suite.numpy_lds(x.numpy(), 100), lds_weights_reference(x, bins=100), rtol=1e-5)
    window = suite.smoothing_window(31, "gaussian").numpy().astype(np.float32)
    np.testing.assert_allclose(
        np.convolve(x.numpy(), window, mode="same"), smooth_1d_reference(x, 31, "gaussian"), atol=1e-5
    )


# Compiled (not run) for Hopper: the interpreter runs a kernel as Python, so code that only
# the compiler rejects passes the CPU suite; these shapes cover every branch of the kernel.
COMPILED_SHAPES = [(2, 5), (2, 16, 1), (2, 24, 40, 20, 7), (2, 12, 12, 12, 12, 12, 4), (2, 256, 256, 256, 7)]
REPORT_SCRIPT = """
import json, sys, torch
from benchmarks.triton_report import compile_config
from probescope.kernels._triton.grid_mlp import launch_config, padded_hidden
for widths in {shapes}:
    for dtype in (torch.float32, torch.bfloat16):
        for config in (("units", 64, 32, 4, 2), ("pixels", 64, 32, 4, 2), ("kloop", 64, 32, 4, 2)):
            report = compile_config(widths, dtype, config)
            print(json.dumps({{"widths": widths, "dtype": str(dtype), **report}}))
# the launch configurations impl="auto" uses: fp32 up to width 64, 16-bit up to 256
for widths, dtype in {defaults}:
    c = launch_config(padded_hidden(widths[1:]), dtype)
    config = (c["layout"], c["block_m"], c["block_n"], c["num_warps"], c.get("num_stages", 3))
    report = compile_config(widths, dtype, config)
    print(json.dumps({{"widths": widths, "dtype": str(dtype), "default": True, **report}}))
"""
DEFAULT_CASES = (
    "[((2, 32, 32, 3), torch.float32), ((2, 64, 64, 3), torch.float32),"
    " ((2, 64, 64, 3), torch.bfloat16), ((2, 256, 256, 256, 7), torch.bfloat16)]"
)


def test_every_grid_kernel_variant_compiles_for_hopper_and_the_report_reads_it():
    # Triton's own compiler for sm_90a and its cuobjdump need no GPU, but not the interpreter
    # (which the CPU suite runs under), hence a process of its own.
    triton = pytest.importorskip("triton")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "cuobjdump").exists():
        pytest.skip(f"triton {triton.__version__} ships no CUDA binary tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", REPORT_SCRIPT.format(shapes=COMPILED_SHAPES, defaults=DEFAULT_CASES)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    defaults = [r for r in reports if r.get("default")]
    reports = [r for r in reports if not r.get("default")]
    assert len(reports) == len(COMPILED_SHAPES) * 2 * 3 and len(defaults) == 4
    for r in defaults:  # what impl="auto" launches keeps every value in registers
        assert "error" not in r and r["spill_bytes"] == 0, r
    for r in reports:
        assert "error" not in r, r
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] >= 0 and r["spill_bytes"] is not None
    wide = {(r["dtype"], r["config"][0]): r for r in reports if r["widths"] == [2, 256, 256, 256, 7]}
    # bf16: in the pixels layout both products of a hidden pair are warp-group products
    # (HGMMA); only the narrow output layer's stays HMMA. In the units layout a pair's first
    # product has too few rows for a warp group, so three times as many HMMA remain.
    pixels, units = wide["torch.bfloat16", "pixels"], wide["torch.bfloat16", "units"]
    assert pixels["hgmma"] > units["hgmma"] > 0
    assert 0 < 3 * pixels["hmma"] <= units["hmma"]
    # kloop: the first hidden layer's product over chunks of the plane's units, full width
    # (warp-group products too); no full-width activations held while it runs, so fewer
    # registers than pixels on the same tile and no spill.
    kloop = wide["torch.bfloat16", "kloop"]
    assert kloop["hgmma"] > 0 and kloop["spill_bytes"] == 0 and kloop["registers"] < pixels["registers"]
    # fp32 products are exact ("ieee"): on the CUDA cores, no matrix-unit instruction at all
    assert wide["torch.float32", "pixels"]["hgmma"] == wide["torch.float32", "pixels"]["hmma"] == 0
    assert "HGMMA" in triton_report_row(wide["torch.bfloat16", "pixels"])


def test_the_colouring_kernel_compiles_for_hopper_staged_rows_in_128_bit_loads():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip(f"triton {triton.__version__} ships no CUDA binary tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(  # the command line's --report, then one configuration per mode as JSON
        [sys.executable, "-c", COLOUR_SCRIPT], capture_output=True, text=True, env=env, timeout=600, cwd=root
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table, _, rest = done.stdout.partition("JSON\n")
    assert "staged" in table and "128-bit" in table and "error" not in table.lower()
    reports = [json.loads(line) for line in rest.splitlines()]
    assert len(reports) == 10
    for r in reports:  # every mode, both read paths, the launch in use: no spill
        assert "error" not in r and r["spill_bytes"] == 0, r
        if r["staged"]:  # the program's rows in one span, 128 bits a load, through shared memory
            assert r["ldg"]["128"] > 0 and r["shared_bytes"] >= 1024 * 7 * 4
        else:  # 32 bits a class a pixel, no shared memory
            assert r["ldg"]["128"] == 0 and r["ldg"]["32"] >= 7 and r["shared_bytes"] == 0


COLOUR_SCRIPT = """
import json
from benchmarks import tune_colormap
tune_colormap.main(["--report", "--sizes", "1024"])
print("JSON")
for mode in ("region", "boundary", "prob", "value", "blend"):
    for staged in (False, True):
        config = {"staged": staged, "block": 1024, "num_warps": 4}
        print(json.dumps(tune_colormap.compile_report(config, 1024, 7, mode)))
"""


def triton_report_row(report: dict) -> str:
    from benchmarks.triton_report import format_row

    return format_row({**report, "config": tuple(report["config"])})


def test_triton_report_refuses_to_run_under_the_interpreter(monkeypatch, capsys):
    pytest.importorskip("triton")
    from benchmarks import triton_report

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit):
        triton_report.main(["--mlp", "2-32-32-3"])
    assert "unset it" in capsys.readouterr().err


def test_the_launch_sweep_checks_every_configuration_it_times(monkeypatch, capsys):
    # Run where the suite runs (the interpreter on a CPU): a configuration that leaves its
    # output unwritten must come out wrong, not inherit the previous one's correct map.
    pytest.importorskip("triton")
    import probescope.kernels._triton.grid_mlp as tg
    from benchmarks import tune_grid_mlp
    from probescope.kernels.backend import triton_interpreting

    if torch.cuda.is_available() and not triton_interpreting():
        pytest.skip("interpreter check; on a GPU the sweep itself runs (benchmarks/on_device.sh)")
    real = tg.grid_mlp_triton

    def sometimes_idle(mlp, grid, output, out, **config):
        return out if config.get("layout") == "pixels" else real(mlp, grid, output, out, **config)

    monkeypatch.setattr(tg, "grid_mlp_triton", sometimes_idle)
    tile = {"block_m": 32, "block_n": 16, "num_warps": 4}
    configs = [{"layout": "units", **tile}, {"layout": "pixels", **tile, "num_stages": 2}]
    report = tune_grid_mlp.tune_case("2-32-32-3", torch.float32, 8, device="cpu", configs=configs)
    units, pixels = report["results"]
    assert units["correct"] and units["max_abs_error"] <= 1e-4
    assert not pixels["correct"]
    assert "WRONG" in capsys.readouterr().out
    layouts = {c["layout"] for c in tune_grid_mlp.candidates(256, torch.bfloat16)}
    assert layouts == {"units", "pixels", "kloop"}  # 16-bit: all; fp32: units only (its products are FMAs)
    assert {c["layout"] for c in tune_grid_mlp.candidates(256, torch.float32)} == {"units"}


def test_demo_ab_runs_the_demo_with_and_without_the_named_probe(capsys):
    from benchmarks.demo_ab import main
    from probescope import demo

    every = demo.demo_probes
    assert main(["--without", "checkpoint", "--runs", "1", "--epochs", "1"]) == 0
    assert demo.demo_probes is every  # put back
    out = capsys.readouterr().out
    assert "   with checkpoint: loop" in out and "without checkpoint: loop" in out
    assert "median loop with checkpoint" in out and "median loop without checkpoint" in out


@pytest.mark.parametrize("framework", ["keras", "fastai", "lightning", "transformers"])
def test_the_fit_benchmark_trains_every_variant_and_records_the_runs_frames(framework, tmp_path, capsys):
    """Not a timing: the benchmark runs each framework's fit with every variant, and its probed
    fits really record (a callback that never stepped would time nothing)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is first imported
    pytest.importorskip(framework)
    from benchmarks import fit

    threads = torch.get_num_threads()
    try:
        args = ["--framework", framework, "--rounds", "1", "--epochs", "2", "--samples", "400"]
        assert fit.main([*args, "--resolution", "16", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark leaves a core to probes
    result = json.loads((tmp_path / f"fit_{framework}.json").read_text())
    assert [row["variant"] for row in result["fit"]] == list(fit.VARIANTS)
    budget = result["fit"][-1]["budget_states"][0]
    assert set(budget) == {"grid", "loss"} and all(s["interval"] >= 1 for s in budget.values())
    assert all(row["steps_per_s"] > 0 and len(row["rounds"]) == 1 for row in result["fit"])
    assert result["meta"]["grid_path"] != "module forward"  # every framework's MLP fuses
    assert bool(result["grid"]) == (framework == "keras")
    out = capsys.readouterr().out
    assert "| every step |" in out and "| budget 5% |" in out and "| idle |" in out
    assert "budget 5%, grid: every" in out

    # A probed fit records its run: the LossProbe's last frame is of the fit's last step.
    bench = fit.FRAMEWORKS[framework]()
    data, clock = fit.make_dataset("blobs7", seed=0, n=200), fit.Clock()
    callback = bench.callback([LossProbe()], run_dir=tmp_path / "run")
    bench.fit(bench.model(16, 7), data, argparse.Namespace(epochs=2, batch_size=32), callback, clock)
    record = open_run(tmp_path / "run").probe("loss")
    assert clock.steps == 2 * 5  # 160 training samples in batches of 32
    assert record.frame(len(record) - 1).step == clock.steps


def test_contention_sorts_steps_by_the_phase_they_ran_in_from_start_to_end():
    """Deterministic: ticks at step ends with the worker's phase; a step across a phase change
    is neither on nor off, and the cost per call is the on phases' lost share per call."""
    from benchmarks.contention import Alternating

    alternating = Alternating(lambda: None, period=0.1)
    alternating.calls, alternating.busy_s, alternating.on_s = 4, 0.02, 1.0
    ticks = [(0.0, 0), (1.0, 0), (3.0, 1), (5.0, 1), (7.0, 1), (8.0, 2), (9.0, 2), (29.0, -1), (39.0, 2)]
    result = alternating.result(ticks)  # the two steps beside the pause (phase -1) count as neither
    assert result.off_steps == [1.0, 1.0] and result.on_steps == [2.0, 2.0]
    assert result.ratio == 2.0 and result.call_s == 0.005
    assert result.cost_per_call_s == pytest.approx(1.0 * (1 - 1.0 / 2.0) / 4)
    assert result.row("x").startswith("| x | 5.000 | 1000.000 | 2000.000 | 2.000 | 125.000 |")
    with pytest.raises(RuntimeError, match="too few steps in a phase"):
        alternating.result([(0.0, 0), (1.0, 0), (2.0, 1)])  # no step wholly on


def test_contention_runs_the_work_only_in_its_on_phases():
    from benchmarks.contention import measure

    running, steps = [], []

    def work():
        running.append(time.perf_counter())
        time.sleep(0.002)

    result = measure(work, lambda: steps.append(time.sleep(0.001)), seconds=0.6, period=0.05)
    assert result.calls == len(running) - 1  # the warm-up call is not counted
    assert result.calls > 10 and result.off_steps and result.on_steps
    assert 0.1 < result.on_s < 0.5  # about half of 0.6 s
    assert len(result.off_steps) + len(result.on_steps) < len(steps)  # steps across a change dropped


def test_every_kind_of_contention_work_runs(tmp_path):
    """Each kind of work the diagnostic (and the fit's --contention) runs beside training is a
    working call, and the written frames read back."""
    from benchmarks import contention, fit

    kinds = contention.works(resolution=16, history_steps=300)
    assert {name.format(r=16, h=300) for name in fit.CONTENTION} <= set(kinds)
    for name, build in kinds.items():
        work = build()
        work()
        if "written" in name:
            run = open_run(work.folder.name)
            (probe,) = run.meta["probes"]
            assert len(run.probe(probe)) == 1, name


def test_the_phase_gate_opens_in_odd_phases_until_a_margin_before_their_end(monkeypatch):
    from types import SimpleNamespace

    from benchmarks import fit

    now = [100.0]
    monkeypatch.setattr(fit, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    gate = fit.PhaseGate(1.0, margin=0.1)
    assert gate.phase() == 0 and not gate()  # the clock starts at the first call
    now[0] = 101.2
    assert gate.phase() == 1 and gate()
    now[0] = 101.95  # 0.05 s before the on phase ends: no frame may start
    assert gate.phase() == 1 and not gate()
    now[0] = 102.5
    assert gate.phase() == 2 and not gate()

    opened = [False]
    budget = fit.Budget(0.05)
    gated = fit.Gated(budget, lambda: opened[0])
    info = fit.ps.schedule.StepInfo(step=0, epoch=0)
    assert not gated.due(info)  # closed: the budget is not even asked
    opened[0] = True
    assert gated.due(info)  # step 0 is always probed
    for _ in range(6):
        gated.observe(step_s=0.002, quiet=True)
    assert gated.state() == budget.state() and gated.state()["step_ms"] == 2.0


def test_the_fit_on_a_budget_by_phase_sorts_its_steps_and_probes(tmp_path, capsys):
    """Not a timing: one fastai fit whose frames are allowed in every other phase."""
    pytest.importorskip("fastai")
    from benchmarks import fit

    threads = torch.get_num_threads()
    try:
        args = ["--framework", "fastai", "--budget-by-phase", "--epochs", "4", "--samples", "800"]
        assert fit.main([*args, "--period", "0.02", "--resolution", "16", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "fit_fastai_budget_by_phase.json").read_text())
    assert result["off_steps"] > 0 and result["on_steps"] > 0 and result["fraction"] == 0.05
    assert set(result["probes"]) == {"grid", "loss"}
    assert all(p["frames"] >= 1 and p["interval"] >= 1 for p in result["probes"].values())
    assert "the frames cost" in capsys.readouterr().out


def test_the_serial_start_variant_charges_shared_steps_in_full_and_takes_no_trial_frame():
    from benchmarks.budget_start import SerialStart
    from probescope.schedule import Budget

    for cls, cost, interval in [(Budget, 0.001, 2), (SerialStart, 0.100, 200)]:
        budget = cls(0.05)
        for _ in range(5):
            budget.observe(step_s=0.010)
        budget.observe(step_s=0.110, frame=1, quiet=False, share=0.01)  # beside a long frame
        budget.observe(probe_s=0.001, copy_s=0.0, frame=1)
        budget.observe(step_s=0.010)
        assert budget.cost_s == pytest.approx(cost) and budget.interval == interval
    cold = SerialStart(0.05, start=7)
    for _ in range(5):
        cold.observe(step_s=0.010)
    cold.observe(probe_s=0.050, copy_s=0.0, frame=0)  # unmeasured: counted as serial at once
    assert cold.interval == 100


def test_the_budget_start_benchmark_records_each_probes_frames(tmp_path, capsys):
    from benchmarks import budget_start

    out = tmp_path / "start.json"
    args = ["--steps", "120", "--rounds", "1", "--hidden", "8", "--resolution", "12", "--out", str(out)]
    assert budget_start.main(args) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["variant", "probe", "2nd"]
    result = json.loads(out.read_text())
    for variant in ("measured", "serial start"):
        (run,) = result["runs"][variant]
        assert run["steps_per_s"] > 0 and set(run["probes"]) == {"grid", "loss"}
        for probe in run["probes"].values():
            assert probe["frames"] >= 1 and probe["interval"] >= 1 and probe["step_ms"] > 0
            # Frames see the weights after a step: the last step's frame is step 120, and on a
            # slow machine a probe's second frame may be that one.
            assert probe["second_frame"] is None or 0 < probe["second_frame"] <= 120
        assert f"{variant:<13} grid" in table and f"{variant:<13} loss" in table


def test_the_budget_accounting_benchmark_breaks_each_budgets_slowdown_down(tmp_path, capsys):
    from benchmarks import budget_accounting

    out = tmp_path / "accounting.json"
    args = ["--steps", "120", "--rounds", "1", "--resolution", "12", "--budget", "0.5", "--out", str(out)]
    assert budget_accounting.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("off: ") and lines[1].split()[:3] == ["mode", "slowdown", "own"]
    assert [line[:22].strip() for line in lines[2:]] == list(budget_accounting.MODES[1:])
    result = json.loads(out.read_text())
    (rnd,) = result["rounds"]
    assert rnd["off"]["step_s"] > 0 and rnd["off"]["median_s"] > 0 and rnd["attached"]["slowdown"] > 0
    for mode in ("budget", "budget, told per step"):
        b = rnd[mode]
        assert b["own_s"] > 0 and b["slowdown"] > 0 and b["frames"] >= 0 and b["interval"] >= 1
        # The parts are per-step times of one window: together they are its excess over off.
        parts = b["own_s"] + b["idle_excess_s"] + b["frames_s"]
        assert abs(parts) < 10 * rnd["off"]["step_s"]
    # 20 µs of work after each step (timed), the steps themselves timed apart
    work = rnd["python work"]
    assert 20e-6 <= work["own_s"] < 1e-3 and work["slowdown"] > 0 and -0.5 < work["idle_median_excess"] < 2
    assert not budget_accounting._flushing()  # denormals as they were before the run


def test_flushing_tells_whether_denormal_floats_are_flushed():
    from benchmarks.budget_accounting import _flushing

    assert not _flushing()
    torch.set_flush_denormal(True)
    try:
        assert _flushing()
    finally:
        torch.set_flush_denormal(False)
    assert not _flushing()


def test_budget_accounting_splits_a_window_into_own_work_idle_excess_and_frames():
    from benchmarks.budget_accounting import account
    from probescope.schedule import StepTime

    told = [StepTime(0.0011, None, True, 1.0, 0.0001)] * 6 + [StepTime(0.0031, 1, False, 1.0, 0.0001)] * 2
    state = {"step_ms": 1.1, "own_ms": 0.1, "cost_ms": 4.0, "interval": 8}
    budget = {"told": told, "calls": [0.0001] * 8, "frames": 1, "state": state, "step_s": 0.0016}
    parts = account(budget, off_s=0.001, steps=8, off_median_s=0.001)
    assert parts["slowdown"] == pytest.approx(1.6)
    assert parts["own_s"] == pytest.approx(0.0001)
    assert parts["idle_excess_s"] == pytest.approx(0.0001 * 6 / 8)  # idle steps 0.1 ms over off
    assert parts["frames_s"] == pytest.approx(2 * 0.002 / 8)  # two steps 2 ms over the idle mean
    assert parts["believed"] == pytest.approx((0.1 + 4.0 / 8) / 1.1)
    assert parts["idle_median_excess"] == pytest.approx(0.1)  # the median idle step, 10 % over off's
    assert account(budget, off_s=0.001, steps=8)["idle_median_excess"] is None  # no off steps told


def test_the_stream_trace_benchmark_finds_steps_frames_and_snapshots_in_a_profile(tmp_path, capsys):
    from benchmarks import stream_trace

    args = ["--device", "cpu", "--resolution", "12", "--warmup", "10", "--steps", "40"]
    args += ["--modes", "off", "every:5", "--out", str(tmp_path), "--traces"]
    assert stream_trace.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["mode", "step", "mean"]
    assert [line.split()[0] for line in lines[1:3]] == ["off", "every:5"]
    result = json.loads((tmp_path / "stream_trace.json").read_text())["results"]
    off, every = result["off"], result["every:5"]
    assert off["steps"] == every["steps"] == 40
    assert off["frames"] == 0 and off["idle_steps"] == 40 and off["snapshot_median_ms"] is None
    if every["threads_seen"]:  # a frame every 5 steps, the window's last one drained into it
        assert 6 <= every["frames"] <= 9 and every["frame_host_median_ms"] > 0
        assert every["beside_steps"] >= every["frames"] - 1
    assert every["snapshot_median_ms"] > 0  # launched in the training thread: always seen
    assert every["train_gpu_busy"] is None and every["probe_gpu_per_frame_ms"] is None  # no GPU
    assert (tmp_path / "trace-every-5.json.gz").stat().st_size > 0


def test_stream_trace_rejects_a_mode_it_does_not_know():
    from benchmarks import stream_trace

    assert stream_trace.parse_mode("every:3") == ("every", 3)
    assert stream_trace.parse_mode("budget:0.02") == ("budget", 0.02)
    for bad in ("every:0", "every", "budget:2", "budget:x", "off:1", "sometimes"):
        with pytest.raises(argparse.ArgumentTypeError):
            stream_trace.parse_mode(bad)
    with pytest.raises(SystemExit):
        stream_trace.main(["--modes", "every:0"])


def _x(name, ts, dur, tid=1, cat="user_annotation", **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "cat": cat, "args": args}


def test_stream_trace_analysis_splits_the_streams_by_the_thread_that_launched_them():
    from benchmarks.stream_trace import analyse

    steps = [_x("train step", 1000 * i, 1000 if i != 2 else 1600) for i in range(4)]
    steps[3]["ts"] = 3600  # steps: 0-1000, 1000-2000, 2000-3600, 3600-4600 µs
    frame = _x("probescope.frame:grid", 2100, 300, tid=2)
    launches = [  # the training thread launches 1 and 2, the probe thread 3
        _x("cudaLaunchKernel", 0, 5, tid=1, cat="cuda_runtime", correlation=1),
        _x("cudaLaunchKernel", 0, 5, tid=1, cat="cuda_runtime", correlation=2),
        _x("cuLaunchKernel", 2100, 5, tid=2, cat="cuda_driver", correlation=3),
    ]
    kernels = [
        _x("train_a", 100, 400, tid=7, cat="kernel", correlation=1, stream=7),  # 100-500
        _x("train_b", 2200, 800, tid=7, cat="kernel", correlation=2, stream=7),  # 2200-3000
        _x("probe", 2400, 1000, tid=8, cat="kernel", correlation=3, stream=8),  # 2400-3400
        # launched by a library call the trace lacks: training's, as its stream's known ones are
        _x("gemm", 4000, 100, tid=7, cat="kernel", correlation=99, stream=7),  # 4000-4100
    ]
    r = analyse([*steps, frame, *launches, *kernels, {"ph": "M", "name": "process_name"}])
    assert r["steps"] == 4 and r["frames"] == 1
    assert r["idle_steps"] == 3 and r["beside_steps"] == 1  # only step 2 meets the frame
    assert r["idle_median_ms"] == pytest.approx(1.0) and r["beside_mean_ms"] == pytest.approx(1.6)
    assert r["excess_per_frame_ms"] == pytest.approx(0.6)
    assert r["frame_host_median_ms"] == pytest.approx(0.3)
    assert r["probe_gpu_per_frame_ms"] == pytest.approx(1.0)
    assert r["train_gpu_busy"] == pytest.approx(1300 / 4600)
    assert r["probe_gpu_beside_training"] == pytest.approx(600 / 1000)  # 2400-3000 shared
    assert r["training_gpu_beside_probe"] == pytest.approx(600 / 1300)
    with pytest.raises(ValueError, match="train step"):
        analyse([frame])


def test_interval_helpers_merge_intersect_and_find_overlaps():
    from benchmarks.stream_trace import intersection, length, overlaps, union

    merged = union([(5, 7), (0, 2), (1, 3), (6, 6.5), (10, 11)])
    assert merged == [(0, 3), (5, 7), (10, 11)] and length(merged) == 6
    assert intersection(merged, [(2, 6), (10.5, 20)]) == [(2, 3), (5, 6), (10.5, 11)]
    assert overlaps((2.5, 4), merged) and overlaps((6, 6.1), merged) and overlaps((-1, 0.5), merged)
    assert not overlaps((3, 5), merged) and not overlaps((7, 10), merged) and not overlaps((12, 13), merged)


def test_the_benchmark_runner_reports_the_overhead_suite_with_paired_slowdowns(tmp_path, monkeypatch, capsys):
    import dataclasses
    import functools
    import statistics

    from benchmarks import __main__ as runner
    from benchmarks import overhead

    def tiny(device, quick):  # the suite's MLP workload, smaller and shorter
        return [lambda: dataclasses.replace(overhead.mlp_workload(device, 12, quick), steps=30, rounds=2)]

    monkeypatch.setattr(overhead, "workloads", tiny)
    # Budget windows span two intervals, up to limit_s: a fraction of a second here.
    monkeypatch.setattr(overhead, "measure_modes", functools.partial(overhead.measure_modes, limit_s=0.1))
    out = tmp_path / "out"
    assert runner.main(["overhead", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["suite"] == row["op"] == "overhead" and row["reference"] == "off"
    assert list(row["results"]) == list(overhead.MODES)
    table = (out / "results.md").read_text()
    for mode in list(overhead.MODES)[1:]:
        r = row["results"][mode]
        assert len(r["pair_ratios"]) == 2
        assert r["slowdown"] == pytest.approx(statistics.median(r["pair_ratios"]))
        assert r["frames_per_s"] > 0 and sum(r["frames_in_window"]) > 0
        assert f"| overhead | {row['case']} | {mode} |" in table
        assert table.split(f"| {mode} |")[1].splitlines()[0].rstrip().endswith(f"| {r['slowdown']:.3f} |")
    assert "budget_interval" in row["results"]["budget 2%"]
    assert (out / "results.png").stat().st_size > 0
    assert "overhead" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["region", "boundary", "prob"])
def test_every_colouring_launch_the_sweep_times_colours_like_the_reference(mode):
    from benchmarks import tune_colormap

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs Triton's interpreter or a GPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = tune_colormap.sweep(23, 7, mode, 1.0, device)  # 529 pixels: partial programs
    assert len(rows) == len(tune_colormap.configurations()) >= 30
    assert {r["staged"] for r in rows} == {False, True}
    assert [r for r in rows if "error" in r or r["max_channel_error"] > 1] == []
    assert sum(r["default"] for r in rows) == 1
    if device.type == "cpu":
        assert all("ms" not in r for r in rows)  # the interpreter's time is no kernel's
    table = tune_colormap.table(23, rows)
    assert table.count("\n") == len(rows) and "(in use)" in table and "WRONG" not in table


def test_a_gpu_event_without_a_known_launch_goes_with_its_streams_known_ones():
    from benchmarks.stream_trace import _launched_by

    def kernel(corr, stream):
        return {"args": {"correlation": corr, "stream": stream}}

    launcher = {1: "train", 2: "train", 3: "probe", 4: "probe"}
    pairs = [(1, 7), (2, 7), (3, 7), (4, 8), (50, 7), (51, 8), (52, 9)]
    gpu = [kernel(corr, stream) for corr, stream in pairs]
    # streams: 7 mostly training's (2 of 3), 8 the probe's, 9 unknown (the probe's)
    assert _launched_by(gpu, launcher, "train") == [True, True, False, False, True, False, False]


def test_the_sinks_benchmark_times_every_mode(capsys):
    pytest.importorskip("tensorboard")
    from benchmarks.sinks import main

    assert main(["--steps", "40", "--rounds", "1", "--resolution", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:14].strip(): line[14:].split() for line in lines[2:6]}
    assert list(rows) == ["off", "sink", "library sink", "in the loop"]
    assert [line.split(": ")[0] for line in lines[6:]] == [
        "checksum of 100 kB, tensorboard (pure Python)",
        "checksum of 100 kB, google-crc32c",
    ]
    assert rows["off"][1] == "1.000" and all(float(rate) > 0 for rate, _ in rows.values())


def test_the_gif_benchmark_writes_every_count_with_both_writers(capsys):
    from benchmarks.gif import main

    assert main(["--frames", "3", "12", "--distinct", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["stream"], ["pillow"])]
    assert [(r[0], int(r[1])) for r in rows] == [(w, n) for n in (3, 12) for w in ("stream", "pillow")]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)  # frames a second, file size


def test_the_export_benchmark_times_each_jobs_value_on_the_same_files(capsys, monkeypatch):
    import probescope.export
    from benchmarks.export import main

    monkeypatch.setattr(probescope.export, "MIN_PARALLEL", 2)  # workers for these few pictures
    assert main(["--frames", "4", "--interpolate", "1", "--jobs", "1", "2", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 frames, 7 pictures with 1 between each pair"
    rows = {int(line.split()[0]): line.split()[1:] for line in lines[2:4]}
    assert sorted(rows) == [1, 2] and rows[1][2] == "1.00" and float(rows[2][0]) > 0


def test_the_grid_frame_benchmark_times_every_variant_on_the_same_frames(tmp_path, capsys):
    from benchmarks.grid_frame import MLPS, VARIANTS, main

    out = tmp_path / "grid_frame.json"
    assert main(["--device", "cpu", "--rounds", "2", "--sizes", "16,7", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["case"], r["variant"]) for r in rows] == [
        (f"{'-'.join(map(str, m))} at {s}²", v) for m in MLPS for s in (16, 7) for v in VARIANTS
    ]
    assert all(r["median_ms"] > 0 for r in rows)
    assert [r["over_ring_slot"] for r in rows if r["variant"] == "ring slot"] == [1.0] * 4
    assert len(capsys.readouterr().out.splitlines()) == 2 + len(rows)


def test_the_grid_frame_benchmarks_variants_make_the_same_frame_their_own_way():
    """``ring slot`` writes into the ring's storage, the others into tensors the ring copies;
    the f64 variant's check is the float64 sum, and the probe's own is put back after."""
    import probescope.probes.grid as grid_module
    from benchmarks.grid_frame import Frames
    from probescope.probes.base import all_finite

    frames = Frames((2, 8, 3), 12, torch.device("cpu"))
    frames.check()  # raises if two variants' frames differ
    seen = {}
    real_write = frames.rings["ring slot"].write.__func__

    def write(ring, data, step, epoch):
        slot = ring._slots[ring._next_seq % ring.capacity]
        seen[ring], seen[(ring, "check")] = (
            any(np.shares_memory(v.numpy(), slot.arrays.get(k, np.empty(0))) for k, v in data.items()),
            grid_module.all_finite,
        )
        return real_write(ring, data, step, epoch)

    for variant, ring in frames.rings.items():
        ring.write = write.__get__(ring)
        frames.frame(variant)
    shares = [seen[frames.rings[v]] for v in ("ring slot", "copied", "copied, f64 check")]
    assert shares == [True, False, False]
    checks = [seen[(frames.rings[v], "check")] for v in ("ring slot", "copied", "copied, f64 check")]
    assert checks[0] is checks[1] is all_finite and checks[2] is not all_finite
    assert grid_module.all_finite is all_finite


def test_the_notebook_benchmark_times_the_view_in_a_kernel(capsys):
    pytest.importorskip("jupyter_client")
    if importlib.util.find_spec("ipykernel") is None:
        pytest.skip("needs ipykernel")
    from benchmarks.notebook import main

    runs = main(["--steps", "400", "--rounds", "1", "--resolution", "32", "--fps", "8"])
    assert list(runs) == ["off", "notebook 8 fps"]
    (view,) = runs["notebook 8 fps"]
    # The view sent its first picture before training and every later one reached the client.
    assert view["error"] is None and view["images"] >= 1 and view["updates"] == view["images"]
    assert view["startup_seconds"] > 0 and view["bytes"] > 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["mode", "steps/s", "slowdown"]
    assert lines[2].split()[0] == "off" and lines[2].split()[2] == "1.000x"
    assert lines[3].startswith("notebook 8 fps") and len(lines[3].split()) == 9


def test_the_window_benchmark_times_every_mode(request):
    import shutil

    if not (os.environ.get("DISPLAY") or shutil.which("xvfb-run")):
        pytest.skip("needs a display or xvfb-run")
    pytest.importorskip("glfw")
    argv = [sys.executable, "-m", "benchmarks.window", "--steps", "200", "--rounds", "1", "--fps", "10"]
    if not os.environ.get("DISPLAY"):
        argv = ["xvfb-run", "-a", *argv]
    root = request.config.rootpath
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = {line[:18].strip(): line[18:].split() for line in lines[-3:]}
    assert list(rows) == ["off", "window", "drawn by the loop"]
    assert rows["off"][1] == "1.000x" and all(float(rate) > 0 for rate, _ in rows.values())


@pytest.mark.parametrize("frozen", [False, True])
def test_the_sharded_benchmark_times_every_variant_and_the_gathers(tmp_path, capsys, frozen):
    from benchmarks.sharded import TRAINABLE, variants
    from benchmarks.sharded import main as sharded

    argv = ["--hidden", "16", "--rounds", "1", "--steps", "4", "--out", str(tmp_path)]
    assert sharded([*argv, *(["--frozen"] if frozen else [])]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line.split("|") for line in lines if line.startswith("| ") and not line.startswith("| variant")]
    rows = {cells[1].strip(): cells[2:6] for cells in table}
    assert list(rows) == list(variants(frozen)) and (TRAINABLE in rows) == frozen
    assert rows["off"][1].strip() == "1.000" and rows["off"][2].strip() == "-"
    gathering = ["every 10", "every step", "every step, per parameter", *([TRAINABLE] if frozen else [])]
    for variant in gathering:  # step 0's gather at least
        assert float(rows[variant][2]) > 0, variant
    result = json.loads((tmp_path / "sharded.json").read_text())
    assert sorted(result["rates"]) == sorted(variants(frozen)) and result["gathers"]["loss only"] == []
    if frozen:  # the frozen body's weights are gathered once, not at every step
        elements = {v: float(rows[v][3].replace(",", "")) for v in (TRAINABLE, "every step")}
        assert elements[TRAINABLE] < elements["every step"] / 2


def test_the_benchmark_runner_runs_the_sharded_suite(tmp_path, capsys):
    from benchmarks.__main__ import main
    from benchmarks.sharded import VARIANTS

    assert main(["sharded", "--quick", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["suite"] == "sharded" and list(row["results"]) == list(VARIANTS)
    assert all(r["median_s"] > 0 for r in row["results"].values())
    assert "gather" in row["results"]["every step"]["rate"] and "gather" not in row["results"]["off"]["rate"]
    assert "| sharded | FSDP2 MLP 2-256-256-7, 2 ranks | off |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("written", [2, 1], ids=["after-results", "before-results"])
def test_the_sharded_benchmark_keeps_results_a_gloo_abort_at_exit_leaves_whole(monkeypatch, capsys, written):
    import signal

    import torch.multiprocessing as mp

    from benchmarks import sharded

    def ranks_then_abort(fn, args, nprocs):
        out = Path(args[2])
        for rank in range(written):
            (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank}))
        raise mp.ProcessExitedException(
            "process 1 terminated with signal SIGABRT", error_index=1, error_pid=1, exit_code=-signal.SIGABRT
        )

    monkeypatch.setattr(sharded.mp, "start_processes", ranks_then_abort)
    if written == 2:  # every rank's results are in: the abort came after the work
        assert sharded.measure(2, 8, 1, 1, "cpu") == {"rank": 0}
        assert "rank 1 aborted at exit, after its results" in capsys.readouterr().err
    else:
        with pytest.raises(mp.ProcessExitedException):
            sharded.measure(2, 8, 1, 1, "cpu")
