"""tsai's training-procedure callbacks, for any PyTorch loop: per-sample loss weights (with
label-distribution smoothing), batch subsampling, and scheduled transform magnitudes.

These change what training does, unlike probes, which only watch it; they are here because
the seeds' users reach for them beside the probes (tsai ships them with ShowGraph and
PredictionDynamics), and here they work in a plain loop, not only inside a fastai Learner::

    weights = probescope.kernels.lds_weights(y_train, bins=50)       # imbalanced regression
    loss_fn = WeightedPerSampleLoss(F.mse_loss, weights)
    subsample = BatchSubsampler(sample_pct=0.8, seed=0)
    for index in batches:
        xb, yb, ib = subsample(x[index], y[index], index)
        loss = loss_fn(model(xb), yb, ib)
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from probescope.events import Callback

Annealer = Callable[[float], float]  # training progress in [0, 1] -> a multiplier


# ---- per-sample loss weights ------------------------------------------------------------------
class WeightedPerSampleLoss:
    """``loss_fn`` with a weight per training sample: ``sum(loss_i * w_i) / sum(w_i)`` over the
    batch, ``w_i = weights[index_i]`` (tsai's WeightedPerSampleLoss; ``weights`` e.g. from
    ``probescope.kernels.lds_weights``). ``loss_fn`` is a function with a ``reduction``
    argument (``torch.nn.functional``'s losses) or a loss module with a ``reduction``
    attribute (used through a copy, so the module given is never changed). A sample's loss
    over several elements (a sequence, an image) is their mean."""

    def __init__(self, loss_fn, weights):
        if isinstance(loss_fn, nn.Module):
            if not hasattr(loss_fn, "reduction"):
                raise TypeError(f"WeightedPerSampleLoss: {type(loss_fn).__name__} has no 'reduction' to set")
            self._per_sample = copy.copy(loss_fn)
            self._per_sample.reduction = "none"
        elif callable(loss_fn):
            try:
                takes_reduction = "reduction" in inspect.signature(loss_fn).parameters
            except (TypeError, ValueError):
                takes_reduction = False
            if not takes_reduction:
                raise TypeError(
                    "WeightedPerSampleLoss: loss_fn must take reduction='none' "
                    f"(like torch.nn.functional's losses); {loss_fn!r} does not"
                )
            self._per_sample = lambda pred, target: loss_fn(pred, target, reduction="none")
        else:
            raise TypeError(f"WeightedPerSampleLoss: loss_fn must be callable, got {type(loss_fn).__name__}")
        w = torch.as_tensor(np.asarray(weights) if not isinstance(weights, torch.Tensor) else weights)
        w = w.detach().reshape(-1).to(torch.float32)
        if w.numel() == 0 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("WeightedPerSampleLoss: weights must be finite, >= 0, one per sample")
        self.weights = w
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, index) -> torch.Tensor:
        per_sample = self._per_sample(pred, target)
        per_sample = per_sample.reshape(per_sample.shape[0], -1).mean(1)
        weights = self._on.get(per_sample.device)
        if weights is None:
            weights = self._on[per_sample.device] = self.weights.to(per_sample.device)
        w = weights[torch.as_tensor(index, device=per_sample.device)].to(per_sample.dtype)
        if w.shape != per_sample.shape:
            raise ValueError(
                f"WeightedPerSampleLoss: {w.shape[0]} indices for a batch of {per_sample.shape[0]} samples"
            )
        return (per_sample * w).sum() / w.sum()


# ---- batch subsampling ------------------------------------------------------------------------
class BatchSubsampler:
    """Draws samples and/or sequence steps with replacement from each training batch (tsai's
    BatchSubsampler). ``sample_pct`` (a fraction, or a ``(low, high)`` range drawn from per
    batch) keeps ``round(B * pct)`` random samples; ``step_pct`` keeps that share of the last
    axis's steps, sorted, repeated to the original length when ``same_seq_len``, and applied
    to the targets too with ``update_y`` (sequence targets). Called as ``subsample(x, y,
    *more)``: every tensor after ``x`` is indexed by the same samples (targets, sample
    indices for WeightedPerSampleLoss)."""

    def __init__(
        self,
        sample_pct: float | tuple[float, float] | None = None,
        step_pct: float | tuple[float, float] | None = None,
        *,
        same_seq_len: bool = True,
        update_y: bool = False,
        seed: int | None = None,
    ):
        for name, value in (("sample_pct", sample_pct), ("step_pct", step_pct)):
            if value is None:
                continue
            low, high = value if isinstance(value, tuple) else (value, value)
            if not 0 < low <= high:
                raise ValueError(
                    f"BatchSubsampler: {name} must be > 0 or a (low, high) range of such, got {value!r}"
                )
        if sample_pct is None and step_pct is None:
            raise ValueError("BatchSubsampler: give sample_pct, step_pct or both")
        self.sample_pct, self.step_pct = sample_pct, step_pct
        self.same_seq_len, self.update_y = same_seq_len, update_y
        self.rng = np.random.default_rng(seed)

    def _pct(self, value) -> float:
        return float(self.rng.uniform(*value)) if isinstance(value, tuple) else float(value)

    def __call__(self, x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors = [x, *others]
        if self.sample_pct is not None:
            b = x.shape[0]
            keep = self.rng.choice(b, max(1, round(b * self._pct(self.sample_pct))), replace=True)
            index = torch.as_tensor(keep, device=x.device)
            tensors = [t[index.to(t.device)] for t in tensors]
        if self.step_pct is not None:
            s = x.shape[-1]
            pct = self._pct(self.step_pct)
            steps = self.rng.choice(s, max(1, round(s * pct)), replace=True)
            if pct != 1 and self.same_seq_len:
                steps = np.tile(steps, math.ceil(s / len(steps)))[:s]
            steps = torch.as_tensor(np.sort(steps))
            tensors[0] = tensors[0][..., steps.to(x.device)]
            if self.update_y and len(tensors) > 1:
                tensors[1] = tensors[1][..., steps.to(tensors[1].device)]
        return tuple(tensors)


# ---- scheduled transform magnitudes -------------------------------------------------------------
def sched_lin(start: float, end: float) -> Annealer:
    """Linear from ``start`` to ``end`` (fastai's SchedLin)."""
    return lambda pos: start + pos * (end - start)


def sched_cos(start: float, end: float) -> Annealer:
    """Half a cosine from ``start`` to ``end`` (fastai's SchedCos)."""
    return lambda pos: start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def sched_exp(start: float, end: float) -> Annealer:
    """Geometric from ``start`` to ``end`` (fastai's SchedExp; both > 0)."""
    if not (start > 0 and end > 0):
        raise ValueError(f"sched_exp needs start and end > 0, got {start}, {end}")
    return lambda pos: start * (end / start) ** pos


def sched_no(start: float, end: float = 0.0) -> Annealer:
    """Constant ``start`` (fastai's SchedNo)."""
    return lambda pos: start


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Annealer]) -> Annealer:
    """``scheds[i]`` over the ``i``-th share ``pcts[i]`` of training (fastai's combine_scheds)."""
    if len(pcts) != len(scheds) or not pcts:
        raise ValueError("combine_scheds: one share of training per schedule")
    if any(p < 0 for p in pcts) or not math.isclose(sum(pcts), 1.0):
        raise ValueError(f"combine_scheds: shares must be >= 0 and sum to 1, got {list(pcts)}")
    edges = np.concatenate([[0.0], np.cumsum(pcts)])

    def combined(pos: float) -> float:
        if pos >= 1:
            return scheds[-1](1.0)
        i = int(np.searchsorted(edges, pos, side="right") - 1)
        return scheds[i]((pos - edges[i]) / (edges[i + 1] - edges[i]))

    return combined


