"""Sweep the Triton grid_mlp kernel's launch configuration on a CUDA device.

``python -m benchmarks.tune_grid_mlp [--size 1024] [--mlp NAME] [--out DIR]``: for each MLP and dtype,
every layout and (BLOCK_M, BLOCK_N, num_warps[, num_stages]) that compiles, timed with CUDA events
(median of repeated launches), against the current ``launch_config`` and torch eager. The
table it prints is what ``kernels/_triton/grid_mlp.py: launch_config`` is set from.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from benchmarks.kernels import MLPS, build_mlp, mlp_flops, naive_torch
from benchmarks.timing import measure
from probescope.kernels import GridSpec
from probescope.kernels.grid_mlp import resolve_output
from probescope.kernels.mlp import FusableMLP

# The target's case first: a configuration that faults the GPU ends the sweep's process.
CASES = [
    ("2-256-256-256-7", torch.bfloat16),
    ("2-32-32-3", torch.float32),
    ("2-64-64-3", torch.bfloat16),
    ("2-256-256-256-7", torch.float32),
    ("2-1024-1024-10", torch.bfloat16),
]


# Largest probability error a correct kernel shows against torch in each dtype (the test suite's).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def candidates(hidden: int, dtype: torch.dtype):
    """Launch configurations to time: the ``units`` layout, and for 16-bit
    MLPs the ``pixels`` and ``kloop`` layouts (whose products are all warp-group products only
    in 16 bits),
    including the configurations ``benchmarks.triton_report`` compiles without spills."""
    for bm, bn, warps, stages in itertools.product([32, 64, 128], [32, 64, 128], [4, 8], [2, 3]):
        if bn <= hidden:  # two stages: some tiles fit shared memory only so (64/64/4 at width 256)
            yield {"layout": "units", "block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
    if dtype == torch.float32:
        return
    for bm, bn, warps, stages in itertools.product([64, 128], [32, 64, 128], [4, 8, 16], [2, 3]):
        if bn <= hidden and not (bm == 64 and warps == 16):
            yield {"layout": "pixels", "block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
    for bm, bn, warps, stages in itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3]):
        if bn <= hidden:  # one warp group per 64 pixels (128: two, or one with twice the rows)
            yield {"layout": "kloop", "block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}


def tune_case(
    name: str, dtype: torch.dtype, size: int, device: str = "cuda", configs: list[dict] | None = None
) -> dict:
    """Time every candidate configuration (or ``configs``) of one MLP; each result is checked
    against torch eager (written into NaN, so a configuration that writes nothing is wrong)."""
    from probescope.kernels._triton.grid_mlp import grid_mlp_triton, launch_config, padded_hidden

    device = torch.device(device)
    grid = GridSpec.rectangle((-3.0, 3.0, -3.0, 3.0), size, size)
    widths = MLPS[name]
    model = build_mlp(widths, dtype, device)
    mlp = FusableMLP.from_module(model)
    mode = resolve_output("auto", mlp.out_features)
    out = torch.empty(size * size, widths[-1], device=device)
    reference = naive_torch(model, grid, dtype, device)
    eager = measure(reference, device, repeats=10)["median_s"]
    expected = reference().reshape(out.shape)
    hidden = padded_hidden(mlp.widths)
    results = []
    for config in candidates(hidden, dtype) if configs is None else configs:
        out.fill_(float("nan"))
        try:
            t = measure(lambda c=config: grid_mlp_triton(mlp, grid, mode, out, **c), device, repeats=10)
        except Exception as err:  # out of shared memory or registers: not a candidate
            results.append({**config, "error": type(err).__name__})
            continue
        error = (out - expected).abs().max().item()  # NaN where anything was left unwritten
        results.append({**config, "median_s": t["median_s"], "max_abs_error": error,
                        "correct": error <= TOLERANCE[dtype]})  # fmt: skip
    default = launch_config(hidden, dtype)
    t_default = measure(lambda: grid_mlp_triton(mlp, grid, mode, out), device, repeats=10)["median_s"]
    flops = mlp_flops(widths) * size**2
    print(f"\n{name} {dtype} {size}²: torch eager {eager * 1e3:.3f} ms, "
          f"current {default} {t_default * 1e3:.3f} ms ({eager / t_default:.2f}x)")  # fmt: skip
    for r in sorted((r for r in results if "median_s" in r), key=lambda r: r["median_s"])[:8]:
        print(f"  {r['layout']:6s} BM {r['block_m']:4d} BN {r['block_n']:4d} warps {r['num_warps']:2d} "
              f"stages {r.get('num_stages', 3)}: "
              f"{r['median_s'] * 1e3:.3f} ms, {flops / r['median_s'] / 1e12:.1f} TFLOP/s, "
              f"{eager / r['median_s']:.2f}x eager, max err {r['max_abs_error']:.1e}"
              f"{'' if r['correct'] else '  WRONG (miscompiled?)'}")  # fmt: skip
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"  {len(failed)} configurations did not run ({sorted({r['error'] for r in failed})})")
    return {"mlp": name, "dtype": str(dtype), "size": size, "eager_s": eager, "default": default,
            "default_s": t_default, "results": results}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_grid_mlp", description=__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--mlp", action="append", choices=sorted({name for name, _ in CASES}),
                        help="only these MLPs (repeatable); default: every case")  # fmt: skip
    args = parser.parse_args()
    report = [tune_case(name, dtype, args.size) for name, dtype in CASES if not args.mlp or name in args.mlp]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_grid_mlp.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
