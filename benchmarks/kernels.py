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
    NONFINITE_RGBA,
    GridSpec,
    default_palette,
    ema_frames,
    grid_mlp,
    interpolate_frames,
    lds_kernel_window,
    lds_weights,
    probs_to_rgba,
    smooth_1d,
    tensor_histogram,
    tensor_stats,
)
from probescope.kernels.interpolate import interpolation_weights
from probescope.kernels.smooth import smoothing_window

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
        # on CUDA, ours also replayed from a CUDA graph: the kernel without its launch cost
        graphed = {f"{ours_impl} (graph)": providers[ours_impl]} if device.type == "cuda" else {}
        providers["torch eager"] = naive_torch(model, grid, dtype, device)
        if device.type == "cuda":
            compiled = torch.compile(model)
            providers["torch.compile"] = naive_torch(compiled, grid, dtype, device)
        else:
            providers["numpy"] = numpy_mlp(model, grid)
        flops = mlp_flops(widths) * size * size
        row = {"op": "grid_mlp", "case": f"{name} {size}² {str(dtype).replace('torch.', '')}", "results": {}}
        for provider, fn in [*providers.items(), *graphed.items()]:
            if provider in graphed:
                t = measure_graph(fn, repeats=repeats, inner=5)
            else:
                t = measure(fn, device, repeats=repeats)
            if t is None:  # not capturable
                continue
            t["points_per_s"] = size * size / t["median_s"]
            t["flops"] = flops / t["median_s"]
            t["fraction_of_matmul_peak"] = t["flops"] / peaks["matmul_flops"]
            row["results"][provider] = t
        row["ours"] = ours_impl
        yield row


