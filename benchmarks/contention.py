"""What work on a second thread does to a small training loop on the CPU (a diagnostic).

``python -m benchmarks.contention``: the median step time of a 2-64-64-7 MLP (batch 256,
one torch thread) alone, then while another thread loops over one kind of work: the Numba
grid kernel (512², one thread), the same grid in torch, a matrix product, pure Python, a
sleep, a whole GridProbe evaluation, the colour mapping, a finiteness check. Work that holds
the GIL stalls the loop at every torch call; work in kernels that release it barely shows.
"""

from __future__ import annotations

import statistics
import threading
import time

import numba
import torch
import torch.nn.functional as F
from torch import nn

from probescope import GridProbe
from probescope.datasets import make_dataset
from probescope.kernels import GridSpec, default_palette, grid_mlp, probs_to_rgba
from probescope.probes.base import ProbeContext


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7))


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, probe_model = mlp(), mlp().eval()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(256, 2), torch.randint(0, 7, (256,))
    grid = GridSpec.rectangle((-3.0, 3.0, -3.0, 3.0), 512, 512)
    data = make_dataset("blobs7", seed=0)
    probe = GridProbe(data.x_train, data.y_train, resolution=512)
    probe.attach(probe_model)
    probs = grid_mlp(probe_model, grid, impl="numba")
    palette, square = default_palette(7), torch.randn(512, 512)
    work = {
        "numba grid_mlp 512²": lambda: grid_mlp(probe_model, grid, impl="numba"),
        "torch grid 512²": lambda: grid_mlp(probe_model, grid, impl="torch"),
        "matmul 512²": lambda: square @ square,
        "pure Python": lambda: sum(i * i for i in range(10000)),
        "sleep 10 ms": lambda: time.sleep(0.01),
        "GridProbe.evaluate 512²": lambda: probe.evaluate(probe_model, ProbeContext(0, 0, {})),
        "probs_to_rgba 512²": lambda: probs_to_rgba(probs, "region", palette),
        "isfinite 512²x7": lambda: torch.isfinite(probs).all(),
    }

    def steps(n: int = 500) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def background(fn, stop: threading.Event) -> None:
        torch.set_num_threads(1)
        numba.set_num_threads(1)
        while not stop.is_set():
            fn()

    alone = steps()
    print("| beside the loop | median step ms | time / alone |\n|---|---|---|")
    print(f"| nothing | {alone * 1e3:.3f} | 1.00 |")
    for name, fn in work.items():
        stop = threading.Event()
        thread = threading.Thread(target=background, args=(fn, stop))
        thread.start()
        time.sleep(0.3)
        t = steps()
        stop.set()
        thread.join()
        print(f"| {name} | {t * 1e3:.3f} | {t / alone:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
