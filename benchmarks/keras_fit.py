"""Keras ``model.fit`` with and without probescope's callback, and a Keras MLP's grid, fused
against its own forward.

Fit: a Keras MLP on the blobs7 data, with no callback, and with a GridProbe and a LossProbe
every 10 steps, every step and on a 5 % budget, the variants taking turns round after round
(one machine's noise hits all of them alike; on the CPU every variant trains on all cores but
the probe worker's, as the Monitor advises). Each fit is timed from the end of its first epoch
(set-up and compilation left out) to its last; the table gives the median steps/s per variant
and its ratio to no callback. Grid: the trained model's class probabilities over a square
grid, by the fused kernel (``grid_mlp``) and by the model's own forward on the materialised
points (the naive way), median of repeats. ``--contention`` instead times the fit (no
callback) alone and beside probescope's worker thread looping over the fused grid kernel,
over whole GridProbe frames or over long matrix products: what work on the other core costs
the loop. Run:
``python -m benchmarks.keras_fit [--rounds 3] [--epochs 4] [--contention] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import torch

import probescope as ps
from benchmarks.overhead import leave_a_core_to_probes
from benchmarks.timing import device_name
from probescope.datasets import make_dataset
from probescope.integrations.keras import ProbescopeCallback
from probescope.kernels.grid_mlp import fused_path, grid_mlp, module_forward_on_grid
from probescope.probes.base import ProbeContext
from probescope.worker import ProbeWorker

VARIANTS = ("off", "every 10", "every step", "budget 5%")
SCHEDULES = {
    "every 10": lambda: ps.Schedule.every(10),
    "every step": lambda: ps.Schedule.every(1),
    "budget 5%": lambda: ps.Schedule.budget(0.05),
}


class EpochClock(keras.callbacks.Callback):
    """Wall time from the end of the first epoch to the end of the last, and the steps in it."""

    def __init__(self):
        super().__init__()
        self.start = self.end = 0.0
        self.steps = 0

    def on_epoch_end(self, epoch, logs=None):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if epoch == 0:
            self.start = now
        self.end = now

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1


def build(hidden: int, classes: int):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    return model


def fit_once(variant: str, data, args, out: str) -> float:
    """Steps per second after the first epoch."""
    model = build(args.hidden, data.num_classes)
    clock = EpochClock()
    callbacks = [clock]
    if variant != "off":
        schedule = SCHEDULES[variant]
        probes = [
            ps.GridProbe(data.x_train, data.y_train, resolution=args.resolution, schedule=schedule()),
            ps.LossProbe(schedule=schedule()),
        ]
        callbacks.insert(0, ProbescopeCallback(probes, run_dir=f"{out}/{variant.replace(' ', '-')}"))
    x, y = data.x_train.numpy(), data.y_train.numpy()
    model.fit(x, y, epochs=args.epochs, batch_size=args.batch_size, verbose=0, callbacks=callbacks)
    steps_after_first = clock.steps * (args.epochs - 1) / args.epochs
    return steps_after_first / (clock.end - clock.start)


def grid_times(model, data, resolution: int, repeats: int) -> dict[str, float]:
    probe = ps.GridProbe(data.x_train, resolution=resolution)
    spec = probe.grid
    timings = {}
    for name, fn in (
        ("fused", lambda: grid_mlp(model, spec)),
        ("forward", lambda: module_forward_on_grid(model, spec)),
    ):
        fn()  # compiled / warm
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t)
        timings[name] = statistics.median(samples) * 1e3
    return timings


def contention(data, args) -> dict[str, float]:
    """Keras fit (no callback) alone and beside a probe worker that loops over one kind of
    work, taking turns: the median steps/s of each."""
    model = build(args.hidden, data.num_classes)
    spec = ps.GridProbe(data.x_train, resolution=512).grid
    big = torch.randn(3000, 3000)

    def grid_loop(stop):  # the fused grid kernel, as the probe worker runs it (the GIL released)
        while not stop.is_set():
            grid_mlp(model, spec)

    def matmul_loop(stop):  # one long torch call after another (the GIL released ~1 s at a time)
        while not stop.is_set():
            big @ big

    probe = ps.GridProbe(data.x_train, data.y_train, resolution=args.resolution)
    probe.attach(model)

    def frame_loop(stop):  # whole GridProbe frames (kernels, colours, finiteness check, glue)
        while not stop.is_set():
            probe.evaluate(model, ProbeContext(0, 0, {}))

    loads = {
        "alone": None,
        "beside the fused grid kernel": grid_loop,
        f"beside GridProbe {args.resolution}² frames": frame_loop,
        "beside 3000² matmuls": matmul_loop,
    }
    grid_mlp(model, spec)  # compiled before timing
    rates: dict[str, list[float]] = {k: [] for k in loads}
    for r in range(args.rounds):
        for name, load in loads.items():
            stop = threading.Event()
            worker = ProbeWorker(threads=1)  # one torch and one Numba thread, as for probes
            if load is not None:
                worker.submit(functools.partial(load, stop))
            try:
                rates[name].append(fit_once("off", data, args, ""))
            finally:
                stop.set()
                worker.close()
            print(f"round {r + 1}: {name:>32}: {rates[name][-1]:.1f} steps/s", flush=True)
    return {k: statistics.median(v) for k, v in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument(
        "--contention", action="store_true", help="instead: the fit alone and beside other work (no probes)"
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    leave_a_core_to_probes(device)  # every variant, as in the overhead suite and as the Monitor advises
    data = make_dataset("blobs7", seed=0, n=args.samples)
    if args.contention:
        medians = contention(data, args)
        alone = medians["alone"]
        print("| Keras fit | steps/s (median) | time / alone |\n|---|---|---|")
        for name, rate in medians.items():
            print(f"| {name} | {rate:.1f} | {alone / rate:.3f} |")
        return 0
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as out:
        fit_once("every step", data, args, f"{out}/warm-up")  # first-use compilation, not timed
        for r in range(args.rounds):
            for variant in VARIANTS:
                rates[variant].append(fit_once(variant, data, args, f"{out}/{r}"))
                print(f"round {r + 1}: {variant:>10}: {rates[variant][-1]:.1f} steps/s", flush=True)
    off = statistics.median(rates["off"])
    rows = [
        {
            "variant": v,
            "steps_per_s": statistics.median(rates[v]),
            "slowdown": off / statistics.median(rates[v]),
        }
        for v in VARIANTS
    ]
    model = build(args.hidden, data.num_classes)
    grids = {n: grid_times(model, data, n, 5) for n in (256, 512)}
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "keras": keras.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "training_threads": torch.get_num_threads(),
        "grid_path": fused_path(model),
    }
    print(f"\n{meta['device']} · torch {torch.__version__} · keras {keras.__version__} · {meta['date']}")
    print(
        f"fit: 2-{args.hidden}-{args.hidden}-7 on blobs7, batch {args.batch_size}, grid {args.resolution}², "
        f"training on {meta['training_threads']} thread(s)"
    )
    print("| variant | steps/s (median) | time / off |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['steps_per_s']:.1f} | {row['slowdown']:.3f} |")
    print(f"\ngrid of the Keras MLP ({meta['grid_path']}) against its own forward:")
    print("| grid | fused ms | forward ms | speed-up |\n|---|---|---|---|")
    for n, t in grids.items():
        print(f"| {n}² | {t['fused']:.2f} | {t['forward']:.2f} | {t['forward'] / t['fused']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "keras_fit.json"
    path.write_text(json.dumps({"meta": meta, "fit": rows, "grid": grids}, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
