"""The ``probescope`` command: demo, zoo, analyze, view, export, info, compare, spec."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from probescope.analysis.states import COVARIANCE_TYPES
from probescope.datasets import DATASETS
from probescope.kernels.interpolate import METHODS


def _demo(args: argparse.Namespace) -> int:
    if args.dataset == "modadd":
        return _run_zoo("mlp", args.out or Path("runs/demo-modadd"), args.seeds, args.steps, args.quiet)
    from probescope.demo import run_demo

    result = run_demo(
        args.dataset,
        args.out,
        epochs=args.epochs,
        seed=args.seed,
        baseline=not args.no_baseline,
        resolution=args.resolution,
        progress=not args.quiet,
        viewer=args.view,
    )
    print(result.report())
    return 0


def _run_zoo(name: str, out: Path, seeds: int, steps: int | None, quiet: bool) -> int:
    from probescope.zoo import run_zoo

    result = run_zoo(name, out, seeds=seeds, steps=steps, progress=not quiet)
    print(result.report_text())
    return 0


def _zoo(args: argparse.Namespace) -> int:
    return _run_zoo(
        args.model, args.out or Path(f"runs/zoo-{args.model}"), args.seeds, args.steps, args.quiet
    )


def _states(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"states must be 'auto' or a positive integer, got {text!r}")
    return value


def _analyze(args: argparse.Namespace) -> int:
    try:
        from probescope.analysis import latent_states, write_report
    except ImportError as err:
        raise ValueError(f"the analysis needs: pip install 'probescope[analysis]' ({err})") from err
    metrics = [m for group in args.metrics for m in group.split(",") if m] if args.metrics else None
    result = latent_states(
        args.runs,
        metrics=metrics,
        n_states=args.states,
        max_states=args.max_states,
        restarts=args.restarts,
        probe=args.probe,
        covariance_type=args.covariance,
        progress=not args.quiet,
    )
    out = args.out or Path(args.runs[0]) / "analysis"
    paths = write_report(result, out, title=args.title or f"Training map: {', '.join(result.runs)}")
    print(result.summary())
    for path in paths.values():
        print(path)
    return 0


def _formats(text: str) -> list[str]:
    from probescope.export import FORMATS

    formats = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in (*FORMATS, "tensorboard")]
    if bad or not formats:
        raise argparse.ArgumentTypeError(
            f"formats must be among {', '.join(FORMATS)}, tensorboard; got {text!r}"
        )
    return formats


def _brief(config: dict, shown: int = 4) -> dict:
    """A probe's config for a line of ``info``: a list longer than a few items (a StatsProbe's
    every parameter of a large model) as its first items and how many there are in all
    (``info --json`` prints everything)."""
    return {
        key: [*value[:shown], f"... {len(value)} in all"]
        if isinstance(value, list) and len(value) > shown + 1
        else value
        for key, value in config.items()
    }


def _export(args: argparse.Namespace) -> int:
    from probescope.export import export_final_pictures, export_run
    from probescope.run import open_run

    run = open_run(args.run)
    out = Path(args.out or Path(args.run) / "exports")
    formats = [f for group in args.format for f in group]
    if not formats and not args.final_pictures:
        raise ValueError(
            "nothing to export: give --format (mp4, gif, png, tensorboard), --final-pictures or both"
        )
    written = []
    if "tensorboard" in formats:  # event files, not pictures: every probe's frames
        from probescope.sinks import export_tensorboard

        log_dir = export_tensorboard(run, out / "tensorboard", probes=args.probe, progress=not args.quiet)
        print(f"{log_dir} (tensorboard --logdir {log_dir})")
        formats = [f for f in formats if f != "tensorboard"]
    files = (
        export_run(
            run,
            out,
            formats,
            probes=args.probe,
            interpolate=args.interpolate,
            method=args.method,
            fps=args.fps,
            progress=not args.quiet,
            renderer=args.renderer,
            jobs=args.jobs or min(os.cpu_count() or 1, 8),
        )
        if formats
        else {}
    )
    if formats and not files and not args.final_pictures:
        probes = ", ".join(
            f"{name} ({record.kind}, {len(record)} frames)" for name, record in run.probes.items()
        )
        raise ValueError(
            f"nothing to draw as {', '.join(formats)}: no probe of the run has frames of a kind drawn "
            f"frame by frame ({probes or 'it has no probes'}); --final-pictures draws statistics over "
            "training, --format tensorboard exports every probe's numbers"
        )
    written += [p for paths in files.values() for p in paths]
    if args.final_pictures:
        written += export_final_pictures(run, out)
    pngs = [p for p in written if p.suffix == ".png"]
    others = [p for p in written if p.suffix != ".png"]
    for p in others:
        print(p)
    if pngs:
        print(f"{len(pngs)} PNG files under {out}")
    return 0


def _view(args: argparse.Namespace) -> int:
    from probescope.viewers.backend import ViewerUnavailable
    from probescope.viewers.viewer import RunSource, RunsSource, Viewer

    if args.follow:  # a viewer may start before the training job: wait for its runs
        from probescope.run import started, wait_for_run

        for path in args.run:
            if not started(path):
                print(
                    f"probescope view: waiting for a run to start in {path} (Ctrl-C to stop)", file=sys.stderr
                )
                try:
                    wait_for_run(path)
                except KeyboardInterrupt:
                    return 130
    several = len(args.run) > 1  # side by side: one row of panels per run
    source = RunsSource(args.run, args.follow, args.probe) if several else RunSource(args.run[0], args.follow)
    try:
        viewer = Viewer(source, offscreen=args.offscreen, fps=args.fps, log_loss=not args.linear_loss,
                        probes=None if several else args.probe)  # fmt: skip
    except ViewerUnavailable as err:
        print(f"probescope view: {err}", file=sys.stderr)
        return 3
    print(f"viewer: {viewer.backend} backend, {source.upload_path()} upload", file=sys.stderr)
    if args.offscreen:
        if args.follow or not viewer.timeline:
            viewer.refresh()
        else:
            viewer.go_to(len(viewer.timeline) - 1 if args.step is None else viewer.timeline.index(args.step))
        print(viewer.save_png(args.out or Path(args.run[0]) / "view.png"))
        return 0
    viewer.run(replay_fps=args.replay_fps)
    return 0


def _compare(args: argparse.Namespace) -> int:
    import pandas as pd

    from probescope.compare import compare_runs, write_table

    table = compare_runs(args.runs)
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    if args.out is not None:
        write_table(table, args.out)
        print(f"written: {args.out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from probescope.run import HISTORY, JOURNAL, open_run
    from probescope.units import bytes_text

    run = open_run(args.run)
    meta = run.meta
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(f"run       {run.path}")
    print(f"status    {run.status}   created {meta.get('created')}")
    if run.status in ("running", "stopped"):
        print(f"writer    {_writer_line(run)}")
    for resumed in meta.get("resumes", []):
        print(
            f"resumed   at step {resumed.get('step')} {resumed.get('time')} (it was "
            f"{resumed.get('previous_status')}; {resumed.get('superseded_frames')} later frame(s) superseded)"
        )
    if meta.get("error"):
        print(f"error     {meta['error']}")
    model = meta.get("model", {})
    if model:
        print(
            f"model     {model.get('class')}  {model.get('parameters', 0):,} parameters  "
            f"({model.get('device')}, {model.get('dtype')})"
        )
    summary = meta.get("summary", {})
    if summary:
        print(
            f"training  {summary.get('steps')} steps, {summary.get('epochs')} epochs, "
            f"{summary.get('wall_seconds')} s monitored"
        )
    else:
        last = run.last_step()
        reached = "no frame yet" if last is None else f"the last frame is of step {last}"
        print(f"training  no summary (written when the Monitor closes); {reached}")
    for series, first in (summary.get("nonfinite") or {}).items():
        print(f"nonfinite {series}: {first.get('value')} first at step {first.get('step')}")
    snap = meta.get("snapshot_detail")
    if snap:
        where = "pinned host memory" if snap.get("host") else "the model's device"
        share = f"{snap['copied_elements']:,} of {snap['model_elements']:,} elements"
        print(f"snapshot  {snap['strategy']}: {share} in {where}, {snap['bytes'] / 2**20:.1f} MiB")
    if meta.get("model", {}).get("sharded"):
        gathers = summary.get("gathers") or {}
        done = "weights gathered when probes are due (a count at close)"
        if gathers:
            done = f"{gathers.get('count', 0)} gathers, {gathers.get('seconds', 0):.3g} s"
            if gathers.get("elements"):
                done += f", {gathers['elements']:,} elements"
        print(f"sharded   {meta['model']['sharded']}; {done}")
    disk = meta.get("disk") or {}
    if disk.get("budget_bytes"):
        written, budget = bytes_text(disk["frames_bytes"]), bytes_text(disk["budget_bytes"])
        line = f"disk      {written} of frames, budget {budget}"
        if disk.get("thinned_from_step") is not None:
            left = sum(disk.get("left_out", {}).values())
            line += (
                f"; thinned from step {disk['thinned_from_step']}: 1 frame in {disk['stride']} kept at "
                f"the end, {left} left out"
            )
        print(line)
    if summary.get("budget") is not None:
        shared = len(summary.get("probes", {}))
        print(f"budget    {summary['budget']:.3g} of training time, shared by {shared} probe(s)")
    has_model = (run.path / "model.pt").exists()
    print(f"weights   {'model.pt' if has_model else '(none yet)'}")
    history = run.history()
    if history:
        points = max(len(one.steps) for one in history.values())
        if (run.path / JOURNAL).exists():
            source = "history.journal as last written, then the newest LossProbe frame"
        elif (run.path / HISTORY).exists():
            source = "history.npz"
        else:
            source = "the newest LossProbe frame (no journal yet)"
        print(f"history   {source}: {', '.join(history)} (up to {points:,} points each)")
    else:
        print("history   (none yet: journaled every second, whole when the Monitor closes)")
    print("probes")
    for name, record in run.probes.items():
        steps = record.steps() if len(record) else []
        span = f"steps {steps[0]}..{steps[-1]}" if steps else "no frames"
        stats = summary.get("probes", {}).get(name)
        cost = (
            f", {stats['mean_ms']:.2f} ms/frame, {stats['skipped']} skipped, {stats['failed']} failed"
            if stats
            else ""
        )
        if (stats or {}).get("left_out"):
            cost += f", {stats['left_out']} left out (disk budget)"
        held = (stats or {}).get("ring_bytes")
        if held:  # what its ring held at the end (runs before 2026-11-24 do not say)
            cost += f", ring {held['host'] / 2**20:.1f} MiB"
            cost += f" (+{held['device'] / 2**20:.1f} MiB on the device)" if held.get("device") else ""
        print(f"  {name:<12} {record.kind:<10} {len(record):>5} frames  {span}{cost}")
        config = {k: v for k, v in record.config.items() if k != "schedule"}
        if config:  # (a probe of one's own may have none)
            print(f"  {'':<12} {json.dumps(_brief(config))}")
        print(f"  {'':<12} schedule {json.dumps(record.config.get('schedule'))}")
        learned = (stats or {}).get("schedule")
        if learned:  # budget mode: what it measured and chose
            print(f"  {'':<12} {_budget_line(learned)}")
    return 0


def _writer_line(run) -> str:
    """Who writes a run that has not closed, whether it still runs, when it last wrote."""
    import time

    writer = run.meta.get("writer")
    ago = f"last write {_duration(time.time() - run.last_written())} ago"
    if not writer:
        return f"not recorded (an earlier version wrote the run); {ago}"
    state = {
        True: "still runs",
        False: "is gone: the run ended without closing (killed or crashed)",
        None: "is on another machine: not checked",
    }[run.writer_alive()]
    return f"process {writer.get('pid')} on {writer.get('host')} {state}; {ago}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _budget_line(state: dict) -> str:
    def ms(key: str) -> str:
        return "?" if state.get(key) is None else f"{state[key]:.2f} ms"

    return (
        f"budget {state.get('fraction', 0):.3g}: every {state.get('interval')} steps at the end; a frame "
        f"costs training {ms('cost_ms')} (evaluation {ms('probe_ms')}), a step {ms('step_ms')}, "
        f"the Monitor's own work {ms('own_ms')} a step; {len(state.get('changes', []))} interval change(s)"
    )


def _spec(args: argparse.Namespace) -> int:
    from probescope.spec import describe_spec

    print(describe_spec(args.path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probescope", description="Watch a PyTorch model learn.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train an MLP on built-in data with probes; record and export the run")
    demo.add_argument(
        "--dataset",
        choices=(*DATASETS, "modadd"),
        default="blobs7",
        help="generated data (blobs7, spirals, moons: 2-D classes; wave: 1-D regression; peaks: 2-D "
        "regression), or modadd: modular addition, several seeds, and their latent states (grokking)",
    )
    demo.add_argument("--out", type=Path, default=None, help="run directory (default runs/demo-<dataset>)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs (default depends on the data set)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--resolution", type=int, default=192, help="grid map resolution per axis")
    demo.add_argument("--no-baseline", action="store_true", help="skip the training run without probes")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument(
        "--view", action="store_true", help="watch training in the OpenGL viewer (needs a display)"
    )
    demo.add_argument("--seeds", type=int, default=3, help="modadd: runs with different seeds")
    demo.add_argument("--steps", type=int, default=None, help="modadd: optimizer steps per run")
    demo.set_defaults(func=_demo)

    from probescope.zoo import ZOO

    zoo = sub.add_parser(
        "zoo", help="train a zoo model on generated data (several seeds) and analyse its phases"
    )
    zoo.add_argument("model", choices=sorted(ZOO))
    zoo.add_argument("--out", type=Path, default=None, help="folder for the runs (default runs/zoo-<model>)")
    zoo.add_argument("--seeds", type=int, default=3)
    zoo.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per model)")
    zoo.add_argument("--quiet", action="store_true")
    zoo.set_defaults(func=_zoo)

    analyze = sub.add_parser(
        "analyze", help="latent states of training (HMM) over runs; writes the training map"
    )
    analyze.add_argument("runs", type=Path, nargs="+", help="run directories with a stats probe")
    analyze.add_argument("--out", type=Path, default=None, help="report folder (default FIRST_RUN/analysis)")
    analyze.add_argument("--metrics", action="append", default=None, help="columns to use (comma-separated)")
    analyze.add_argument("--states", type=_states, default="auto", help="'auto' (BIC) or a number")
    analyze.add_argument("--max-states", type=int, default=8)
    analyze.add_argument("--restarts", type=int, default=3)
    analyze.add_argument("--probe", default=None, help="the stats probe's name (default: the first)")
    analyze.add_argument(
        "--covariance", choices=COVARIANCE_TYPES, default="diag",
        help="each state's Gaussian (default diag, the paper's)",
    )  # fmt: skip
    analyze.add_argument("--title", default=None)
    analyze.add_argument("--quiet", action="store_true")
    analyze.set_defaults(func=_analyze)

    export = sub.add_parser("export", help="render a recorded run to MP4, GIF or PNG frames")
    export.add_argument("run", type=Path)
    export.add_argument(
        "--format",
        type=_formats,
        action="append",
        default=[],
        help="mp4, gif, png or tensorboard (event files); repeat or separate with commas",
    )
    export.add_argument("--out", type=Path, default=None, help="output folder (default RUN/exports)")
    export.add_argument("--probe", action="append", default=None, help="only this probe (repeatable)")
    export.add_argument("--interpolate", type=int, default=0, help="frames to add between recorded frames")
    export.add_argument("--method", choices=METHODS, default="linear", help="interpolation easing")
    export.add_argument("--fps", type=float, default=12.0)
    export.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="processes that draw a long export's matplotlib pictures (default: the cores, at most 8; "
        "an export of fewer pictures is drawn in one)",
    )
    export.add_argument(
        "--renderer",
        choices=("mpl", "gl"),
        default="mpl",
        help="mpl: matplotlib figures; gl: the OpenGL viewer's panels, rendered offscreen (EGL)",
    )
    export.add_argument(
        "--final-pictures",
        action="store_true",
        help="write each probe's final figure, small multiples and raw final map (with --format: as well)",
    )
    export.add_argument("--quiet", action="store_true")
    export.set_defaults(func=_export)

    compare = sub.add_parser("compare", help="many runs, one table: model, steps, last metrics, probe costs")
    compare.add_argument("runs", type=Path, nargs="+", help="run directories")
    compare.add_argument("--out", type=Path, default=None, help="also write it: FILE.csv, .json or .md")
    compare.set_defaults(func=_compare)

    view = sub.add_parser(
        "view", help="watch a run live (--follow) or replay a finished one; several runs side by side"
    )
    view.add_argument("run", type=Path, nargs="+", help="run directories (several: one row of panels each)")
    view.add_argument(
        "--follow", action="store_true", help="keep reading new frames while the run is written"
    )
    view.add_argument("--fps", type=float, default=30.0, help="display refresh rate for --follow")
    view.add_argument("--replay-fps", type=float, default=10.0, help="recorded frames per second in a replay")
    view.add_argument("--probe", action="append", default=None, help="only this probe (repeatable)")
    view.add_argument("--linear-loss", action="store_true", help="loss on a linear axis (default log10)")
    view.add_argument("--offscreen", action="store_true", help="render once through EGL and save a PNG")
    view.add_argument("--step", type=int, default=None, help="with --offscreen: the recorded step to draw")
    view.add_argument(
        "--out", type=Path, default=None, help="with --offscreen: the PNG (default RUN/view.png)"
    )
    view.set_defaults(func=_view)

    info = sub.add_parser("info", help="describe a run directory")
    info.add_argument("run", type=Path)
    info.add_argument("--json", action="store_true", help="print run.json as is")
    info.set_defaults(func=_info)

    spec = sub.add_parser(
        "spec", help="list a probe spec: each probe's arguments (load_probes(RUN) builds them again)"
    )
    spec.add_argument("path", type=Path, help="a run directory or a spec file (probes.json)")
    spec.set_defaults(func=_spec)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``probescope`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught below, not at exit
        return code
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"probescope {args.command}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (``probescope info RUN | head``): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit's flush
        return 141  # what a shell reports for SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
