"""The overhead suite: what probes cost a training loop, probes off vs on, in one run.

Workloads: (a) an MLP on 2-D blobs with a GridProbe (512², and 1024² on CUDA); (b) a
ResNet-18-sized CNN (11 M parameters) on random images with a PredictionProbe; (c) a
GPT-style Transformer on random tokens with a PredictionProbe on a fixed batch and a
StatsProbe on every weight (about 100 M parameters on CUDA; 3 M with ``--quick`` or on the
CPU, where the full size would take hours). Each runs with probes off, every step, every 10
steps, and at budgets of 2 % and 5 % (the Monitor's ``budget=``: one budget that the
workload's probes share), interleaved round by round on the same model so that
drift in the machine's speed falls on every mode alike; from the second round on, probes
off is timed over the longest window of the round before. Per mode: steps/s, the slowdown
against probes off (time per step / time per step off), probe latency (mean evaluation
time) and frames/s. Step times end with a device synchronisation on CUDA. The MLP's steps
(about 1.5 ms of Python and launches on an H100) are the most exposed to the machine's drift
(about ±10 % between windows a few seconds apart there): its windows with probes each come
right after a window with probes off as long, and its slowdown is the median of those pairs'
ratios, over five rounds (three with ``--quick``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from probescope import GridProbe, Monitor, PredictionProbe, Schedule, StatsProbe
from probescope.datasets import make_dataset
from probescope.zoo import SmallResNet


@dataclass(frozen=True)
class Mode:
    """How the probes run in one mode: their schedule and extra Monitor options."""

    schedule: Callable[[], Schedule]
    options: Mapping = field(default_factory=dict)
    probes: Callable[[Callable[[], Schedule]], list] | None = None  # instead of the workload's


MODES: dict[str, Mode | None] = {
    "off": None,
    "every step": Mode(lambda: Schedule.every(1)),
    "every 10": Mode(lambda: Schedule.every(10)),
    # One budget for the whole Monitor, shared by its probes (it replaces their schedules).
    "budget 2%": Mode(Schedule.never, {"budget": 0.02}),
    "budget 5%": Mode(Schedule.never, {"budget": 0.05}),
}


@dataclass
class Workload:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    probes: Callable[[Callable[[], Schedule]], list]  # a schedule factory -> fresh probes
    steps: int  # timed steps per mode and round
    warmup: int = 3
    rounds: int = 3
    paired: bool = False  # a window with probes off right before each window with probes


class GPT(nn.Module):
    """A decoder-only Transformer (pre-norm blocks, causal attention, tied embeddings).

    Training mode returns logits for every position; eval mode the last position's only,
    which is what the prediction probe scores (the next token after a fixed prompt)."""

    def __init__(self, vocab: int, context: int, d_model: int, layers: int, heads: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Parameter(torch.randn(context, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.blocks(self.tokens(x) + self.positions[:t], mask=self.mask[:t, :t], is_causal=True)
        h = self.norm(h if self.training else h[:, -1])
        return h @ self.tokens.weight.T


def mlp_workload(device: torch.device, resolution: int, quick: bool) -> Workload:
    data = make_dataset("blobs7", seed=0)
    x, y = data.x_train.to(device), data.y_train.to(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7)).to(
        device
    )
    gen = torch.Generator(device=device).manual_seed(0)

    def batch():
        idx = torch.randint(0, len(x), (256,), device=device, generator=gen)
        return x[idx], y[idx]

    return Workload(
        f"MLP 2-64-64-7, GridProbe {resolution}²",
        model,
        torch.optim.Adam(model.parameters(), 1e-3),
        batch,
        F.cross_entropy,
        lambda s: [GridProbe(data.x_train, data.y_train, resolution=resolution, schedule=s())],
        steps=400 if quick else 1000,
        rounds=3 if quick else 5,
        paired=True,
    )


def resnet_workload(device: torch.device, quick: bool) -> Workload:
    torch.manual_seed(0)
    model = SmallResNet(10, 3, widths=(64, 128, 256, 512), blocks=2).to(device)  # ResNet-18's stages
    size, batch_size = (32, 16) if device.type == "cpu" else (64, 256)
    gen = torch.Generator().manual_seed(0)
    held_x, held_y = (
        torch.randn(256, 3, size, size, generator=gen),
        torch.randint(0, 10, (256,), generator=gen),
    )
    x = torch.randn(batch_size, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return Workload(
        f"ResNet-18-sized CNN ({params:.1f} M), batch {batch_size}x3x{size}², PredictionProbe",
        model,
        torch.optim.SGD(model.parameters(), 0.01, momentum=0.9),
        lambda: (x, y),
        F.cross_entropy,
        lambda s: [PredictionProbe(held_x, held_y, schedule=s())],
        steps=8 if device.type == "cpu" else 100,
    )


def gpt_workload(device: torch.device, quick: bool) -> Workload:
    small = quick or device.type == "cpu"
    vocab, context, d, layers, heads, batch_size = (
        (2048, 64, 256, 4, 4, 8) if small else (16384, 256, 768, 12, 12, 32)
    )
    torch.manual_seed(0)
    model = GPT(vocab, context, d, layers, heads).to(device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch_size, context + 1), generator=gen).to(device)
    prompts = torch.randint(0, vocab, (64, context), generator=gen)
    answers = torch.randint(0, vocab, (64,), generator=gen)
    params = sum(p.numel() for p in model.parameters()) / 1e6

    def probes(schedule: Callable[[], Schedule]) -> list:
        return [
            PredictionProbe(prompts, answers, schedule=schedule(), name="prediction"),
            StatsProbe("blocks.layers.*", schedule=schedule(), name="stats"),
        ]

    return Workload(
        f"GPT ({params:.0f} M, {layers} layers, d {d}), batch {batch_size}x{context}, Prediction+StatsProbe",
        model,
        torch.optim.AdamW(model.parameters(), 3e-4),
        lambda: (tokens[:, :-1], tokens[:, 1:]),
        lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
        probes,
        steps=8 if device.type == "cpu" else 60,
    )


def workloads(device: torch.device, quick: bool) -> list[Callable[[], Workload]]:
    # The largest cases first, so that a run cut short has measured them.
    small = quick or device.type == "cpu"
    made = [] if small else [lambda: mlp_workload(device, 1024, quick)]
    made += [lambda: gpt_workload(device, quick), lambda: resnet_workload(device, quick)]
    return [*made, lambda: mlp_workload(device, 512, quick)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(w: Workload) -> torch.Tensor:
    """One optimizer step of ``w``; its loss."""
    x, y = w.batch()
    loss = w.loss(w.model(x), y)
    w.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    w.optimizer.step()
    return loss


def _train(
    w: Workload,
    monitor: Monitor | None,
    steps: int,
    calls: list[float] | None = None,
    ends: list[float] | None = None,
) -> None:
    """``steps`` training steps; with ``calls``, the time of each ``monitor.step`` is appended,
    with ``ends`` the clock at the end of each step (host clock, no device sync)."""
    clock = time.perf_counter
    with monitor.training_stream() if monitor is not None else contextlib.nullcontext():
        for _ in range(steps):
            loss = train_step(w)
            if monitor is not None:
                if calls is None:
                    monitor.step(loss=loss.detach())
                else:
                    t0 = clock()
                    monitor.step(loss=loss.detach())
                    calls.append(clock() - t0)
            if ends is not None:
                ends.append(clock())


def _window(
    w: Workload, monitor: Monitor | None, off_step_s: float | None, limit_s: float, longest: int
) -> int:
    """Steps to time: the workload's count, or for a budget two of its intervals (so that the
    window holds frames and their cost is amortised as in a long run), within ``limit_s``.
    Probes off, the longest window of the round before: the reference is sampled over as long
    a stretch as the modes it is compared with, not a short one that a passing burst of the
    machine's other work can make fast or slow."""
    if monitor is None:
        return longest
    intervals = [s["interval"] for p in monitor.probes.values() if (s := p.schedule.state())]
    if not intervals or off_step_s is None:
        return w.steps
    return max(w.steps, min(2 * max(intervals), int(limit_s / off_step_s)))


