"""Launch sweep of the Triton colouring kernel (``probs_to_rgba``) on a GPU.

``python -m benchmarks.tune_colormap [--sizes 1024 2048] [--classes 7] [--mode region]
[--out DIR] [--report]``: every launch configuration (rows ``strided`` or ``staged``, pixels per
program, warps) colours a random probability map, is checked against the torch reference
(every channel within 1, as the kernel tests require), and is timed from a CUDA graph of 20
launches (the kernel's own time, no launch cost). Bandwidth counts the bytes the op must move
(the probabilities read once, the RGBA written once) against the device's measured copy
bandwidth; issue 3's target is 70 % of it. Prints the configurations fastest first per size
and writes ``tune_colormap.json`` to DIR.

``--report`` needs no GPU: it compiles every configuration for sm_90a (Hopper) with the
installed Triton and prints what each binary holds: registers, spills, shared memory, and its
global loads by width (a staged program should read its rows with 128-bit loads, a strided
one reads 32 bits a class).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from benchmarks.timing import device_name, device_peaks, measure_graph
from benchmarks.triton_report import compile_kernel, launch_signature
from probescope.kernels import default_palette, probs_to_rgba_reference
from probescope.kernels._triton.colormap import (
    _probs_to_rgba_kernel,
    kernel_arguments,
    launch_config,
    probs_to_rgba_triton,
)
from probescope.kernels.backend import triton_interpreting

BLOCKS = (256, 512, 1024, 2048, 4096)
WARPS = (2, 4, 8, 16)


def configurations() -> list[dict]:
    return [
        {"staged": staged, "block": block, "num_warps": warps}
        for staged, block, warps in itertools.product((False, True), BLOCKS, WARPS)
        if block // (32 * warps) >= 1  # at least a pixel per thread
    ]


def sweep(size: int, classes: int, mode: str, peak_bytes_per_s: float, device: torch.device) -> list[dict]:
    """Every configuration on one map, checked, and timed where the device is a GPU (under
    Triton's interpreter on the CPU the check alone runs)."""
    g = torch.Generator().manual_seed(size)
    probs = torch.softmax(3 * torch.randn(size, size, classes, generator=g), -1).to(device)
    probs[0, 0, 0] = float("nan")
    palette = default_palette(classes)
    reference = probs_to_rgba_reference(probs.cpu(), mode, palette, class_index=classes - 1)
    nbytes = probs.numel() * probs.element_size() + size * size * 4
    default = launch_config(classes)
    rows = []
    for config in configurations():
        slot = torch.full((size, size, 4), 7, dtype=torch.uint8, device=device)

        def colour(c=config, s=slot):
            return probs_to_rgba_triton(probs, mode, palette, classes - 1, s, **c)

        try:
            colour()
        except Exception as err:  # out of resources, a compile failure: recorded, not fatal
            rows.append({**config, "error": f"{type(err).__name__}: {str(err)[:200]}"})
            continue
        wrong = int((slot.cpu().int() - reference.int()).abs().max())
        row = {**config, "max_channel_error": wrong, "default": config == default}
        timing = measure_graph(colour) if device.type == "cuda" else None
        if timing is not None:
            row["ms"] = timing["median_s"] * 1e3
            row["bytes_per_s"] = nbytes / timing["median_s"]
            row["fraction_of_copy_peak"] = row["bytes_per_s"] / peak_bytes_per_s
        rows.append(row)
    return sorted(rows, key=lambda r: r.get("ms", float("inf")))


def _rows_table(header: str, rows: list[dict], columns, indent: str = "") -> str:
    """One line a configuration: its launch, then ``columns(row)`` (or its error)."""
    lines = [f"{header}{'rows':<8} {'block':>6} {'warps':>5} {columns(None)}"]
    for r in rows:
        head = f"{indent}{'staged' if r['staged'] else 'strided':<8} {r['block']:>6} {r['num_warps']:>5}"
        lines.append(f"{head}  {r['error']}" if "error" in r else f"{head} {columns(r)}")
    return "\n".join(lines)


def table(size: int, rows: list[dict]) -> str:
    def columns(r: dict | None) -> str:
        if r is None:
            return f"{'ms':>8} {'GB/s':>7} {'of peak':>7} {'err':>4}"
        flag = (" (in use)" if r["default"] else "") + ("  WRONG" if r["max_channel_error"] > 1 else "")
        return (
            f"{r.get('ms', float('nan')):>8.4f} {r.get('bytes_per_s', 0) / 1e9:>7.0f} "
            f"{r.get('fraction_of_copy_peak', 0):>7.1%} {r['max_channel_error']:>4}{flag}"
        )

    return _rows_table(f"{size}²: ", rows, columns, indent=" " * 6)


def compile_report(config: dict, size: int, classes: int, mode: str, arch: int = 90) -> dict:
    """What one configuration compiles to for ``sm_<arch>`` (no GPU needed), specialised as a
    launch on a ``size``² map would be."""
    probs = torch.empty(size, size, classes)
    out = torch.empty(size, size, 4, dtype=torch.uint8)
    _, args, constants, options = kernel_arguments(probs, mode, default_palette(classes), 0, out, **config)
    signature, attrs = launch_signature(_probs_to_rgba_kernel, args, constants)
    return {**config, **compile_kernel(_probs_to_rgba_kernel, signature, constants, attrs, options, arch)}


def report_table(rows: list[dict]) -> str:
    def columns(r: dict | None) -> str:
        if r is None:
            return f"{'registers':>9} {'spilled':>7} {'shared':>9}  global loads"
        loads = ", ".join(f"{n} x {bits}-bit" for bits, n in r["ldg"].items() if n)
        return f"{r['registers']:>9} {r['spill_bytes']:>7} {r['shared_bytes'] // 1024:>5} KiB  {loads}"

    return _rows_table("", rows, columns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_colormap", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--mode", choices=("region", "boundary", "prob", "blend"), default="region")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", action="store_true", help="compile for sm_90a and read the binaries")
    args = parser.parse_args(argv)
    if args.report:
        import triton

        if triton_interpreting():
            parser.error("TRITON_INTERPRET is set: interpreted kernels do not compile; unset it")
        size = args.sizes[0]
        what = f"probs_to_rgba {args.mode}, {args.classes} classes, {size}²"
        print(f"{what}, for sm_90a, triton {triton.__version__}")
        print(report_table([compile_report(c, size, args.classes, args.mode) for c in configurations()]))
        return 0
    if not torch.cuda.is_available():
        print("tune_colormap times the Triton kernel on a GPU; torch sees none", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    peaks = device_peaks(device, quick=False)
    print(f"{device_name(device)}: measured copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    results = {}
    for size in args.sizes:
        results[size] = sweep(size, args.classes, args.mode, peaks["copy_bytes_per_s"], device)
        print(table(size, results[size]), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"args": vars(args) | {"out": str(args.out)}, "device": device_name(device), "peaks": peaks}
        record["results"] = {str(k): v for k, v in results.items()}
        (args.out / "tune_colormap.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
