"""A training framework's own fit with and without probescope's callback: Keras 3 (torch
backend), fastai, Lightning and Hugging Face's Trainer.

Fit: a 2-H-H-7 MLP on the blobs7 data in the framework's own loop, with no callback, and with
a GridProbe and a LossProbe every 10 steps, every step and on one 5 % budget (the Monitor's
``budget=``, shared by both), the variants taking turns round after round (one machine's
noise hits all of them alike; on the CPU every variant trains on all cores but the probe
worker's, as the Monitor advises). Each fit is timed from the end of its first epoch (set-up
and compilation left out) to its last; the table gives the median steps/s per variant and
its ratio to no callback. Keras also times its MLP's grid, fused (``grid_mlp``) against the
model's own forward on the materialised points (the naive way). ``--contention`` instead
trains one fit (no callback) per kind of work from ``benchmarks.contention`` (GIL-holding
Python, short GIL-free calls, the fused grid kernel, written GridProbe and LossProbe frames)
beside a probe worker thread that alternates between that work and rest, and sorts the fit's
steps by phase: what each kind of work costs the framework's own loop. Run:
``python -m benchmarks.fit [--framework keras|fastai|lightning|transformers] [--rounds 3] [--epochs 4]
[--contention] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import probescope as ps
from benchmarks.contention import Alternating, Contention, by_phase
from benchmarks.contention import header as contention_header
from benchmarks.contention import works as contention_works
from benchmarks.overhead import leave_a_core_to_probes
from benchmarks.timing import device_name
from probescope.datasets import make_dataset
from probescope.kernels.grid_mlp import fused_path, grid_mlp, module_forward_on_grid
from probescope.schedule import Budget

VARIANTS = ("off", "idle", "every 10", "every step", "budget 5%")
SCHEDULES = {
    "idle": ps.Schedule.never,  # the callback and the Monitor's per-step work, no frame
    "every 10": lambda: ps.Schedule.every(10),
    "every step": lambda: ps.Schedule.every(1),
    "budget 5%": ps.Schedule.never,  # the Monitor's budget replaces it
}
MONITOR = {"budget 5%": {"budget": 0.05}}  # one budget shared by the probes
LR = 3e-3
CONTENTION = (  # benchmarks.contention's kinds of work that --contention runs beside the fit
    "pure Python 1 ms (holds the GIL), 4 ms asleep",
    "Numba, 0.1 ms calls (GIL released)",
    "fused grid kernel {r}²",
    "GridProbe {r}² frame, written",
    "LossProbe frame ({h} steps), written",
)


BETWEEN_EPOCHS = -1  # the phase of a tick at an epoch's end: no step is measured across it


class Clock:
    """Wall time from the end of the first epoch to the end of the last, and the steps; with
    ``phase`` (a callable), also the time and phase at the end of every step (``ticks``), and
    a tick of phase ``BETWEEN_EPOCHS`` at the end of every epoch."""

    def __init__(self, phase: Callable[[], int] | None = None):
        self.start = self.end = 0.0
        self.steps = 0
        self.phase = phase
        self.ticks: list[tuple[float, int]] = []

    def step_end(self) -> None:
        self.steps += 1
        if self.phase is not None:
            self.ticks.append((time.perf_counter(), self.phase()))

    def epoch_end(self, epoch: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if epoch == 0:
            self.start = now
        self.end = now
        if self.phase is not None:  # the framework's work between epochs is no training step
            self.ticks.append((now, BETWEEN_EPOCHS))

    def rate(self, epochs: int) -> float:
        """Steps per second after the first epoch."""
        return self.steps * (epochs - 1) / epochs / (self.end - self.start)


def torch_mlp(hidden: int, classes: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


class Keras:
    """``model.fit`` of a Keras Sequential on the torch backend."""

    name = "Keras"

    def __init__(self):
        os.environ.setdefault("KERAS_BACKEND", "torch")
        import keras

        from probescope.integrations.keras import ProbescopeCallback

        self.keras, self.callback = keras, ProbescopeCallback
        self.version = f"keras {keras.__version__}"

    def model(self, hidden: int, classes: int):
        keras = self.keras
        keras.utils.set_random_seed(0)
        dense = keras.layers.Dense
        model = keras.Sequential(
            [
                keras.Input((2,)),
                dense(hidden, activation="relu"),
                dense(hidden, activation="relu"),
                dense(classes, activation="softmax"),
            ]
        )
        model.compile(keras.optimizers.Adam(LR), "sparse_categorical_crossentropy")
        return model

    def fit(self, model, data, args, callback, clock: Clock) -> None:
        class Timed(self.keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                clock.epoch_end(epoch)

            def on_train_batch_end(self, batch, logs=None):
                clock.step_end()

        callbacks = [Timed()] if callback is None else [callback, Timed()]
        x, y = data.x_train.numpy(), data.y_train.numpy()
        model.fit(x, y, epochs=args.epochs, batch_size=args.batch_size, verbose=0, callbacks=callbacks)


class Fastai:
    """``Learner.fit`` (Adam, the fastai optimizer) without its progress bars."""

    name = "fastai"

    def __init__(self):
        import fastai
        from fastai.callback.core import Callback
        from fastai.callback.progress import ProgressCallback
        from fastai.data.core import DataLoaders
        from fastai.data.load import DataLoader
        from fastai.learner import Learner
        from fastai.losses import CrossEntropyLossFlat

        from probescope.integrations.fastai import ProbescopeCallback

        self.callback, self.Callback = ProbescopeCallback, Callback
        self.DataLoaders, self.DataLoader, self.Learner = DataLoaders, DataLoader, Learner
        self.loss, self.progress = CrossEntropyLossFlat, ProgressCallback
        self.version = f"fastai {fastai.__version__}"

    def model(self, hidden: int, classes: int) -> nn.Module:
        return torch_mlp(hidden, classes)

    def fit(self, model, data, args, callback, clock: Clock) -> None:
        class Timed(self.Callback):
            order, run_valid = 90, False

            def after_step(self):
                clock.step_end()

            def after_epoch(self):
                clock.epoch_end(self.epoch)

        items = list(zip(data.x_train, data.y_train, strict=True))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        train = self.DataLoader(items, bs=args.batch_size, shuffle=True)
        dls = self.DataLoaders(train, self.DataLoader(items[:0]), device=device)
        learn = self.Learner(dls, model.to(device), loss_func=self.loss())
        learn.remove_cb(self.progress)
        learn.logger = lambda *_: None
        callbacks = [Timed()] if callback is None else [callback, Timed()]
        learn.fit(args.epochs, LR, cbs=callbacks)


class Lightning:
    """``Trainer.fit`` of a LightningModule (Adam) without progress bar, logger or checkpoints."""

    name = "Lightning"

    def __init__(self):
        import lightning as L

        from probescope.integrations.lightning import ProbescopeCallback

        self.L, self.callback = L, ProbescopeCallback
        self.version = f"lightning {L.__version__}"

    def model(self, hidden: int, classes: int):
        L = self.L

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch_mlp(hidden, classes)

            def forward(self, x):
                return self.net(x)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), LR)

        return Module()

    def fit(self, model, data, args, callback, clock: Clock) -> None:
        L = self.L

        class Timed(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                clock.step_end()

            def on_train_epoch_end(self, trainer, pl_module):
                clock.epoch_end(trainer.current_epoch)

        samples = torch.utils.data.TensorDataset(data.x_train, data.y_train)
        loader = torch.utils.data.DataLoader(samples, batch_size=args.batch_size, shuffle=True)
        trainer = L.Trainer(
            max_epochs=args.epochs,
            accelerator="auto",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Timed()] if callback is None else [callback, Timed()],
        )
        trainer.fit(model, loader)


class Transformers:
    """Hugging Face's ``Trainer.train`` (AdamW without weight decay, a constant learning rate)
    without progress bar, logging or checkpoints, on a module that returns its loss and logits
    as a Hugging Face model does."""

    name = "Transformers"

    def __init__(self):
        import transformers
        from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

        from probescope.integrations.transformers import ProbescopeCallback

        self.Trainer, self.TrainerCallback = Trainer, TrainerCallback
        self.TrainingArguments, self.printer = TrainingArguments, PrinterCallback
        self.callback = ProbescopeCallback
        self.version = f"transformers {transformers.__version__}"

    def model(self, hidden: int, classes: int) -> nn.Module:
        class Module(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = torch_mlp(hidden, classes)

            def forward(self, x, labels=None):
                logits = self.net(x)
                if labels is None:
                    return {"logits": logits}
                return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

        return Module()

    def fit(self, model, data, args, callback, clock: Clock) -> None:
        class Timed(self.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.step_end()

            def on_epoch_end(self, args, state, control, **kwargs):
                clock.epoch_end(round(state.epoch) - 1)

        with tempfile.TemporaryDirectory() as out:
            arguments = self.TrainingArguments(
                out,
                num_train_epochs=args.epochs,
                per_device_train_batch_size=args.batch_size,
                learning_rate=LR,
                weight_decay=0.0,
                lr_scheduler_type="constant",
                logging_strategy="no",
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                use_cpu=not torch.cuda.is_available(),
            )
            samples = [{"x": x, "labels": y} for x, y in zip(data.x_train, data.y_train, strict=True)]
            callbacks = [Timed()] if callback is None else [callback, Timed()]
            trainer = self.Trainer(model, arguments, train_dataset=samples, callbacks=callbacks)
            trainer.remove_callback(self.printer)
            trainer.train()


FRAMEWORKS = {"keras": Keras, "fastai": Fastai, "lightning": Lightning, "transformers": Transformers}


def fit_once(framework, variant: str, data, args, out: str) -> tuple[float, dict]:
    """Steps per second after the first epoch, and for a budget each probe's schedule state at
    the end (its interval and what it measured)."""
    model = framework.model(args.hidden, data.num_classes)
    callback = None
    if variant != "off":
        schedule = SCHEDULES[variant]
        probes = [
            ps.GridProbe(data.x_train, data.y_train, resolution=args.resolution, schedule=schedule()),
            ps.LossProbe(schedule=schedule()),
        ]
        run_dir = f"{out}/{variant.replace(' ', '-')}"
        callback = framework.callback(probes, run_dir=run_dir, **MONITOR.get(variant, {}))
    clock = Clock()
    framework.fit(model, data, args, callback, clock)
    states, keys = {}, ("interval", "cost_ms", "probe_ms", "step_ms")
    if callback is not None:
        for name, probe in callback.monitor.summary()["probes"].items():
            if "schedule" in probe:
                states[name] = {k: probe["schedule"][k] for k in keys}
    return clock.rate(args.epochs), states


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


def contention(framework, data, args) -> dict[str, Contention]:
    """One fit (no callback) per kind of work, beside a probe worker thread that alternates
    between that work and rest (benchmarks.contention's method, in the framework's own loop)."""
    history = 10_000
    kinds = contention_works(args.resolution, history_steps=history)
    results = {}
    for name in CONTENTION:
        name = name.format(r=args.resolution, h=history)
        with Alternating(kinds[name](), period=0.1) as alternating:
            clock = Clock(phase=lambda alternating=alternating: alternating.phase)
            framework.fit(framework.model(args.hidden, data.num_classes), data, args, None, clock)
        results[name] = alternating.result(clock.ticks)
        print(f"{name}: {results[name].ratio:.3f}", flush=True)
    return results


class PhaseGate:
    """Time in phases of ``period`` seconds from the first call: even phases off, odd ones on.
    Open (``gate()``) in an on phase until ``margin`` seconds before its end, so that a frame
    started in an on phase ends in it."""

    def __init__(self, period: float, margin: float = 0.05):
        self.period, self.margin = period, min(margin, period / 4)
        self.t0: float | None = None

    def phase(self) -> int:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        return int((now - self.t0) / self.period)

    def __call__(self) -> bool:
        phase = self.phase()
        left = (phase + 1) * self.period - (time.perf_counter() - self.t0)
        return phase % 2 == 1 and left > self.margin


class Gated(ps.Schedule):
    """``inner`` (a budget) asked only while ``gate()`` is open; told every timing."""

    def __init__(self, inner: ps.Schedule, gate: Callable[[], bool]):
        self.inner, self.gate = inner, gate

    def due(self, info) -> bool:
        return self.gate() and self.inner.due(info)

    def observe(self, **times) -> None:
        self.inner.observe(**times)

    def observe_steps(self, steps) -> None:
        self.inner.observe_steps(steps)

    def state(self) -> dict | None:
        return self.inner.state()

    def describe(self) -> dict:
        return {"kind": "gated", "inner": self.inner.describe()}


def budget_by_phase(framework, data, args, fraction: float = 0.05) -> dict:
    """One fit with a GridProbe and a LossProbe sharing a budget of ``fraction`` (each
    ``Budget(fraction / 2, own_share=0.5)``, as ``Monitor(budget=fraction)`` sets them),
    allowed frames only in every other ``--period`` seconds: the steps of the two kinds of
    phase, sorted as benchmarks.contention sorts them, give what the frames cost this fit (the
    callback and the Monitor's per-step work run in both)."""
    gate = PhaseGate(args.period)

    def schedule():
        return Gated(Budget(fraction / 2, own_share=0.5), gate)

    probes = [
        ps.GridProbe(data.x_train, data.y_train, resolution=args.resolution, schedule=schedule()),
        ps.LossProbe(schedule=schedule()),
    ]
    with tempfile.TemporaryDirectory() as out:
        callback = framework.callback(probes, run_dir=f"{out}/by-phase")
        clock = Clock(phase=gate.phase)
        framework.fit(framework.model(args.hidden, data.num_classes), data, args, callback, clock)
        summary = callback.monitor.summary()["probes"]
    off, on = by_phase([tick for tick in clock.ticks if tick[0] >= clock.start])  # after epoch 1
    frames_share = statistics.fmean(on) / statistics.fmean(off) - 1.0
    return {
        "fraction": fraction,
        "period_s": args.period,
        "off_steps": len(off),
        "on_steps": len(on),
        "off_step_ms": statistics.fmean(off) * 1e3,
        "on_step_ms": statistics.fmean(on) * 1e3,
        "frames_share": frames_share,
        "probes": {name: {"frames": p["frames"], **p["schedule"]} for name, p in summary.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=sorted(FRAMEWORKS), default="keras")
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
    parser.add_argument(
        "--budget-by-phase",
        action="store_true",
        help="instead: one fit on a 5 %% budget allowed frames in every other period (--period)",
    )
    parser.add_argument("--period", type=float, default=1.0, help="seconds per phase (--budget-by-phase)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not timed)")
    framework = FRAMEWORKS[args.framework]()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    leave_a_core_to_probes(device)  # every variant, as in the overhead suite and as the Monitor advises
    data = make_dataset("blobs7", seed=0, n=args.samples)
    if args.budget_by_phase:
        result = budget_by_phase(framework, data, args)
        print(
            f"{framework.name} fit, budget 5 % (shared by a GridProbe {args.resolution}² and a LossProbe), "
            f"frames allowed in every other {args.period:g} s: steps {result['off_step_ms']:.3f} ms without "
            f"frames ({result['off_steps']} steps), {result['on_step_ms']:.3f} ms with "
            f"({result['on_steps']}): the frames cost {100 * result['frames_share']:.1f} % of training"
        )
        for name, p in result["probes"].items():
            print(
                f"  {name}: {p['frames']} frames, every {p['interval']} steps at the end, a frame costs "
                f"training {p['cost_ms']} ms as measured (evaluation {p['probe_ms']} ms)"
            )
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"fit_{args.framework}_budget_by_phase.json"
        path.write_text(
            json.dumps(
                {"framework": framework.version, "args": vars(args) | {"out": str(args.out)}, **result},
                indent=1,
            )
        )
        print(f"wrote {path}")
        return 0
    if args.contention:
        print(contention_header(f"the {framework.name} fit"))
        for name, result in contention(framework, data, args).items():
            print(result.row(name))
        return 0
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    budgets: dict[str, list[dict]] = {v: [] for v in VARIANTS}  # per round: each probe's final state
    with tempfile.TemporaryDirectory() as out:
        fit_once(framework, "every step", data, args, f"{out}/warm-up")  # first-use compilation, not timed
        for r in range(args.rounds):
            for variant in VARIANTS:
                rate, states = fit_once(framework, variant, data, args, f"{out}/{r}")
                rates[variant].append(rate)
                budgets[variant] += [states] if states else []
                print(f"round {r + 1}: {variant:>10}: {rate:.1f} steps/s", flush=True)
    off = statistics.median(rates["off"])
    rows = [
        {
            "variant": v,
            "steps_per_s": statistics.median(rates[v]),
            "slowdown": off / statistics.median(rates[v]),
            "rounds": rates[v],
            **({"budget_states": budgets[v]} if budgets[v] else {}),
        }
        for v in VARIANTS
    ]
    model = framework.model(args.hidden, data.num_classes)
    grids = {n: grid_times(model, data, n, 5) for n in (256, 512)} if args.framework == "keras" else {}
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "framework": framework.version,
        "args": {k: str(v) for k, v in vars(args).items()},
        "training_threads": torch.get_num_threads(),
        "grid_path": fused_path(model),  # the model the callback probes (a LightningModule itself)
    }
    print(f"\n{meta['device']} · torch {torch.__version__} · {framework.version} · {meta['date']}")
    print(
        f"{framework.name} fit: 2-{args.hidden}-{args.hidden}-7 on blobs7, batch {args.batch_size}, "
        f"grid {args.resolution}², training on {meta['training_threads']} thread(s)"
    )
    print("| variant | steps/s (median) | time / off |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['steps_per_s']:.1f} | {row['slowdown']:.3f} |")
    for row in rows:  # what the budget measured and chose, per probe (medians over the rounds)
        for name in row.get("budget_states", [{}])[0]:
            final = [states[name] for states in row["budget_states"] if name in states]

            def median(key, final=final):
                values = [s[key] for s in final if s[key] is not None]
                return statistics.median(values) if values else float("nan")

            print(
                f"{row['variant']}, {name}: every {median('interval'):.0f} steps at the end; a frame "
                f"costs training {median('cost_ms'):.2f} ms as measured (evaluation "
                f"{median('probe_ms'):.2f} ms), an idle step {median('step_ms'):.2f} ms"
            )
    if grids:
        print(f"\ngrid of the {framework.name} MLP ({meta['grid_path']}) against its own forward:")
        print("| grid | fused ms | forward ms | speed-up |\n|---|---|---|---|")
        for n, t in grids.items():
            print(f"| {n}² | {t['fused']:.2f} | {t['forward']:.2f} | {t['forward'] / t['fused']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fit_{args.framework}.json"
    path.write_text(json.dumps({"meta": meta, "fit": rows, "grid": grids}, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
