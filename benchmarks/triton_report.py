"""What the grid_mlp Triton kernel compiles to on a GPU architecture, without a GPU.

``python -m benchmarks.triton_report [--mlp 2-256-256-256-7] [--dtype bf16] [--arch 90]``
compiles each layout and launch configuration with Triton's own compiler for the named
architecture (sm_90a: Hopper) and reads the binary with the ``cuobjdump`` Triton ships:
registers per thread, bytes of register spills, shared memory, warp-group matrix
products (HGMMA, Hopper's fast form), older warp-level ones (HMMA), and the asynchronous
global-to-shared copies that show the weight loads are pipelined. These are facts about the
code, not timings: they say which configurations are worth timing on a GPU
(``benchmarks.tune_grid_mlp``), and whether a change to the kernel kept its products on the
fast path. The kernel is specialised as a real launch would be (pointers and sizes divisible
by 16 marked so), from the same ``kernel_arguments`` the launcher uses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from benchmarks.kernels import MLPS, build_mlp
from probescope.kernels import GridSpec
from probescope.kernels.backend import triton_interpreting
from probescope.kernels.grid_mlp import output_width, resolve_output
from probescope.kernels.mlp import FusableMLP

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
    torch.uint8: "*u8", torch.int32: "*i32",
}  # fmt: skip
# (layout, BLOCK_M, BLOCK_N, num_warps, num_stages) compiled when none are named
CONFIGS = [
    ("units", 128, 32, 8, 3),  # the tuned default at widths 65-256
    ("units", 128, 64, 8, 2),
    ("units", 64, 64, 4, 2),
    ("pixels", 128, 64, 8, 2),
    ("pixels", 128, 32, 8, 2),
    ("pixels", 64, 64, 8, 2),
    ("pixels", 64, 32, 8, 3),
    ("pixels", 64, 64, 4, 2),
]


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_config(widths: tuple[int, ...], dtype: torch.dtype, config: tuple, arch: int = 90) -> dict:
    """Compile the kernel for the ReLU MLP of ``widths`` in one configuration for ``sm_<arch>``
    and report what the binary holds."""
    from probescope.kernels._triton.grid_mlp import _grid_mlp_kernel, kernel_arguments, layout_constants

    layout, block_m, block_n, num_warps, num_stages = config
    mlp = FusableMLP.from_module(build_mlp(widths, dtype, "cpu"))
    mode = resolve_output("auto", mlp.out_features)
    grid = GridSpec.rectangle((-3.0, 3.0, -3.0, 3.0), 1024, 1024)
    out = torch.empty(1, output_width(mode, mlp.out_features))
    args, constants = kernel_arguments(mlp, grid, mode, out, emulate=False)
    constants = {**constants, "BLOCK_M": block_m, "BLOCK_N": block_n, **layout_constants(layout)}
    signature, attrs = launch_signature(_grid_mlp_kernel, args, constants)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return {"config": config, **compile_kernel(_grid_mlp_kernel, signature, constants, attrs, options, arch)}


def launch_signature(kernel, args: tuple, constants: dict) -> tuple[dict, dict]:
    """The types and specialisations a real launch with ``args`` gives ``kernel``: pointers
    and integers divisible by 16 marked so, the rest typed by value."""
    signature, attrs = {}, {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, args, strict=False)):
        if isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # allocations are 256-byte aligned
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:  # what Triton's launcher specialises on
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    signature.update({name: "constexpr" for name in constants})
    return signature, attrs


def compile_kernel(
    kernel, signature: dict, constants: dict, attrs: dict, options: dict, arch: int = 90
) -> dict:
    """Compile a Triton kernel for ``sm_<arch>`` and read what its binary holds: registers,
    spills, shared memory, matrix products, pipelined copies, and its global loads by width
    (``ldg``: 32-, 64- and 128-bit ``LDG`` instructions); ``error`` where it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget

    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # out of shared memory and the like: a fact about the configuration
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True
        ).stdout
        (Path(tmp) / "kernel.ptx").write_text(ptx)
        arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        for assembler in ("ptxas", "ptxas-blackwell"):  # whichever knows this Triton's PTX version
            info = subprocess.run(
                [_tool(assembler), f"-arch={arch_name}", "-v", str(Path(tmp) / "kernel.ptx"),
                 "-o", str(Path(tmp) / "check.cubin")], capture_output=True, text=True,
            )  # fmt: skip
            if info.returncode == 0:
                break
    registers = re.search(r"Used (\d+) registers", info.stderr)
    spills = re.search(r"(\d+) bytes spill stores", info.stderr)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
        "shared_bytes": int(compiled.metadata.shared),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
        "async_copies": len(re.findall(r"cp\.async\.c[ag]", ptx)) + ptx.count("cp.async.bulk"),
        # ptxas serialising warp-group products it cannot keep in flight (a slow path)
        "wgmma_serialised": "warpgroup.wait is injected" in info.stderr or "C7515" in info.stderr,
        "ldg": {bits: len(re.findall(rf"\bLDG\.E{suffix}\b", sass)) for bits, suffix in _LOAD_WIDTHS},
    }


_LOAD_WIDTHS = ((32, ""), (64, r"\.64"), (128, r"\.128"))


def format_row(r: dict) -> str:
    layout, bm, bn, warps, stages = r["config"]
    head = f"{layout:6s} BM {bm:3d} BN {bn:3d} warps {warps} stages {stages}"
    if "error" in r:
        return f"{head}: {r['error']}"
    return (
        f"{head}: {r['registers']} registers, {r['spill_bytes']} B spilled, "
        f"{r['shared_bytes'] // 1024} KiB shared, {r['hgmma']} HGMMA, {r['hmma']} HMMA, "
        f"{r['async_copies']} async copies"
        + (", ptxas serialises its wgmma" if r["wgmma_serialised"] else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_report", description=__doc__)
    parser.add_argument("--mlp", default="2-256-256-256-7", choices=sorted(MLPS))
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (sm_90a)")
    parser.add_argument(
        "--config", action="append", default=[], metavar="LAYOUT,BM,BN,WARPS,STAGES",
        help="a configuration to compile (repeatable); default: a fixed set of both layouts",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object a configuration")
    args = parser.parse_args(argv)
    if triton_interpreting():
        parser.error("TRITON_INTERPRET is set: interpreted kernels do not compile; unset it")
    configs = [tuple(c.split(",")[:1]) + tuple(int(x) for x in c.split(",")[1:]) for c in args.config]
    import triton

    if not args.json:
        print(f"grid_mlp {args.mlp} {args.dtype} for sm_{args.arch}, triton {triton.__version__}")
    for config in configs or CONFIGS:
        report = compile_config(MLPS[args.mlp], DTYPES[args.dtype], config, args.arch)
        print(json.dumps(report) if args.json else format_row(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
