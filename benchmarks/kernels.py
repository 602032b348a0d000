"""The kernels suite: each op, ours against the naive ways, at several grid sizes.

On CUDA: Triton against torch eager and torch.compile. On CPU: Numba against torch eager and
NumPy. grid_mlp's naive torch way is what a user writes: materialise the grid's points, call
the model, softmax. Reported per case: time, points/s, achieved FLOP/s or bytes/s and their
fraction of the device's measured peak, and the speed-up over each baseline.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from benchmarks.timing import measure, measure_graph
from probescope.kernels import (
    GridSpec,
    default_palette,
    ema_frames,
    grid_mlp,
    interpolate_frames,
    lds_weights,
    probs_to_rgba,
    smooth_1d,
    tensor_stats,
)

MLPS = {
    "2-32-32-3": (2, 32, 32, 3),
    "2-64-64-3": (2, 64, 64, 3),
    "2-256-256-256-7": (2, 256, 256, 256, 7),
    "2-1024-1024-10": (2, 1024, 1024, 10),
}


def build_mlp(widths, dtype, device) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device, dtype).eval()


def mlp_flops(widths) -> int:
    return 2 * sum(a * b for a, b in itertools.pairwise(widths))


def naive_torch(model, grid: GridSpec, dtype, device):
    points = grid.points(torch.float32).to(device, dtype)  # (N, 2) written, then read by layer 1

    def run():
        with torch.no_grad():
            return torch.softmax(model(points).float(), dim=-1)

    return run


def numpy_mlp(model, grid: GridSpec):
    layers = [
        (m.weight.detach().float().numpy().T, m.bias.detach().float().numpy())
        for m in model
        if isinstance(m, nn.Linear)
    ]
    points = grid.points(torch.float32).numpy()

    def run():
        h = points
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1:
                np.maximum(h, 0.0, out=h)
        h = np.exp(h - h.max(axis=1, keepdims=True))
        return h / h.sum(axis=1, keepdims=True)

    return run


def grid_cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        sizes, dtypes = [256, 1024, 2048], [torch.bfloat16, torch.float32]
        plan = [(m, s, d) for m in MLPS for s in sizes for d in dtypes]
    else:
        sizes = [256, 512] if quick else [256, 512, 1024]
        plan = [(m, s, torch.float32) for m in ("2-32-32-3", "2-64-64-3") for s in sizes]
        plan += [("2-256-256-256-7", 256, torch.float32)]
        if not quick:
            plan += [("2-256-256-256-7", 1024, torch.float32), ("2-1024-1024-10", 256, torch.float32)]
    yield from plan


def bench_grid_mlp(device: torch.device, quick: bool, peaks: dict):
    repeats = 3 if quick else 7
    for name, size, dtype in grid_cases(device, quick):
        widths = MLPS[name]
        model = build_mlp(widths, dtype, device)
        grid = GridSpec.rectangle((-3.0, 3.0, -3.0, 3.0), size, size)
        ours_impl = "triton" if device.type == "cuda" else "numba"
        providers = {ours_impl: lambda m=model, g=grid, i=ours_impl: grid_mlp(m, g, impl=i)}
        providers["torch eager"] = naive_torch(model, grid, dtype, device)
        if device.type == "cuda":
            compiled = torch.compile(model)
            providers["torch.compile"] = naive_torch(compiled, grid, dtype, device)
        else:
            providers["numpy"] = numpy_mlp(model, grid)
        flops = mlp_flops(widths) * size * size
        row = {"op": "grid_mlp", "case": f"{name} {size}² {str(dtype).replace('torch.', '')}", "results": {}}
        for provider, fn in providers.items():
            t = measure(fn, device, repeats=repeats)
            t["points_per_s"] = size * size / t["median_s"]
            t["flops"] = flops / t["median_s"]
            t["fraction_of_matmul_peak"] = t["flops"] / peaks["matmul_flops"]
            row["results"][provider] = t
        row["ours"] = ours_impl
        yield row


def bench_elementwise(device: torch.device, quick: bool, peaks: dict):
    """probs_to_rgba, ema_frames and interpolate_frames on maps; smooth_1d, lds_weights and
    tensor_stats on vectors."""
    ours = "triton" if device.type == "cuda" else "numba"
    repeats = 3 if quick else 7
    sizes = [256, 1024] if quick or device.type == "cpu" else [256, 1024, 2048]
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        cases = _map_cases(size, g, device)
        yield from _rows(cases, f"{size}²", ours, device, repeats, peaks)
    n = 1 << (20 if quick else 22)
    vec = torch.randn(n, generator=g).to(device)
    cases = {
        "tensor_stats": (lambda i: tensor_stats(vec, impl=i), vec.numel() * 4),
        "lds_weights": (lambda i: lds_weights(vec, bins=100, impl=i), vec.numel() * 12),
        "smooth_1d width 31": (lambda i: smooth_1d(vec[: n // 16], 31, "gaussian", impl=i), n // 16 * 8),
    }
    yield from _rows(cases, f"n={n}", ours, device, repeats, peaks)


def _map_cases(size: int, g: torch.Generator, device: torch.device) -> dict:
    probs = torch.softmax(torch.randn(size, size, 7, generator=g), -1).to(device)
    palette = default_palette(7)
    slot = torch.empty(size, size, 4, dtype=torch.uint8, device=device)
    frames = torch.rand(4, size, size, 7, generator=g).to(device)
    return {
        "probs_to_rgba region": (
            lambda i: probs_to_rgba(probs, "region", palette, out=slot, impl=i),
            probs.numel() * 4 + slot.numel(),
        ),
        "ema_frames 4 frames": (lambda i: ema_frames(frames, 0.3, impl=i), frames.numel() * 8),
        "interpolate_frames k=4": (
            lambda i: interpolate_frames(frames[0], frames[1], 4, impl=i),
            frames[0].numel() * 4 * 6,
        ),
    }


def _rows(cases, size_label, ours, device, repeats, peaks):
    for op, (fn, nbytes) in cases.items():
        row = {"op": op, "case": size_label, "results": {}, "ours": ours}
        # Back-to-back calls: a frame op's throughput with the launch queue full.
        inner = 20 if device.type == "cuda" else 1
        for provider in (ours, "torch"):
            t = measure(lambda f=fn, p=provider: f(p), device, repeats=repeats, inner=inner)
            row["results"][provider] = t
        if device.type == "cuda":  # the kernel alone, launches replayed from a CUDA graph
            t = measure_graph(lambda f=fn: f(ours), repeats=repeats)
            if t is not None:
                row["results"][f"{ours} (graph)"] = t
        for t in row["results"].values():
            t["bytes_per_s"] = nbytes / t["median_s"]
            t["fraction_of_copy_peak"] = t["bytes_per_s"] / peaks["copy_bytes_per_s"]
        yield row


def run(device: torch.device, quick: bool, peaks: dict):
    yield from bench_grid_mlp(device, quick, peaks)
    yield from bench_elementwise(device, quick, peaks)


def count(device: torch.device, quick: bool) -> int:
    elementwise = (2 if quick or device.type == "cpu" else 3) * 3 + 3
    return sum(1 for _ in grid_cases(device, quick)) + elementwise