def bench_elementwise(device: torch.device, quick: bool, peaks: dict):
    """probs_to_rgba, ema_frames and interpolate_frames on maps; smooth_1d, lds_weights,
    tensor_stats and tensor_histogram on vectors. Providers: ours, torch (the op's reference:
    the exact definition, in float64 where it says so) and, on the CPU, NumPy in float32 as a
    user would write it."""
    ours = "triton" if device.type == "cuda" else "numba"
    repeats = 3 if quick else 7
    sizes = [256, 1024] if quick or device.type == "cpu" else [256, 1024, 2048]
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        cases = _map_cases(size, g, device)
        yield from _rows(cases, f"{size}²", ours, device, repeats, peaks)
    n = 1 << (20 if quick else 22)
    vec = torch.randn(n, generator=g).to(device)
    x, short = vec.cpu().numpy(), vec[: n // 16]
    window = smoothing_window(31, "gaussian").numpy().astype(np.float32)
    cases = {
        "tensor_stats": (lambda i: tensor_stats(vec, impl=i), vec.numel() * 4, lambda: numpy_stats(x)),
        "tensor_histogram 40 bins": (  # two reads: the range, then the bins
            lambda i: tensor_histogram(vec, 40, impl=i),
            vec.numel() * 8,
            lambda: np.histogram(x, 40),
        ),
        "lds_weights": (
            lambda i: lds_weights(vec, bins=100, impl=i),
            vec.numel() * 12,
            lambda: numpy_lds(x, 100),
        ),
        "smooth_1d width 31": (
            lambda i: smooth_1d(short, 31, "gaussian", impl=i),
            n // 16 * 8,
            lambda: np.convolve(x[: n // 16], window, mode="same"),
        ),
    }
    yield from _rows(cases, f"n={n}", ours, device, repeats, peaks)


def _map_cases(size: int, g: torch.Generator, device: torch.device) -> dict:
    probs = torch.softmax(torch.randn(size, size, 7, generator=g), -1).to(device)
    palette = default_palette(7)
    slot = torch.empty(size, size, 4, dtype=torch.uint8, device=device)
    frames = torch.rand(4, size, size, 7, generator=g).to(device)
    p, f = probs.cpu().numpy(), frames.cpu().numpy()
    weights = interpolation_weights(4, "linear").numpy().astype(np.float32).reshape(-1, 1, 1, 1)
    return {
        "probs_to_rgba region": (
            lambda i: probs_to_rgba(probs, "region", palette, out=slot, impl=i),
            probs.numel() * 4 + slot.numel(),
            lambda: numpy_region(p, palette.numpy()),
        ),
        "probs_to_rgba blend": (
            lambda i: probs_to_rgba(probs, "blend", palette, out=slot, impl=i),
            probs.numel() * 4 + slot.numel(),
            lambda: numpy_blend(p, palette.numpy()),
        ),
        "ema_frames 4 frames": (
            lambda i: ema_frames(frames, 0.3, impl=i),
            frames.numel() * 8,
            lambda: numpy_ema(f, 0.3),
        ),
        "interpolate_frames k=4": (
            lambda i: interpolate_frames(frames[0], frames[1], 4, impl=i),
            frames[0].numel() * 4 * 6,
            lambda: f[0] + (f[1] - f[0]) * weights,
        ),
    }


def numpy_region(p: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """probs_to_rgba's region mode in float32 NumPy."""
    top, k = p.max(axis=-1), p.argmax(axis=-1)
    chance = np.float32(1.0 / p.shape[-1])
    shade = np.clip((top - chance) / (1 - chance), 0, 1)[..., None]
    rgba = np.empty((*p.shape[:-1], 4), np.uint8)
    with np.errstate(invalid="ignore"):  # non-finite pixels are overwritten below
        rgba[..., :3] = np.clip(np.floor(255 + (palette[k].astype(np.float32) - 255) * shade + 0.5), 0, 255)
    rgba[..., 3] = 255
    rgba[~np.isfinite(p).all(axis=-1)] = NONFINITE_RGBA
    return rgba


def numpy_blend(p: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """probs_to_rgba's blend mode in float32 NumPy: the class colours mixed by probability."""
    finite = np.isfinite(p).all(axis=-1)
    w = np.clip(np.where(np.isfinite(p), p, 0), 0, None)
    total = w.sum(axis=-1, keepdims=True)
    mixed = (w @ palette.astype(np.float32)) / np.where(total > 0, total, 1)
    rgba = np.empty((*p.shape[:-1], 4), np.uint8)
    rgba[..., :3] = np.clip(np.floor(np.where(total > 0, mixed, 255) + 0.5), 0, 255)
    rgba[..., 3] = 255
    rgba[~finite] = NONFINITE_RGBA
    return rgba


def numpy_ema(frames: np.ndarray, alpha: float) -> np.ndarray:
    out, state = np.empty_like(frames), frames[0].copy()
    for t in range(frames.shape[0]):
        state += np.float32(alpha) * (frames[t] - state)
        out[t] = state
    return out


def numpy_stats(x: np.ndarray, near_zero: float = 1e-6) -> np.ndarray:
    finite = np.isfinite(x)
    f = x[finite] if not finite.all() else x
    a = np.abs(f)
    return np.array([f.mean(), f.var(), a.sum(), np.sqrt(np.dot(f, f)), a.max(),
                     (a <= near_zero).mean(), 1 - finite.mean()])  # fmt: skip


def numpy_lds(y: np.ndarray, bins: int, size: int = 9, sigma: float = 1.0) -> np.ndarray:
    """Gaussian-window LDS weights, inverse density, in NumPy."""
    lo, hi = y.min(), y.max()
    index = np.clip(np.floor((y - lo) * np.float32(bins / (hi - lo))).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    smoothed = np.convolve(counts, lds_kernel_window("gaussian", size, sigma).numpy(), mode="same")
    weights = np.where(smoothed > 0, 1.0 / np.maximum(smoothed, 1e-300), 0.0)
    weights *= counts.sum() / (weights * counts).sum()
    return weights.astype(np.float32)[index]


def _rows(cases, size_label, ours, device, repeats, peaks):
    for op, (fn, nbytes, numpy_fn) in cases.items():
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
        else:
            row["results"]["numpy"] = measure(numpy_fn, device, repeats=repeats)
        for t in row["results"].values():
            t["bytes_per_s"] = nbytes / t["median_s"]
            t["fraction_of_copy_peak"] = t["bytes_per_s"] / peaks["copy_bytes_per_s"]
        yield row


def run(device: torch.device, quick: bool, peaks: dict):
    yield from bench_grid_mlp(device, quick, peaks)
    yield from bench_elementwise(device, quick, peaks)


def count(device: torch.device, quick: bool) -> int:
    elementwise = (2 if quick or device.type == "cpu" else 3) * 4 + 4  # map ops a size, vector ops
    return sum(1 for _ in grid_cases(device, quick)) + elementwise
