"""``python -m benchmarks [SUITE ...] [--quick] [--device cpu|cuda] [--out DIR]``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks import analysis, kernels
from benchmarks.timing import device_name, device_peaks

SUITES = {"kernels": kernels, "analysis": analysis}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {sorted(SUITES)}; default: all")
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes on a 2-core CPU")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; known: {sorted(SUITES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
    }
    meta["peaks"] = peaks = device_peaks(device, args.quick)
    rows = []
    for name in args.suites or list(SUITES):
        suite = SUITES[name]
        with tqdm(total=suite.count(device, args.quick), desc=name, unit="case") as bar:
            for row in suite.run(device, args.quick, peaks):
                row["suite"] = name
                rows.append(row)
                bar.update()
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = format_table(rows, peaks)
    (args.out / "results.md").write_text(table + "\n")
    plot(rows, args.out / "results.png")
    print(f"\n{meta['device']} · torch {meta['torch']} · {meta['date']}")
    print(
        f"measured peaks: matmul {peaks['matmul_flops'] / 1e9:.1f} GFLOP/s ({peaks['matmul_dtype']}), "
        f"copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s"
    )
    print(table)
    print(f"\nwrote {args.out / 'results.json'}, results.md and results.png")
    return 0


def format_table(rows: list[dict], peaks: dict) -> str:
    lines = [
        "| op | case | provider | median ms | throughput | of peak | ours is faster by |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = row["results"][row["ours"]]["median_s"]
        for provider, r in row["results"].items():
            if "flops" in r:
                throughput = f"{r['points_per_s'] / 1e6:.1f} Mpt/s, {r['flops'] / 1e9:.1f} GFLOP/s"
                frac = f"{r['fraction_of_matmul_peak']:.0%}"
            elif "rate" in r:
                throughput, frac = r["rate"], ""
            else:
                throughput = f"{r['bytes_per_s'] / 1e9:.2f} GB/s"
                frac = f"{r['fraction_of_copy_peak']:.0%}"
            speedup = "" if provider == row["ours"] else f"{r['median_s'] / ours:.2f}x"
            lines.append(
                f"| {row['op']} | {row['case']} | {provider} | {r['median_s'] * 1e3:.2f} | {throughput} "
                f"| {frac} | {speedup} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    labels = [f"{r['op']}\n{r['case']}" for r in rows]
    fig = Figure(figsize=(max(6, len(rows) * 0.6), 4), layout="constrained")
    ax = fig.add_subplot()
    for provider in sorted({p for r in rows for p in r["results"] if p != r["ours"]}):
        speedups = [r["results"][provider]["median_s"] / r["results"][r["ours"]]["median_s"]
                    if provider in r["results"] else float("nan") for r in rows]  # fmt: skip
        ax.plot(range(len(rows)), speedups, "o", label=f"vs {provider}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up of ours (x)")
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.legend()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
