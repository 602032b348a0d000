"""PredictionProbe: the model's predictions on a fixed held-out batch, frame after frame."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from probescope.kernels.mlp import final_output_kind
from probescope.probes.base import (
    Probe,
    ProbeContext,
    as_input_tensor,
    batched_forward,
    check_forward,
    outputs_to_probs,
)
from probescope.schedule import Schedule

TASKS = ("auto", "classification", "binary", "regression")


class PredictionProbe(Probe):
    """Prediction dynamics on a fixed batch (after tsai's PredictionDynamics).

    - ``classification``: per sample, the predicted probability of its true class (drawn as
      a jittered scatter per true class), the predicted class, accuracy and per-class means;
    - ``binary``: the predicted probability of the positive class, accuracy, and the
      sensitivity and specificity at ``threshold``;
    - ``regression``: y_hat for every y, with MSE and R².

    ``task="auto"`` decides from the targets and the model's output width. ``show_perc``
    keeps a fixed random fraction of the batch.
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
        if yt.dim() > 1:
            yt = yt.reshape(yt.shape[0], -1)
            if yt.shape[1] != 1:
                raise ValueError(f"{owner}: y must hold one target per sample, got shape {tuple(yt.shape)}")
            yt = yt[:, 0]
        if yt.shape[0] != xt.shape[0]:
            raise ValueError(f"{owner}: x has {xt.shape[0]} samples but y has {yt.shape[0]}")
        if task not in TASKS:
            raise ValueError(f"{owner}: task must be one of {TASKS}, got {task!r}")
        if not 0.0 < show_perc <= 1.0:
            raise ValueError(f"{owner}: show_perc must be in (0, 1], got {show_perc!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"{owner}: threshold must be in (0, 1), got {threshold!r}")
        n_keep = max(1, round(show_perc * xt.shape[0]))
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(xt.shape[0], generator=generator)[:n_keep].sort().values
        self.x, self.y = xt[keep], yt[keep].double()
        self.jitter = (torch.rand(n_keep, generator=generator, dtype=torch.float64) - 0.5) * 2 * jitter
        self.task, self.requested_task = task, task
        self.show_perc, self.threshold, self.output = show_perc, threshold, output
        self.final = "logits"  # what the model's outputs are; read from it when attached
        self.batch_size = batch_size
        self.num_classes: int | None = None

    def warm_up(self, model: nn.Module) -> None:
        batched_forward(model, self.x, self.batch_size, self.graphs)

    def attach(self, model: nn.Module) -> None:
        self.final = final_output_kind(model)  # a Sigmoid / Softmax at the end: already probabilities
        owner = f"PredictionProbe {self.name!r}"
        out = check_forward(owner, model, self.x[:2])
        width = out.reshape(out.shape[0], -1).shape[1]
        integral = bool(torch.all(self.y == self.y.round()))
        task = self.requested_task
        if task == "auto":
            if not integral:
                task = "regression"
            elif width == 1:
                task = "binary" if set(self.y.unique().tolist()) <= {0.0, 1.0} else "regression"
            else:
                task = "binary" if width == 2 else "classification"
        if task in ("classification", "binary"):
            if not integral:
                raise ValueError(f"{owner}: task {task!r} needs integer class labels")
            self.num_classes = 2 if task == "binary" else width
            if self.y.min() < 0 or self.y.max() >= self.num_classes:
                raise ValueError(
                    f"{owner}: labels must lie in [0, {self.num_classes}), got "
                    f"[{int(self.y.min())}, {int(self.y.max())}]"
                )
        elif width != 1:
            raise ValueError(f"{owner}: regression needs one output per sample, the model gives {width}")
        self.task = task

    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        out = batched_forward(model, self.x, self.batch_size, self.graphs)
        if self.task == "regression":
            y_pred = out[:, 0].double()
            mse = float(((y_pred - self.y) ** 2).mean())
            var = float(((self.y - self.y.mean()) ** 2).mean())
            return {
                "y_pred": y_pred,
                "mse": np.float64(mse),
                "r2": np.float64(1.0 - mse / var if var > 0 else np.nan),
            }
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

    def static(self) -> dict[str, np.ndarray]:
        return {"y_true": self.y.numpy(), "jitter": self.jitter.numpy()}

    def config(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "num_classes": self.num_classes,
            "samples": int(self.x.shape[0]),
            "show_perc": self.show_perc,
            "threshold": self.threshold,
        }


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
