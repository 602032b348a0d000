"""The model zoo of the analysis demos: the architectures seed 002 studies, on generated data.

Each entry is a model and a task whose data are generated on the spot (no downloads), small
enough to train on a laptop CPU:

- ``mlp``: modular addition ``(a + b) mod p`` with an embedding MLP; with weight decay it
  memorises the training pairs first and generalises much later ("grokking").
- ``transformer``: the same task as a token sequence ``a b =`` for a one-layer Transformer,
  the setting in which grokking was first reported.
- ``lenet5``: LeNet-5 on 32x32 grey images of ten generated texture classes.
- ``resnet``: a small ResNet (three stages of basic blocks) on 32x32 colour textures.

``train_zoo_run`` trains one seed with a StatsProbe recording a run directory;
``run_zoo`` trains several seeds and finds their latent states (probescope.analysis).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from probescope.monitor import Monitor
from probescope.probes.stats import StatsProbe
from probescope.schedule import Schedule
from probescope.validation import positive_int


# ---- tasks -------------------------------------------------------------------------------------
@dataclass
class Task:
    """Generated data: inputs and integer labels, split into train and valid."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    classes: int
    batch_size: int | None  # None: full batch

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_valid)} valid samples of shape "
            f"{tuple(self.x_train.shape[1:])}, {self.classes} classes"
        )


def modadd_task(p: int = 47, train_fraction: float = 0.5, seed: int = 0, with_equals: bool = False) -> Task:
    """Every pair (a, b) with label (a + b) mod p; a random ``train_fraction`` of them to train on.

    ``with_equals`` appends the token ``p`` ("=") for sequence models."""
    if p < 2:
        raise ValueError(f"modadd: p must be >= 2, got {p}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"modadd: train_fraction must be in (0, 1), got {train_fraction}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    if with_equals:
        x = torch.cat([x, torch.full((p * p, 1), p)], dim=1)
    y = (a.reshape(-1) + b.reshape(-1)) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    cut = round(train_fraction * p * p)
    train, valid = order[:cut], order[cut:]
    return Task("modadd", x[train], y[train], x[valid], y[valid], p, None)


def texture_task(channels: int, n: int = 2560, classes: int = 10, size: int = 32, seed: int = 0) -> Task:
    """Ten classes of smooth random textures (low-frequency class prototypes), each sample a
    randomly shifted, contrast-jittered and noisy copy; 80 % train, 20 % valid."""
    g = torch.Generator().manual_seed(1234)  # the classes are the same for every seed
    low = torch.randn(classes, channels, 6, 6, generator=g)
    protos = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    protos = (protos - protos.mean((1, 2, 3), keepdim=True)) / protos.std((1, 2, 3), keepdim=True)
    gs = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gs)
    shifts = torch.randint(-4, 5, (n, 2), generator=gs)
    x = torch.empty(n, channels, size, size)
    for i in range(n):
        x[i] = torch.roll(protos[labels[i]], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gs)) + 0.9 * torch.randn(x.shape, generator=gs)
    cut = int(0.8 * n)
    return Task(f"textures{channels}", x[:cut], labels[:cut], x[cut:], labels[cut:], classes, 128)


# ---- models ------------------------------------------------------------------------------------
class ModAddMLP(nn.Module):
    """Embeddings of a and b, concatenated, through one hidden layer."""

    def __init__(self, p: int, embed: int = 32, hidden: int = 256):
        super().__init__()
        self.embed = nn.Embedding(p, embed)
        self.hidden = nn.Linear(2 * embed, hidden)
        self.act = nn.ReLU()
        self.out = nn.Linear(hidden, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.hidden(self.embed(x).flatten(1))))


class TinyTransformer(nn.Module):
    """Token and position embeddings, pre-norm Transformer encoder layers, readout at the last token."""

    def __init__(self, vocab: int, classes: int, seq_len: int = 3, d_model: int = 64, heads: int = 4,
                 layers: int = 1, ff: int = 256):  # fmt: skip
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.tokens(x) + self.positions[: x.shape[1]])
        return self.head(self.norm(h[:, -1]))


