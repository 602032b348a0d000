"""CPU kernels and probe frames against the naive ways, timed interleaved call by call.

The kernels suite times one provider after the other; on a shared machine whose speed drifts
within seconds that skews ratios between providers. Here each pair of calls runs back to back,
``REPEATS`` times, and the ratio is of the medians. Run: ``python -m benchmarks.cpu_interleaved``.
"""

from __future__ import annotations

import statistics
import time

import numba
import numpy as np
import torch

from benchmarks.kernels import build_mlp, naive_torch, numpy_ema, numpy_lds, numpy_region, numpy_stats
from probescope.kernels import (
    GridSpec,
    default_palette,
    ema_frames,
    grid_mlp,
    interpolate_frames,
    lds_weights,
    probs_to_rgba,
    smooth_1d,
    spectral_norm,
    tensor_stats,
)
from probescope.kernels.interpolate import interpolation_weights
from probescope.kernels.smooth import smoothing_window

REPEATS = 15


def interleaved(ours, other, repeats: int = REPEATS) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``other``, called alternately after a warm-up."""
    for _ in range(2):
        ours(), other()
    a, b = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ours()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        other()
        b.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def cases():
    g = torch.Generator().manual_seed(0)
    for widths in [(2, 512, 512, 10), (2, 1024, 1024, 10)]:
        model = build_mlp(widths, torch.float32, "cpu")
        grid = GridSpec.rectangle((-3.0, 3.0, -3.0, 3.0), 256, 256)
        name = "-".join(map(str, widths))
        yield (
            f"grid_mlp {name} 256²",
            lambda m=model, gr=grid: grid_mlp(m, gr, impl="numba"),
            naive_torch(model, grid, torch.float32, "cpu"),
            "torch eager",
            3,
        )
    probs = torch.softmax(torch.randn(1024, 1024, 7, generator=g), -1)
    palette, slot = default_palette(7), torch.empty(1024, 1024, 4, dtype=torch.uint8)
    p = probs.numpy()
    yield (
        "probs_to_rgba region 1024²",
        lambda: probs_to_rgba(probs, "region", palette, out=slot),
        lambda: numpy_region(p, palette.numpy()),
        "numpy",
        REPEATS,
    )
    frames = torch.rand(4, 256, 256, 7, generator=g)
    f = frames.numpy()
    w = interpolation_weights(4, "linear").numpy().astype(np.float32).reshape(-1, 1, 1, 1)
    yield (
        "interpolate_frames k=4 256²",
        lambda: interpolate_frames(frames[0], frames[1], 4),
        lambda: f[0] + (f[1] - f[0]) * w,
        "numpy",
        REPEATS,
    )
    yield (
        "ema_frames 4 frames 256²",
        lambda: ema_frames(frames, 0.3),
        lambda: numpy_ema(f, 0.3),
        "numpy",
        REPEATS,
    )
    x = torch.randn(1 << 22, generator=g)
    xn = x.numpy()
    window = smoothing_window(31, "gaussian").numpy().astype(np.float32)
    yield (
        "smooth_1d width 31 n=2^18",
        lambda: smooth_1d(x[: 1 << 18], 31, "gaussian"),
        lambda: np.convolve(xn[: 1 << 18], window, mode="same"),
        "numpy",
        REPEATS,
    )
    yield "tensor_stats n=2^22", lambda: tensor_stats(x), lambda: numpy_stats(xn), "numpy", REPEATS
    yield "lds_weights n=2^22", lambda: lds_weights(x, bins=100), lambda: numpy_lds(xn, 100), "numpy", REPEATS
    for shape in [(256, 256), (1024, 1024)]:
        m = torch.randn(shape, generator=g)
        yield (
            f"spectral_norm {shape[0]}x{shape[1]}, 20 iterations",
            lambda m=m: spectral_norm(m, 20),
            lambda m=m: spectral_norm(m, 20, impl="torch"),
            "torch",
            REPEATS,
        )


def main() -> None:
    print(f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}")
    print("| case | ours ms | baseline | baseline ms | ours is faster by |")
    print("|---|---|---|---|---|")
    for name, ours, other, label, repeats in cases():
        a, b = interleaved(ours, other, repeats)
        print(f"| {name} | {a * 1e3:.2f} | {label} | {b * 1e3:.2f} | {b / a:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
