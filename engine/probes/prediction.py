"""PredictionProbe: the model's predictions on a fixed held-out batch, frame after frame."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from probescope.kernels.colormap import default_palette
from probescope.kernels.mlp import final_output_kind
from probescope.probes.base import (
    Probe,
    ProbeContext,
    as_input_tensor,
    attached_palette,
    batched_forward,
    check_forward,
    check_name_count,
    check_names,
    check_output,
    checked_palette,
    display_name,
    outputs_to_probs,
)
from probescope.schedule import Schedule

TASKS = ("auto", "classification", "binary", "multilabel", "regression")


class PredictionProbe(Probe):
    """Prediction dynamics on a fixed batch (after tsai's PredictionDynamics).

    - ``classification``: per sample, the predicted probability of its true class (drawn as
      a jittered scatter per true class), the predicted class, accuracy and per-class means;
    - ``binary``: the predicted probability of the positive class, accuracy, and the
      sensitivity and specificity at ``threshold``;
    - ``multilabel`` (``y`` a 0/1 row per sample, one column per label, a sigmoid per
      output): per sample and label, the probability the model gives the label's true state
      (present or absent; drawn as a jittered scatter per label), the predictions at
      ``threshold``, the share of labels right (``accuracy``), of samples with every label
      right (``exact_match``), micro-averaged F1, and per label its accuracy, mean and 2x2
      confusion;
    - ``regression``: y_hat for every y, with MSE and R²; with a row of targets per sample
      (one per output), the MSE over them all and the mean of the outputs' R², and each
      output's own.

    ``class_names`` (one per class, label or output) name them in legends, ticks and
    readouts, in place of their indices; ``palette`` colours them (as GridProbe's).

    ``task="auto"`` decides from the targets and the model's output width: a column of
    whole numbers is classes, a row of 0s and 1s per sample labels, anything else
    regression. ``show_perc`` keeps a fixed random fraction of the batch.
    """

    kind = "prediction"
    default_schedule = Schedule.every(10)

    def __init__(
        self,
        x,
        y,
        *,
        task: str = "auto",
        show_perc: float = 1.0,
        threshold: float = 0.5,
        output: str = "auto",
        class_names=None,
        palette=None,
        jitter: float = 0.3,
        seed: int = 0,
        batch_size: int = 65536,
        name: str | None = None,
        schedule: Schedule | None = None,
    ):
        super().__init__(name=name, schedule=schedule)
        owner = f"PredictionProbe {self.name!r}"
        xt = as_input_tensor("x", x, owner=owner)
        yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).detach().cpu()
        if yt.dim() > 2 and math.prod(yt.shape[2:]) == 1:
            yt = yt.reshape(yt.shape[:2])
        if yt.dim() > 2 or yt.dim() == 0:
            raise ValueError(
                f"{owner}: y must hold one target per sample, or one row of targets (one per output "
                f"or label), got shape {tuple(yt.shape)}"
            )
        if yt.dim() == 2 and yt.shape[1] == 1:
            yt = yt[:, 0]
        if yt.shape[0] != xt.shape[0]:
            raise ValueError(f"{owner}: x has {xt.shape[0]} samples but y has {yt.shape[0]}")
        if task not in TASKS:
            raise ValueError(f"{owner}: task must be one of {TASKS}, got {task!r}")
        check_output(owner, output)
        self.class_names = check_names(owner, class_names)
        self.requested_palette = checked_palette(owner, palette)
        self.palette: torch.Tensor | None = None  # (colours, 3) uint8, once attached
        if not 0.0 < show_perc <= 1.0:
            raise ValueError(f"{owner}: show_perc must be in (0, 1], got {show_perc!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"{owner}: threshold must be in (0, 1), got {threshold!r}")
        n_keep = max(1, round(show_perc * xt.shape[0]))
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(xt.shape[0], generator=generator)[:n_keep].sort().values
        self.x, self.y = xt[keep], yt[keep].double()  # (samples,) or (samples, targets)
        self.jitter = (torch.rand(n_keep, generator=generator, dtype=torch.float64) - 0.5) * 2 * jitter
        self.task, self.requested_task = task, task
        self.show_perc, self.threshold, self.output = show_perc, threshold, output
        self.final = "logits"  # what the model's outputs are; read from it when attached
        self.batch_size = batch_size
        self.num_classes: int | None = None  # classes, or labels
        self.outputs = 1 if self.y.dim() == 1 else self.y.shape[1]  # targets per sample

    def warm_up(self, model: nn.Module) -> None:
        batched_forward(model, self.x, self.batch_size, self.graphs)

    def attach(self, model: nn.Module) -> None:
        self.final = final_output_kind(model)  # a Sigmoid / Softmax at the end: already probabilities
        owner = f"PredictionProbe {self.name!r}"
        out = check_forward(owner, model, self.x[:2])
        width = out.reshape(out.shape[0], -1).shape[1]
        integral = bool(torch.all(self.y == self.y.round()))
        task = self.requested_task
        if self.outputs > 1:  # a row of targets per sample: labels, or one target per output
            if width != self.outputs:
                raise ValueError(
                    f"{owner}: y has {self.outputs} targets per sample, the model gives {width} outputs"
                )
            zero_one = bool(
                torch.all((self.y == 0) | (self.y == 1) | ~torch.isfinite(self.y))
            )  # NaN: unknown
            if task == "auto":
                task = "multilabel" if zero_one else "regression"
            if task in ("classification", "binary"):
                raise ValueError(
                    f"{owner}: task {task!r} needs one class label per sample, y has {self.outputs} "
                    "targets per sample (task='multilabel' for a 0/1 row of labels)"
                )
            if task == "multilabel":
                if not zero_one:
                    raise ValueError(f"{owner}: task 'multilabel' needs y of 0s and 1s, one column per label")
                if self.output == "softmax":
                    raise ValueError(
                        f"{owner}: task 'multilabel' takes a sigmoid per label: output must be 'auto', "
                        "'sigmoid' or 'probs', got 'softmax'"
                    )
                self.num_classes = self.outputs
        elif task == "multilabel":
            raise ValueError(f"{owner}: task 'multilabel' needs a row of 0/1 labels per sample, y has one")
        elif task == "auto":
            if not integral:
                task = "regression"
            elif width == 1:
                task = "binary" if set(self.y.unique().tolist()) <= {0.0, 1.0} else "regression"
            else:
                task = "binary" if width == 2 else "classification"
        if task in ("classification", "binary"):
            check_output(owner, self.output, width)
            if not integral:
                raise ValueError(f"{owner}: task {task!r} needs integer class labels")
            self.num_classes = 2 if task == "binary" else width
            if self.y.min() < 0 or self.y.max() >= self.num_classes:
                raise ValueError(
                    f"{owner}: labels must lie in [0, {self.num_classes}), got "
                    f"[{int(self.y.min())}, {int(self.y.max())}]"
                )
        elif task == "regression" and width != self.outputs:
            raise ValueError(f"{owner}: regression needs one output per sample, the model gives {width}")
        count = self.outputs if task == "regression" else self.num_classes
        check_name_count(
            owner, self.class_names, count, "outputs" if task == "regression" else _COUNTED[task]
        )
        self.palette = None  # (None: the drawings' defaults)
        if self.requested_palette is not None:
            self.palette = attached_palette(owner, self.requested_palette, count)
        self.task = task

    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        out = batched_forward(model, self.x, self.batch_size, self.graphs)
        if self.task == "regression":
            return self._regression(out.reshape(out.shape[0], -1).double())
        if self.task == "multilabel":
            return self._multilabel(label_probs(out, self.output, self.final).double())
        probs = outputs_to_probs(out, self.output, self.final).double()
        labels = self.y.long()
        if self.task == "binary":
            prob_pos = probs[:, -1]
            pred = (prob_pos >= self.threshold).long()
            pos, neg = labels == 1, labels == 0
            sens = float((pred[pos] == 1).double().mean()) if pos.any() else np.nan
            spec = float((pred[neg] == 0).double().mean()) if neg.any() else np.nan
            return {
                "prob_pos": prob_pos,
                "accuracy": np.float64(float((pred == labels).double().mean())),
                "sensitivity": np.float64(sens),
                "specificity": np.float64(spec),
                "confusion": _confusion(labels, pred, 2),
            }
        prob_true = probs.gather(1, labels[:, None])[:, 0]
        pred = probs.argmax(dim=1)
        class_mean = torch.full((self.num_classes,), float("nan"), dtype=torch.float64)
        for c in labels.unique().tolist():
            class_mean[c] = prob_true[labels == c].mean()
        return {
            "prob_true": prob_true,
            "pred": pred,
            "accuracy": np.float64(float((pred == labels).double().mean())),
            "class_mean": class_mean,
            "confusion": _confusion(labels, pred, self.num_classes),
        }

    def _regression(self, out: torch.Tensor) -> dict[str, Any]:
        y = self.y.reshape(out.shape)
        known = torch.isfinite(y)  # a target given as NaN is unknown: left out of every score
        count = known.sum(0)
        y0 = torch.where(known, y, 0.0)
        squared = torch.where(known, (out - y0) ** 2, 0.0)
        mse = squared.sum(0) / count  # per output (NaN for one with no target known)
        mean = y0.sum(0) / count
        var = torch.where(known, (y0 - mean) ** 2, 0.0).sum(0) / count
        r2 = torch.where(var > 0, 1.0 - mse / var, torch.full_like(var, math.nan))
        total = int(count.sum())
        frame = {
            "y_pred": out[:, 0] if self.outputs == 1 else out,
            "mse": np.float64(float(squared.sum()) / total if total else math.nan),
            "r2": np.float64(float(r2.nanmean()) if bool(torch.isfinite(r2).any()) else math.nan),
        }
        if self.outputs > 1:  # R² averaged over the outputs, uniformly (scikit-learn's default)
            frame.update(mse_per_output=mse, r2_per_output=r2)
        return frame

    def _multilabel(self, probs: torch.Tensor) -> dict[str, Any]:
        known = torch.isfinite(self.y)  # a label given as NaN is unknown: left out of every score
        present = self.y == 1
        prob_true = torch.where(present, probs, 1.0 - probs)  # the probability of each label's truth
        prob_true = torch.where(known, prob_true, math.nan)
        pred = probs >= self.threshold
        right = (pred == present) & known
        hits = int((pred & present).sum())
        marked = int((pred & known).sum() + present.sum())
        f1 = 2.0 * hits / marked if marked else math.nan  # micro-averaged: every (sample, label)
        # Per label, rows: absent, present; columns: predicted absent, present (known labels only).
        cells = present.long() * 2 + pred.long() + 4 * torch.arange(self.outputs, device=pred.device)
        counted = torch.bincount(cells[known], minlength=4 * self.outputs)
        scored = known.any(1)  # samples with a label known
        return {
            "prob_true": prob_true,
            "pred": pred,
            "accuracy": np.float64(_share(right.sum(), known.sum())),
            "exact_match": np.float64(_share((right | ~known).all(1)[scored].sum(), scored.sum())),
            "f1": np.float64(f1),
            "class_mean": prob_true.nanmean(0),
            "label_accuracy": right.sum(0).double() / known.sum(0),
            "label_confusion": counted.reshape(-1, 2, 2),
        }

    def static(self) -> dict[str, np.ndarray]:
        arrays = {"y_true": self.y.numpy(), "jitter": self.jitter.numpy()}
        if self.palette is not None:
            arrays["palette"] = self.palette.numpy()
        return arrays

    def config(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "num_classes": self.num_classes,
            "outputs": self.outputs,
            "samples": int(self.x.shape[0]),
            "show_perc": self.show_perc,
            "threshold": self.threshold,
            "class_names": None if self.class_names is None else list(self.class_names),
        }


_COUNTED = {"classification": "classes", "binary": "classes (binary)", "multilabel": "labels"}


def _share(part: torch.Tensor, whole: torch.Tensor) -> float:
    """``part / whole`` as a float, NaN for a whole of nothing."""
    return float(part) / float(whole) if int(whole) else math.nan


def label_probs(outputs: torch.Tensor, output: str, final: str = "logits") -> torch.Tensor:
    """``(N, K)`` model outputs -> each of K labels' probability of being present: a sigmoid
    per output, unless the outputs are probabilities already (``probs``, or with ``auto`` a
    model whose last layer is an nn.Sigmoid)."""
    outputs = outputs.reshape(outputs.shape[0], -1)
    if output == "probs" or (output == "auto" and final == "sigmoid"):
        return outputs
    return torch.sigmoid(outputs)


#: A regression's points with one target per sample (matplotlib's "tab:green").
REGRESSION_GREEN = (0.17, 0.63, 0.17)


def scatter_points(task: str, y_true: np.ndarray, jitter: np.ndarray, data) -> np.ndarray:
    """``(points, 2)``: where a frame's predictions are drawn, one point per sample (per sample
    and output, or label, in row order, for a row of targets; none for a target unknown,
    NaN): ŷ against y (regression), the probability of class 1 against the jittered class
    (binary), the probability of the true class (of each label's true state) against the
    jittered class (label)."""
    y_true, jitter = np.asarray(y_true, np.float64), np.asarray(jitter, np.float64)
    known = np.isfinite(y_true).reshape(-1)
    if task == "regression":
        points = np.stack([y_true.reshape(-1), np.asarray(data["y_pred"], np.float64).reshape(-1)], 1)
    elif task == "binary":
        points = np.stack([np.asarray(data["prob_pos"], np.float64), y_true + jitter], 1)
    elif task == "multilabel":
        columns = np.arange(y_true.shape[1]) + jitter[:, None]
        points = np.stack([columns.reshape(-1), np.asarray(data["prob_true"], np.float64).reshape(-1)], 1)
    else:
        points = np.stack([y_true + jitter, np.asarray(data["prob_true"], np.float64)], 1)
    return points[known]


def scatter_colours(task: str, y_true: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """``(points, 3)`` RGB in [0, 1], in ``scatter_points``'s order: each class's (label's,
    output's) colour in ``palette`` (the probe's static ``palette``, else the default one); a
    label's absent samples in its colour paled halfway to white; a regression with one output
    in green, unless its palette says otherwise."""
    y_true = np.asarray(y_true)
    known = np.isfinite(y_true).reshape(-1)
    if task == "regression":
        if y_true.ndim == 1 and palette is None:
            return np.tile(REGRESSION_GREEN, (len(y_true), 1))[known]
        colours = _palette(palette, 1 if y_true.ndim == 1 else y_true.shape[1])
        return np.tile(colours, (len(y_true), 1))[known]
    if task == "multilabel":
        colours = np.broadcast_to(_palette(palette, y_true.shape[1]), (*y_true.shape, 3))
        absent = (y_true == 0)[..., None]
        return np.where(absent, 0.5 + 0.5 * colours, colours).reshape(-1, 3)[known]
    classes = 2 if task == "binary" else int(y_true.max(initial=0)) + 1
    colours = _palette(palette, classes)
    return colours[y_true.astype(np.int64) % len(colours)]


def _palette(palette: np.ndarray | None, count: int) -> np.ndarray:
    """RGB in [0, 1] of ``count`` classes: the probe's palette, or the default one."""
    return (default_palette(count).numpy() if palette is None else np.asarray(palette)) / 255.0


def scatter_legend(
    task: str, config, limit: int = 12, palette: np.ndarray | None = None
) -> list[tuple[str, tuple]]:
    """The names and RGB colours a prediction panel's legend lists (none past ``limit``, and
    none for a regression with one output)."""
    count = int(config.get("num_classes") or 0) if task != "regression" else int(config.get("outputs", 1))
    if (task == "regression" and count == 1) or not 0 < count <= limit:
        return []
    word = {"regression": "output", "multilabel": "label"}.get(task, "class")
    palette = _palette(palette, count)
    return [(display_name(config, i, word), tuple(float(v) for v in c)) for i, c in enumerate(palette)]


def confusion_shares(counts) -> np.ndarray:
    """A confusion matrix's rows as shares of their true class (0 for a class with no sample):
    what its figure and its viewer panel shade each cell by."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def _confusion(labels: torch.Tensor, pred: torch.Tensor, classes: int) -> torch.Tensor:
    """Counts of (true class, predicted class): row i, column j is how many samples of class
    i were predicted as class j."""
    return torch.bincount(labels * classes + pred, minlength=classes * classes).reshape(classes, classes)