class TransformScheduler(Callback):
    """Scales the ``magnitude`` of each of ``transforms`` by ``schedule(progress)`` as training
    goes on (tsai's TransformScheduler): a Monitor callback. Progress is the optimizer steps
    done over ``total_steps``, so the batch after step k sees ``schedule(k / (total_steps -
    1))``; the magnitudes are restored when the Monitor closes. ``multipliers`` keeps every
    value used; ``figure()`` draws them (tsai's show_plot)."""

    def __init__(self, schedule: Annealer, transforms: Sequence, total_steps: int):
        if not callable(schedule):
            raise TypeError("TransformScheduler: schedule must be callable(progress) -> multiplier")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"TransformScheduler: total_steps must be a positive int, got {total_steps!r}")
        self.transforms = [t for t in transforms if hasattr(t, "magnitude")]
        if not self.transforms:
            raise ValueError("TransformScheduler: none of the transforms has a 'magnitude'")
        self.schedule, self.total_steps = schedule, total_steps
        self.initial = [t.magnitude for t in self.transforms]
        self.multipliers: list[float] = []

    def _apply(self, step: int) -> None:
        multiplier = float(self.schedule(min(step, self.total_steps - 1) / max(1, self.total_steps - 1)))
        self.multipliers.append(multiplier)
        for t, m in zip(self.transforms, self.initial, strict=True):
            t.magnitude = m * multiplier

    def before_fit(self, monitor, **kwargs) -> None:
        self._apply(0)

    def after_step(self, monitor, **kwargs) -> None:
        self._apply(monitor.step_count)

    def after_fit(self, monitor, **kwargs) -> None:
        for t, m in zip(self.transforms, self.initial, strict=True):
            t.magnitude = m

    def figure(self):
        """The multipliers used so far, one per batch."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(self.multipliers)
        ax.set(title="Scheduled transforms", xlabel="batch", ylabel="magnitude multiplier")
        fig.tight_layout()
        return fig


def lds_figure(labels, weights, bins: int = 50):
    """tsai's prepare_LDS_weights plot: the labels' histogram (bars) and the mean weight of the
    samples in each bin (line, right axis)."""
    from matplotlib.figure import Figure

    y = np.asarray(torch.as_tensor(labels).reshape(-1).float())
    w = np.asarray(torch.as_tensor(weights).reshape(-1).float())
    if y.shape != w.shape:
        raise ValueError(f"lds_figure: {y.size} labels but {w.size} weights")
    counts, edges = np.histogram(y, bins=bins)
    which = np.clip(np.digitize(y, edges[1:-1]), 0, bins - 1)
    mean_w = np.bincount(which, weights=w, minlength=bins) / np.maximum(counts, 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(centres, counts, width=edges[1] - edges[0], color="#9ecae1", label="labels")
    ax.set(xlabel="label", ylabel="samples")
    right = ax.twinx()
    right.plot(centres[counts > 0], mean_w[counts > 0], color="#d62728", marker=".", label="weight")
    right.set_ylabel("weight per sample")
    fig.tight_layout()
    return fig
