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

from benchmarks import analysis, frame_cost, kernels, overhead, sharded, viewer
from benchmarks.timing import device_name, device_peaks

SUITES = {
    "kernels": kernels,
    "overhead": overhead,
    "frames": frame_cost,
    "analysis": analysis,
    "viewer": viewer,
    "sharded": sharded,
}


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
                # Written as rows arrive, so a run cut short keeps what it measured.
                (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
                bar.write("\n".join(format_table([row], peaks).splitlines()[2:]))
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
        "| op | case | provider | median ms | throughput | of peak | time / reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        # Kernels: the reference is ours, so the ratio is our speed-up; overhead: probes off,
        # so the ratio is the slowdown.
        reference = row.get("reference", row["ours"])
        ours = row["results"][reference]["median_s"]
        for provider, r in row["results"].items():
            if "flops" in r:
                throughput = f"{r['points_per_s'] / 1e6:.1f} Mpt/s, {r['flops'] / 1e9:.1f} GFLOP/s"
                frac = f"{r['fraction_of_matmul_peak']:.0%}"
            elif "rate" in r:
                throughput, frac = r["rate"], ""
            else:
                throughput = f"{r['bytes_per_s'] / 1e9:.2f} GB/s"
                frac = f"{r['fraction_of_copy_peak']:.0%}"
            speedup = "reference" if provider == reference else f"{_ratio(r, ours):.3f}"
            lines.append(
                f"| {row['op']} | {row['case']} | {provider} | {r['median_s'] * 1e3:.2f} | {throughput} "
                f"| {frac} | {speedup} |"
            )
    return "\n".join(lines)


def _ratio(result: dict, reference_s: float) -> float:
    """A provider's time over the reference's: the suite's own slowdown where it gives one (the
    median of paired windows' ratios, which the machine's drift does not move), else the
    ratio of median times."""
    return result.get("slowdown", result["median_s"] / reference_s)


def plot(rows: list[dict], path: Path) -> None:
    """Each row's providers as time / reference time (speed-ups of ours, or slowdowns)."""
    from matplotlib.figure import Figure

    labels = [f"{r['op']}\n{r['case']}" for r in rows]
    fig = Figure(figsize=(max(6, len(rows) * 0.6), 4), layout="constrained")
    ax = fig.add_subplot()
    references = [r.get("reference", r["ours"]) for r in rows]
    providers = sorted({p for r, ref in zip(rows, references, strict=True) for p in r["results"] if p != ref})
    for provider in providers:
        ratios = [_ratio(r["results"][provider], r["results"][ref]["median_s"])
                  if provider in r["results"] else float("nan")
                  for r, ref in zip(rows, references, strict=True)]  # fmt: skip
        ax.plot(range(len(rows)), ratios, "o", label=provider)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("time / reference time")
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