class LeNet5(nn.Module):
    """LeCun et al. (1998): two convolution + pooling stages, three fully connected layers."""

    def __init__(self, classes: int = 10, channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(torch.tanh(self.conv1(x)), 2)
        x = F.avg_pool2d(torch.tanh(self.conv2(x)), 2)
        x = torch.tanh(self.fc1(x.flatten(1)))
        return self.fc3(torch.tanh(self.fc2(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """He et al. (2016) at CIFAR scale: a stem, three stages of basic blocks (16, 32, 64)."""

    def __init__(self, classes: int = 10, channels: int = 3, widths=(16, 32, 64), blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        )
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                stages.append(BasicBlock(cin, w, 2 if i > 0 and b == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(F.relu(self.stem(x)))
        return self.head(h.mean((2, 3)))


@dataclass
class ZooEntry:
    task: Callable[[int], Task]  # seed -> task
    model: Callable[[Task], nn.Module]
    lr: float
    weight_decay: float
    steps: int  # default training length
    hooks: tuple[str, ...] = ("*",)


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(lambda seed: modadd_task(seed=seed), lambda t: ModAddMLP(t.classes), 1e-2, 2.0, 1500),
    "transformer": ZooEntry(
        lambda seed: modadd_task(p=31, train_fraction=0.5, seed=seed, with_equals=True),
        lambda t: TinyTransformer(t.classes + 1, t.classes),
        1e-3,
        1.0,
        3000,
    ),
    "lenet5": ZooEntry(
        lambda seed: texture_task(1, seed=seed), lambda t: LeNet5(t.classes, 1), 2e-3, 1e-4, 400
    ),
    "resnet": ZooEntry(
        lambda seed: texture_task(3, seed=seed), lambda t: SmallResNet(t.classes, 3), 2e-3, 5e-4, 200
    ),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, Task]:
    """Model ``name`` of the zoo (seeded) and its task's data."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose from {sorted(ZOO)}")
    entry = ZOO[name]
    task = entry.task(seed)
    torch.manual_seed(seed)
    return entry.model(task), task


# ---- training ----------------------------------------------------------------------------------
def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred.argmax(-1) == target).float().mean())


def train_zoo_run(
    name: str,
    run_dir,
    *,
    seed: int = 0,
    steps: int | None = None,
    every: int = 10,
    grads: bool = True,
    progress: bool = True,
    states=None,
) -> dict:
    """Train zoo model ``name`` for ``steps`` optimizer steps, recording a StatsProbe table
    (weights, gradients and activations of every module, valid loss and accuracy) every
    ``every`` steps into ``run_dir``. Returns the valid accuracy curve and the run's summary;
    with ``states`` (a state model fitted on earlier runs) also the latent-state changes
    decoded while it trained."""
    from tqdm.auto import tqdm

    model, task = build(name, seed)
    entry = ZOO[name]
    steps = entry.steps if steps is None else positive_int("zoo: steps", steps)
    positive_int("zoo: every", every)
    optimizer = torch.optim.AdamW(model.parameters(), lr=entry.lr, weight_decay=entry.weight_decay,
                                  betas=(0.9, 0.98))  # fmt: skip
    probe = StatsProbe(
        entry.hooks,
        targets=("weights", "grads", "activations") if grads else ("weights", "activations"),
        batch=task.x_valid[:64],
        valid=(task.x_valid, task.y_valid),
        loss_fn=F.cross_entropy,
        metrics={"valid_accuracy": accuracy},
        schedule=Schedule.every(every),
        states=states,
    )
    generator = torch.Generator().manual_seed(seed)
    curve: list[tuple[int, float]] = []
    monitor = Monitor(model, [probe], optimizer=optimizer, run_dir=run_dir, overwrite=True,
                      metadata={"zoo": name, "task": task.describe(), "seed": seed})  # fmt: skip
    with monitor, tqdm(total=steps, desc=f"{name} seed {seed}", disable=not progress, unit="step") as bar:
        for step in range(1, steps + 1):
            x, y = task.x_train, task.y_train
            if task.batch_size is not None:
                idx = torch.randint(0, len(x), (task.batch_size,), generator=generator)
                x, y = x[idx], y[idx]
            model.train()
            out = model(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            monitor.step(loss=loss.detach())
            monitor.log(train_accuracy=accuracy(out.detach(), y))
            if step % every == 0 or step == steps:
                model.eval()
                with torch.no_grad():
                    curve.append((step, accuracy(model(task.x_valid), task.y_valid)))
            bar.update()
    return {"seed": seed, "task": task.name, "valid_accuracy": curve, "summary": monitor.summary(),
            "run_dir": Path(run_dir), "transitions": list(probe.transitions),
            "drivers": list(probe.transition_drivers)}  # fmt: skip


def crossing_step(curve: list[tuple[int, float]], level: float = 0.5) -> int | None:
    """The first step at which the accuracy curve reaches ``level``."""
    return next((s for s, a in curve if a >= level), None)


@dataclass
class ZooResult:
    name: str
    runs: list[dict]
    states: object  # LatentStates
    report: dict[str, Path]
    live: dict | None = None  # one more run, its states decoded while it trained

    def report_text(self) -> str:
        lines = [self.states.summary(), ""]
        for i, run in enumerate(self.runs):
            cross = crossing_step(run["valid_accuracy"])
            final = run["valid_accuracy"][-1][1] if run["valid_accuracy"] else math.nan
            bounds = self.states.boundaries(i)
            near = min(bounds, key=lambda b: abs(b - cross)) if bounds and cross is not None else None
            where = (f"valid accuracy crosses 50 % at step {cross}; nearest state change at step {near}"
                     if cross is not None else "valid accuracy never reaches 50 %")  # fmt: skip
            lines.append(f"seed {run['seed']}: final valid accuracy {final:.3f}; {where}")
        if self.live is not None:
            cross = crossing_step(self.live["valid_accuracy"])
            changes = [step for step, _, _ in self.live["transitions"]]
            where = (
                f"valid accuracy crosses 50 % at step {cross}" if cross is not None else "never reaches 50 %"
            )
            lines.append(
                f"seed {self.live['seed']}, decoded live with this model while it trained: {where}; "
                f"state changes at steps {changes}"
            )
            if cross is not None and changes:
                n = min(range(len(changes)), key=lambda i: abs(changes[i] - cross))
                step, source, target = self.live["transitions"][n]
                drivers = ", ".join(f"{m} {g:+.3g}" for m, g in self.live["drivers"][n])
                lines.append(
                    f"  the change nearest it, {source} -> {target} at step {step}, driven by {drivers}"
                )
        lines.append(f"report: {self.report['report.html']}")
        return "\n".join(lines)


def run_zoo(
    name: str,
    out,
    *,
    seeds: int = 3,
    steps: int | None = None,
    every: int = 10,
    grads: bool = True,
    progress: bool = True,
    live: bool = True,
) -> ZooResult:
    """Train ``seeds`` runs of zoo model ``name`` under ``out/seed<i>`` and write the latent-state
    analysis of all of them to ``out/analysis``; with ``live``, train one more seed under
    ``out/live`` whose StatsProbe decodes its latent states with that model as it trains."""
    from probescope.analysis import latent_states, write_report

    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose from {sorted(ZOO)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = Path(out)
    runs = [
        train_zoo_run(
            name, out / f"seed{s}", seed=s, steps=steps, every=every, grads=grads, progress=progress
        )
        for s in range(seeds)
    ]
    states = latent_states([r["run_dir"] for r in runs], progress=progress)
    report = write_report(states, out / "analysis", title=f"Training map: {name} on {runs[0]['task']}")
    live_run = None
    if live:
        live_run = train_zoo_run(name, out / "live", seed=seeds, steps=steps, every=every, grads=grads,
                                 progress=progress, states=states.state_model())  # fmt: skip
    return ZooResult(name, runs, states, report, live_run)
