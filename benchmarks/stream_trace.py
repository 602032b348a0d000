"""Where a probe's frames run and what they cost the training steps beside them, from a torch
profiler trace (a diagnostic).

``python -m benchmarks.stream_trace [--device cpu|cuda] [--resolution 1024]
[--modes off every:10 budget:0.02] [--warmup 300] [--steps 300] [--out DIR [--traces]]``: the overhead
suite's MLP workload (2-64-64-7 on the blobs, batch 256, Adam, a GridProbe) trains under each
mode in turn: ``off`` (no Monitor), ``every:N`` (a frame every N steps) or ``budget:F``
(``Schedule.budget(F)``); after ``--warmup`` steps (a budget settles), ``--steps`` steps are
profiled, each in a ``train step`` range, and the Monitor marks its snapshots
(``probescope.snapshot``) and frames (``probescope.frame:NAME``) in the same trace.

Per mode, from the trace (kept with ``--traces`` as ``DIR/trace-MODE.json.gz``, for
chrome://tracing or Perfetto):

- ``step``: mean and median training step (host), the steps beside no frame (``idle``: no
  frame's host range and no probe kernel overlaps them) and those beside one (``beside``);
- ``frame``: frames in the window, the median frame's host time, per frame the probe stream's
  GPU time (kernels and copies launched from threads other than the training thread) and what
  the steps beside frames took beyond the median idle step (``excess``: what a frame cost);
- ``train GPU``: how busy the training stream is over the window (near 100 %: the GPU bounds
  the step; low: the host does, and a probe's host work, the GIL included, is what it costs);
- ``overlap``: the part of the probe's GPU time during which training kernels ran too (the
  streams overlap) and the part of the training stream's GPU time beside probe kernels.

Profiling slows everything it records, the same way in every mode: compare modes with each
other, not with the overhead suite's absolute times. Needs a torch whose profiler can record
every thread (``profile_all_threads``) to see the frames' host ranges; without it only the GPU
side of the frames is seen (and said so).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gzip
import json
import statistics
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.overhead import _sync, _train, leave_a_core_to_probes, mlp_workload, train_step
from probescope import Monitor, Schedule

STEP = "train step"
FRAME = "probescope.frame"
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")

Intervals = list[tuple[float, float]]


def parse_mode(text: str) -> tuple[str, float | None]:
    """``off``, ``every:N`` or ``budget:F`` -> (kind, value)."""
    kind, _, value = text.partition(":")
    if kind == "off" and not value:
        return kind, None
    if kind == "every" and value.isdigit() and int(value) > 0:
        return kind, int(value)
    if kind == "budget":
        with contextlib.suppress(ValueError):
            if 0.0 < float(value) < 1.0:
                return kind, float(value)
    raise argparse.ArgumentTypeError(f"a mode is off, every:N (N > 0) or budget:F (0 < F < 1), not {text!r}")


def _schedule(kind: str, value) -> Schedule:
    return Schedule.every(value) if kind == "every" else Schedule.budget(value)


def _all_threads_config():
    """The profiler setting that records the probe worker's ranges too (None where this torch
    has none)."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None


def _profiled_steps(w, monitor: Monitor | None, steps: int, device: torch.device, path: Path) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    config = _all_threads_config()
    extra = {"experimental_config": config} if config is not None else {}
    streams = monitor.training_stream() if monitor is not None else contextlib.nullcontext()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler's notes on what it cannot record
        with profile(activities=activities, **extra) as prof, streams:
            for _ in range(steps):
                with record_function(STEP):
                    loss = train_step(w)
                    if monitor is not None:
                        monitor.step(loss=loss.detach())
            _sync(device)
            if monitor is not None:
                monitor.drain()  # the last frame's ranges end inside the trace
                _sync(device)
    prof.export_chrome_trace(str(path))


