"""Timing that is honest on both devices: warm-up, CUDA events or perf_counter, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def measure(
    fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1, inner: int = 1
) -> dict:
    """Median, min and max seconds per call of ``fn`` over ``repeats`` timings after ``warmup``
    calls; each timing spans ``inner`` back-to-back calls, so on a GPU a short kernel is timed
    with the launch queue full (its throughput) rather than one launch's latency."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
        "inner": inner,
    }


def measure_graph(fn: Callable[[], object], repeats: int = 5, inner: int = 20) -> dict | None:
    """Like :func:`measure` on CUDA, but replaying ``inner`` calls captured in one CUDA graph: the
    kernels' own time, with no launch cost. None when ``fn`` cannot be captured (it synchronises
    or allocates in a way capture forbids)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture: compilation, caches
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except Exception:  # any capture failure means "not capturable"
        torch.cuda.synchronize()
        return None
    graph.replay()
    result = measure(graph.replay, torch.device("cuda"), repeats=repeats)
    for key in ("median_s", "min_s", "max_s"):
        result[key] /= inner
    result["inner"] = inner
    return result


def device_peaks(device: torch.device, quick: bool) -> dict:
    """Measured matrix-multiply FLOP/s and copy bandwidth of the device, the roofs we report against."""
    n = 1024 if quick or device.type == "cpu" else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = measure(lambda: a @ b, device, repeats=3 if quick else 10)
    size = (64 if device.type == "cpu" else 1024) * 2**20 // 4
    src = torch.empty(size, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, repeats=3 if quick else 10)
    return {
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_flops": 2 * n**3 / mm["median_s"],
        "copy_bytes_per_s": 2 * src.numel() * 4 / copy["median_s"],
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