def measure_modes(
    w: Workload,
    device: torch.device,
    rounds: int,
    limit_s: float = 20.0,
    modes: Mapping[str, Mode | None] = MODES,
    paired: bool = False,
) -> dict[str, dict]:
    """Interleaved rounds of every mode (``off``: probes off, the reference); per mode the
    median step time and probe figures. ``paired``: every window with probes is preceded by
    a window with probes off as long as that mode's window of the round before, and the
    slowdown is the median of the ratios within pairs: drift in the machine's speed over
    seconds (a shared host, clocks) cancels out of each ratio."""
    times: dict[str, list[float]] = {m: [] for m in modes}
    frames: dict[str, list[float]] = {m: [] for m in modes}
    latency: dict[str, list[float]] = {m: [] for m in modes}
    intervals: dict[str, list] = {m: [] for m in modes}
    windows: dict[str, list[int]] = {m: [] for m in modes}
    counts: dict[str, list[int]] = {m: [] for m in modes}
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    w.model.train()
    longest = previous_longest = w.steps
    for _ in range(rounds):
        previous_longest = longest
        for mode, spec in modes.items():
            monitor = None
            pair_off = None
            if paired and spec is not None:  # probes off, right before
                n = windows[mode][-1] if windows[mode] else w.steps
                _train(w, None, w.warmup)
                _sync(device)
                t0 = time.perf_counter()
                _train(w, None, n)
                _sync(device)
                pair_off = (time.perf_counter() - t0) / n
                times["off"].append(pair_off)
            if spec is not None:
                monitor = Monitor(
                    w.model,
                    (spec.probes or w.probes)(spec.schedule),
                    optimizer=w.optimizer,
                    final_frame=False,
                    probe_threads=1,
                    **spec.options,
                )
                monitor.start()
            try:
                _train(w, monitor, w.warmup)
                _sync(device)
                if monitor is not None:  # steady state: the step-0 frame is not part of the window
                    monitor.drain()
                    _train(w, monitor, 6)  # a budget measures idle steps before it settles
                    _sync(device)
                off_step = statistics.median(times["off"]) if times["off"] else None
                steps = _window(w, monitor, off_step, limit_s, previous_longest)
                longest = max(longest, steps)
                before = {n: monitor.ring(n).written for n in monitor.probes} if monitor else {}
                t0 = time.perf_counter()
                _train(w, monitor, steps)
                _sync(device)
                elapsed = time.perf_counter() - t0
                times[mode].append(elapsed / steps)
                windows[mode].append(steps)
                if pair_off is not None:
                    ratios[mode].append(elapsed / steps / pair_off)
                if monitor is not None:
                    written = sum(monitor.ring(n).written - before[n] for n in monitor.probes)
                    frames[mode].append(written / elapsed)
                    counts[mode].append(written)
                    stats = monitor.stats
                    latency[mode].append(statistics.fmean(s.mean_ms for s in stats.values()))
                    states = [p.schedule.state() for p in monitor.probes.values()]
                    intervals[mode] += [s["interval"] for s in states if s]
            finally:
                if monitor is not None:
                    monitor.close()
    off = statistics.median(times["off"])
    results = {}
    for mode in modes:
        step = statistics.median(times[mode])
        r = {"median_s": step, "repeats": rounds, "steps_per_s": 1.0 / step, "slowdown": step / off}
        text = f"{1.0 / step:.1f} steps/s"
        if ratios[mode]:
            r["slowdown"] = statistics.median(ratios[mode])
            r["pair_ratios"] = ratios[mode]
            text += f", slowdown {r['slowdown']:.3f} (median of pairs {_fmt(ratios[mode])})"
        if frames[mode]:
            r["frames_per_s"] = statistics.median(frames[mode])
            r["probe_ms"] = statistics.median(latency[mode])
            text += f", {r['frames_per_s']:.1f} frames/s, probe {r['probe_ms']:.1f} ms"
        if intervals[mode]:
            r["budget_interval"] = intervals[mode][-1]
            text += f", every {r['budget_interval']} steps"
        r["window_steps"] = windows[mode][-1]
        if counts[mode]:
            r["frames_in_window"] = counts[mode]
            text += f"; windows of {windows[mode][-1]} steps held {counts[mode]} frames"
        r["rate"] = text
        results[mode] = r
    return results


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:.3f}" for v in values)


def leave_a_core_to_probes(device: torch.device) -> None:
    """On the CPU, training keeps all but the probe worker's core (as the Monitor advises)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


def run(device: torch.device, quick: bool, peaks: dict):
    leave_a_core_to_probes(device)
    for make in workloads(device, quick):
        w = make()
        results = measure_modes(w, device, w.rounds, paired=w.paired)
        yield {"op": "overhead", "case": w.name, "results": results, "ours": "off", "reference": "off"}
        del w
        if device.type == "cuda":
            torch.cuda.empty_cache()


def count(device: torch.device, quick: bool) -> int:
    return len(workloads(device, quick))