def run_mode(w, device: torch.device, mode: str, warmup: int, steps: int, path: Path) -> dict:
    """Train ``warmup`` steps, profile ``steps`` more into ``path``; the trace's analysis."""
    kind, value = parse_mode(mode)
    monitor = None
    if kind != "off":
        schedule = _schedule(kind, value)
        monitor = Monitor(w.model, w.probes(lambda: schedule), optimizer=w.optimizer, final_frame=False)
        monitor.start()
    try:
        _train(w, monitor, warmup)
        if monitor is not None:
            monitor.drain()
        _sync(device)
        _profiled_steps(w, monitor, steps, device, path)
        state = schedule.state() if monitor is not None else None
    finally:
        if monitor is not None:
            monitor.close()
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        events = json.load(f)["traceEvents"]
    result = analyse(events)
    if state is not None:
        result["interval"] = state.get("interval")
    result["threads_seen"] = _all_threads_config() is not None
    return result


# ---- the trace ---------------------------------------------------------------------------
def union(intervals: Iterable[tuple[float, float]]) -> Intervals:
    """Sorted, disjoint intervals covering the same time."""
    merged: Intervals = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def length(merged: Intervals) -> float:
    return sum(end - start for start, end in merged)


def intersection(a: Intervals, b: Intervals) -> Intervals:
    """The time two unions of intervals share."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlaps(interval: tuple[float, float], merged: Intervals) -> bool:
    """Whether ``interval`` shares any time with the union ``merged``."""
    k = bisect.bisect_left(merged, (interval[1],))  # the first that starts at or after its end
    return k > 0 and merged[k - 1][1] > interval[0]


def _ranges(events: Sequence[dict], test) -> Intervals:
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in events if test(e))


def _launched_by(gpu: Sequence[dict], launcher: dict, train_tid) -> list[bool]:
    """Whether each GPU event is training's: by the thread whose call launched it, found through
    the trace's correlation ids; an event whose launch the trace lacks (a library's own launch
    API the profiler does not record) goes with what the known launches on its stream are
    mostly, and with the probe where none on its stream is known."""
    launches = [launcher.get(e.get("args", {}).get("correlation")) for e in gpu]
    streams = [e.get("args", {}).get("stream") for e in gpu]
    known: dict = {}  # stream -> [launched by training?] of its events with a known launch
    for tid, stream in zip(launches, streams, strict=True):
        if tid is not None:
            known.setdefault(stream, []).append(tid == train_tid)
    mostly = {stream: 2 * sum(flags) > len(flags) for stream, flags in known.items()}
    return [
        tid == train_tid if tid is not None else mostly.get(stream, False)
        for tid, stream in zip(launches, streams, strict=True)
    ]


def analyse(events: Sequence[dict]) -> dict:
    """The steps, frames and GPU streams of one profiled window (times in ms, from the trace's
    microseconds)."""
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
    step_events = [e for e in xs if e.get("name") == STEP]
    if not step_events:
        raise ValueError(f"the trace has no {STEP!r} range")
    train_tid = step_events[0]["tid"]
    steps = _ranges(step_events, lambda e: True)
    window = (steps[0][0], steps[-1][1])
    frames = _ranges(xs, lambda e: str(e.get("name", "")).startswith(FRAME))
    snapshots = _ranges(xs, lambda e: e.get("name") == "probescope.snapshot")
    launcher = {
        e["args"]["correlation"]: e["tid"]
        for e in xs
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
    }
    gpu = [e for e in xs if e.get("cat") in GPU_CATEGORIES]
    from_training = _launched_by(gpu, launcher, train_tid)
    train_gpu = union((e["ts"], e["ts"] + e["dur"]) for e, t in zip(gpu, from_training, strict=True) if t)
    probe_gpu = union((e["ts"], e["ts"] + e["dur"]) for e, t in zip(gpu, from_training, strict=True) if not t)
    busy = union([*frames, *probe_gpu])
    idle = [b - a for a, b in steps if not overlaps((a, b), busy)]
    beside = [b - a for a, b in steps if overlaps((a, b), busy)]
    all_steps = [b - a for a, b in steps]
    shared = length(intersection(train_gpu, probe_gpu))
    n_frames = len(frames)

    def ms(x: float | None) -> float | None:
        return None if x is None else x / 1e3

    return {
        "steps": len(steps),
        "step_mean_ms": ms(statistics.fmean(all_steps)),
        "step_median_ms": ms(statistics.median(all_steps)),
        "idle_steps": len(idle),
        "idle_median_ms": ms(statistics.median(idle)) if idle else None,
        "idle_mean_ms": ms(statistics.fmean(idle)) if idle else None,
        "beside_steps": len(beside),
        "beside_mean_ms": ms(statistics.fmean(beside)) if beside else None,
        "frames": n_frames,
        "frame_host_median_ms": ms(statistics.median(b - a for a, b in frames)) if frames else None,
        "snapshot_median_ms": ms(statistics.median(b - a for a, b in snapshots)) if snapshots else None,
        "probe_gpu_per_frame_ms": ms(length(probe_gpu) / n_frames) if n_frames and probe_gpu else None,
        "excess_per_frame_ms": (
            ms(sum(beside) - len(beside) * statistics.median(idle)) / n_frames if n_frames and idle else None
        ),
        "train_gpu_busy": (
            length(intersection(train_gpu, [window])) / (window[1] - window[0]) if train_gpu else None
        ),
        "probe_gpu_beside_training": shared / length(probe_gpu) if probe_gpu else None,
        "training_gpu_beside_probe": shared / length(train_gpu) if train_gpu else None,
    }


# ---- report ------------------------------------------------------------------------------
def table(results: dict[str, dict]) -> str:
    def f(x, spec: str) -> str:
        return format(x, spec) if x is not None else "-"

    off = results.get("off", {}).get("step_median_ms")
    lines = [
        f"{'mode':<14} {'step mean':>9} {'median':>7} {'vs off':>7} {'idle med':>8} {'beside':>7} "
        f"{'frames':>6} {'frame host':>10} {'excess':>7} {'probe GPU':>9} {'train GPU':>9} "
        f"{'overlap':>7} {'interval':>8}",
    ]
    for mode, r in results.items():
        ratio = r["step_median_ms"] / off if off else None
        lines.append(
            f"{mode:<14} {f(r['step_mean_ms'], '.3f'):>9} {f(r['step_median_ms'], '.3f'):>7} "
            f"{f(ratio, '.3f'):>7} {f(r['idle_median_ms'], '.3f'):>8} {f(r['beside_mean_ms'], '.3f'):>7} "
            f"{r['frames']:>6} {f(r['frame_host_median_ms'], '.3f'):>10} "
            f"{f(r['excess_per_frame_ms'], '.3f'):>7} "
            f"{f(r['probe_gpu_per_frame_ms'], '.3f'):>9} {f(r['train_gpu_busy'], '.1%'):>9} "
            f"{f(r['probe_gpu_beside_training'], '.1%'):>7} {f(r.get('interval'), 'd'):>8}"
        )
    lines.append(
        "(ms; steps timed on the host under the profiler; excess and probe GPU: per frame; train GPU: "
        "the training stream's busy share of the window; overlap: probe GPU time beside training kernels)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_trace", description=__doc__)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--modes", nargs="+", default=["off", "every:10", "budget:0.02"])
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, help="write a JSON of the results here")
    parser.add_argument("--traces", action="store_true", help="keep the traces in --out too")
    args = parser.parse_args(argv)
    for mode in args.modes:
        try:
            parse_mode(mode)
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    device = torch.device(args.device)
    leave_a_core_to_probes(device)
    w = mlp_workload(device, args.resolution, quick=True)
    if _all_threads_config() is None:
        note = "this torch's profiler records the training thread only: frames are seen by their GPU work"
        print(note, file=sys.stderr)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out if args.out is not None and args.traces else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for mode in args.modes:
            path = folder / f"trace-{mode.replace(':', '-')}.json.gz"
            results[mode] = run_mode(w, device, mode, args.warmup, args.steps, path)
            print(f"{mode}: {json.dumps(results[mode])}", file=sys.stderr)
    print(table(results))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"args": vars(args) | {"out": str(args.out)}, "device": _device_name(device)}
        record["results"] = results
        (args.out / "stream_trace.json").write_text(json.dumps(record, indent=1))
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
