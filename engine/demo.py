"""The demo: train an MLP on a built-in data set with the fitting probes, record, export."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from probescope.datasets import Dataset, make_dataset
from probescope.export import export_final_pictures, export_probe
from probescope.monitor import Monitor
from probescope.probes import (
    CheckpointProbe,
    CurveProbe,
    GridProbe,
    HistogramProbe,
    LossProbe,
    NeuronProbe,
    PredictionProbe,
    Probe,
)
from probescope.run import open_run
from probescope.schedule import Schedule

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}
SETTINGS = {
    #            widths (hidden),  activation, epochs, learning rate
    "blobs7": ((64, 64), "relu", 20, 3e-3),
    "moons": ((64, 64), "relu", 25, 1e-2),
    "spirals": ((128, 128, 128), "relu", 60, 5e-3),
    "wave": ((64, 64, 64), "silu", 60, 5e-3),
    "peaks": ((64, 64, 64), "silu", 40, 5e-3),
}


def build_mlp(widths: list[int] | tuple[int, ...], activation: str = "relu") -> nn.Sequential:
    """``Linear`` layers of the given widths with ``activation`` between them."""
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def demo_probes(data: Dataset, resolution: int = 192, model: nn.Module | None = None) -> list[Probe]:
    """The probes that fit the data set: a map (of classes, or of a regression's values) or a
    curve (one input), predictions and losses, the best weights by the valid result the loop
    logs each epoch, the distributions of the layers' weights, gradients and outputs over
    training, and given the model, the maps of its last hidden layer's units."""
    dense_early = Schedule.log_spaced(12)
    best_by = "valid_loss" if data.task == "regression" else "valid_accuracy"
    probes: list[Probe] = [
        PredictionProbe(data.x_valid, data.y_valid, schedule=Schedule.every_epoch()),
        LossProbe(schedule=Schedule.every_epoch()),
        CheckpointProbe(best_by, schedule=Schedule.every_epoch()),
        HistogramProbe(
            [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] if model is not None else "*",
            targets=("weights", "grads", "activations"),
            batch=data.x_valid[:512],
            schedule=Schedule.every_epoch(),  # with the epoch's frames: one snapshot for them all
        ),
    ]
    if data.input_dim == 1:
        probes.insert(
            0,
            CurveProbe(
                data.x_train,
                data.y_train,
                loss_smoothing=41,
                graph_sparsity=2,
                band="rms",
                schedule=dense_early | Schedule.every(25),
            ),
        )
    else:
        mode = "value" if data.task == "regression" else "prob" if data.num_classes == 2 else "region"
        probes.insert(
            0,
            GridProbe(
                data.x_train,
                data.y_train,
                resolution=resolution,
                mode=mode,
                point_sparsity=2,
                schedule=dense_early | Schedule.every_epoch(2),
            ),
        )
        hidden = [name for name, m in (model.named_children() if model is not None else []) if name][:-1]
        if hidden:  # the activation before the output layer
            probes.insert(
                1,
                NeuronProbe(
                    data.x_train,
                    hidden[-1],
                    units=16,
                    resolution=40,
                    schedule=Schedule.every_epoch(2),  # a picture now and then: the map is the live view
                ),
            )
    return probes


def _loss_fn(data: Dataset):
    return nn.functional.cross_entropy if data.task == "classification" else nn.functional.mse_loss


def _targets(data: Dataset, y: torch.Tensor) -> torch.Tensor:
    return y if data.task == "classification" else y[:, None]


def evaluate(model: nn.Module, data: Dataset) -> dict[str, float]:
    """Valid loss, plus accuracy for classification."""
    with torch.no_grad():
        out = model(data.x_valid)
        result = {"valid_loss": float(_loss_fn(data)(out, _targets(data, data.y_valid)))}
        if data.task == "classification":
            result["valid_accuracy"] = float((out.argmax(1) == data.y_valid).float().mean())
    return result


def train(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    monitor: Monitor | None = None,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """A plain PyTorch loop; with a monitor it reports every step, epoch and valid result."""
    loss_fn = _loss_fn(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if monitor is not None:
        monitor.optimizer = optimizer
    generator = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    result: dict[str, float] = {}
    bar = tqdm(range(epochs), desc=desc, disable=not progress, unit="epoch")
    for _ in bar:
        model.train()
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            loss = loss_fn(model(data.x_train[idx]), _targets(data, data.y_train[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if monitor is not None:
                monitor.step(loss=loss.detach())
        model.eval()
        result = evaluate(model, data)
        if monitor is not None:
            monitor.log(**result)
            monitor.end_epoch()
        bar.set_postfix({k.removeprefix("valid_"): f"{v:.4f}" for k, v in result.items()})
    return result


@dataclass
class DemoResult:
    """What the demo did and where it put it."""

    dataset: str
    out: Path
    epochs: int
    steps: int
    metrics: dict[str, float]
    seconds_with_probes: float
    seconds_without_probes: float | None
    seconds_closing: float
    probe_summary: dict
    files: list[Path] = field(default_factory=list)
    best: dict | None = None  # the best checkpoint: metric, value, step, file

    def report(self) -> str:
        """A human-readable summary."""
        lines = [f"probescope demo: {self.dataset} -> {self.out}"]
        metric = (
            ("valid accuracy", self.metrics["valid_accuracy"])
            if "valid_accuracy" in self.metrics
            else ("valid loss (MSE)", self.metrics["valid_loss"])
        )
        lines.append(f"  {metric[0]} {metric[1]:.4f} after {self.epochs} epochs ({self.steps} steps)")
        frames = ", ".join(f"{n} {s['frames']}" for n, s in self.probe_summary.items())
        lines.append(f"  frames recorded: {frames}")
        costs = ", ".join(f"{n} {s['mean_ms']:.1f} ms" for n, s in self.probe_summary.items())
        lines.append(f"  cost per probe frame (worker thread): {costs}")
        skipped = sum(s["skipped"] for s in self.probe_summary.values())
        failed = sum(s["failed"] for s in self.probe_summary.values())
        lines.append(f"  probes skipped while busy: {skipped}, failed: {failed}")
        if self.best is not None:
            lines.append(
                f"  best weights: {self.best['metric']} {self.best['value']:.4f} at step {self.best['step']}"
                f" -> {self.best['file']}"
            )
        if self.seconds_without_probes:
            ratio = self.seconds_with_probes / self.seconds_without_probes
            step_ms = 1e3 * self.seconds_without_probes / max(self.steps, 1)
            lines.append(
                f"  training loop: {self.seconds_with_probes:.2f} s with probes, "
                f"{self.seconds_without_probes:.2f} s without ({ratio:.2f}x); "
                f"final frames and flush {self.seconds_closing:.2f} s"
            )
            lines.append(
                f"    (steps of {step_ms:.2f} ms, mostly Python, which the probe thread shares; the demo "
                "films training, a frame every few steps: Schedule.budget(0.05) keeps probes to 5 % "
                "of a loop's time)"
            )
        else:
            lines.append(f"  training loop: {self.seconds_with_probes:.2f} s with probes")
        lines.append("  files: " + ", ".join(str(p.relative_to(self.out)) for p in self.files))
        return "\n".join(lines)


def run_demo(
    dataset: str = "blobs7",
    out: str | Path | None = None,
    *,
    epochs: int | None = None,
    seed: int = 0,
    baseline: bool = True,
    export: bool = True,
    resolution: int = 192,
    progress: bool = True,
    viewer: bool | str = False,
) -> DemoResult:
    """Train on ``dataset`` without probes (the baseline), then with them; record and export.

    ``viewer``: watch it in the OpenGL viewer while it trains (see Monitor)."""
    data = make_dataset(dataset, seed=seed)
    epochs = SETTINGS[dataset][2] if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    out = Path(out or f"runs/demo-{dataset}")
    # Leave one core to the probe worker. Both runs use the same setting, so the comparison
    # is fair; this model trains no slower on one thread fewer, and a training loop whose
    # OpenMP team shares a core with the worker slows down at every parallel region.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    try:
        return _run_demo(data, dataset, out, epochs, seed, baseline, export, resolution, progress, viewer)
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    data: Dataset,
    dataset: str,
    out: Path,
    epochs: int,
    seed: int,
    baseline: bool,
    export: bool,
    resolution: int,
    progress: bool,
    viewer: bool | str,
) -> DemoResult:
    hidden, activation, _, lr = SETTINGS[dataset]
    widths = [data.input_dim, *hidden, data.output_dim]

    seconds_without = None
    if baseline:
        # Warm up (allocator, thread pools, kernels) so that neither timed run pays for it.
        torch.manual_seed(seed)
        train(build_mlp(widths, activation), data, epochs=1, lr=lr, seed=seed, progress=False)
        torch.manual_seed(seed)
        model = build_mlp(widths, activation)
        t0 = time.perf_counter()
        train(model, data, epochs=epochs, lr=lr, seed=seed, desc="baseline (no probes)", progress=progress)
        seconds_without = time.perf_counter() - t0

    torch.manual_seed(seed)
    model = build_mlp(widths, activation)
    monitor = Monitor(
        model,
        demo_probes(data, resolution, model),
        run_dir=out,
        overwrite=True,
        viewer=viewer,
        metadata={
            "demo": {
                "dataset": dataset,
                "widths": widths,
                "activation": activation,
                "epochs": epochs,
                "seed": seed,
                "lr": lr,
            }
        },
    )
    monitor.start()
    t0 = time.perf_counter()
    metrics = train(
        model, data, epochs=epochs, lr=lr, seed=seed, monitor=monitor, desc="with probes", progress=progress
    )
    seconds_with = time.perf_counter() - t0
    monitor.close()
    seconds_closing = time.perf_counter() - t0 - seconds_with

    files: list[Path] = []
    if export:
        run = open_run(out)
        main = next(n for n, record in run.probes.items() if record.kind in ("grid", "curve"))
        files += export_probe(
            run.probe(main),
            out,
            ("mp4", "gif"),
            interpolate=3,
            method="smoothstep",
            fps=15,
            progress=progress,
        )
        files += export_final_pictures(run, out)
    summary = monitor.summary()
    checkpoint = next((p for p in monitor.probes.values() if isinstance(p, CheckpointProbe)), None)
    best = None
    if checkpoint is not None and checkpoint.best is not None:
        best = {
            **checkpoint.best,
            "metric": checkpoint.metric,
            "file": (checkpoint.directory / checkpoint.best["file"]).relative_to(out),
        }
    return DemoResult(
        dataset,
        out,
        epochs,
        summary["steps"],
        metrics,
        seconds_with,
        seconds_without,
        seconds_closing,
        summary["probes"],
        files,
        best,
    )
