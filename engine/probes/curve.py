"""CurveProbe: a 1-feature -> 1-target model drawn as a curve with a band of its per-point loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from probescope.history import MIN_POINTS, History, Series, envelope
from probescope.kernels import smooth_1d
from probescope.probes.base import Probe, ProbeContext, as_float_tensor, batched_forward, check_forward
from probescope.schedule import Schedule
from probescope.validation import at_least, positive_int

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": lambda pred, target: (pred - target) ** 2,
    "mae": lambda pred, target: (pred - target).abs(),
}


class CurveProbe(Probe):
    """The model's current curve over a fixed, sorted representative sample of (x, y).

    One input feature; or several, and then the curve follows a line through input space,
    ``origin + t * direction``: through the data's mean along its first principal direction
    (``line="pca"``, the default) or through two given samples (``line=(a, b)``, from ``a``
    at 0 to ``b`` at ``|b - a|``). Each sample is drawn at its position ``t`` along the line
    (its projection onto it) against its target, the curve is the model on the line at those
    positions, and the band the loss of the samples around each position on their own inputs:
    where along its main direction the model errs.

    For a model with several outputs, ``output=j`` draws output ``j`` against target ``j``
    (``y`` then holds either that target or one column per output); one probe per output
    draws them all.

    Each frame holds the curve ``y_pred``, the per-point ``loss`` (smoothed by a moving
    average of odd width ``loss_smoothing``, as ``numpy.convolve(mode='same')`` does), the
    band ``y_pred ± loss`` (or ``± sqrt(loss)`` with ``band="rms"``, in y's units for MSE), the
    mean loss over the sample, and two series: that mean loss at every frame so far and the
    loss of every training batch so far, each cut to at most ``max_points`` of its points
    that keep its shape (see ``probescope.history.envelope``).
    """

    kind = "curve"
    default_schedule = Schedule.every(5)

    def __init__(
        self,
        x,
        y,
        *,
        loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "mse",
        loss_smoothing: int = 1,
        smoothing_kind: str = "box",
        band: str = "loss",
        graph_sparsity: int = 1,
        scatter_sparsity: int = 1,
        output: int | None = None,
        line: str | tuple | None = None,
        batch_size: int = 65536,
        max_points: int = 10_000,
        name: str | None = None,
        schedule: Schedule | None = None,
    ):
        super().__init__(name=name, schedule=schedule)
        owner = f"CurveProbe {self.name!r}"
        self.max_points = at_least(f"{owner}: max_points", max_points, MIN_POINTS)
        xt = as_float_tensor("x", x, ndim=(1, 2), owner=owner).reshape(len(x), -1)
        yt = as_float_tensor("y", y, ndim=(1, 2), owner=owner).reshape(len(y), -1)
        if line is not None and xt.shape[1] == 1:
            raise ValueError(f"{owner}: line is for inputs of several features; x has one")
        if output is not None and (isinstance(output, bool) or not isinstance(output, int) or output < 0):
            raise ValueError(f"{owner}: output must be the index of one model output, got {output!r}")
        if yt.shape[1] != 1:
            if output is None:
                raise ValueError(
                    f"{owner}: y has {yt.shape[1]} targets; choose one with output=j "
                    "(one CurveProbe per output draws them all)"
                )
            if output >= yt.shape[1]:
                raise ValueError(f"{owner}: output {output} is not a column of y ({yt.shape[1]} targets)")
        if xt.shape[0] != yt.shape[0]:
            raise ValueError(f"{owner}: x has {xt.shape[0]} points but y has {yt.shape[0]}")
        if isinstance(loss, str) and loss not in LOSSES:
            raise ValueError(f"{owner}: loss must be one of {tuple(LOSSES)} or a callable, got {loss!r}")
        if not callable(loss) and not isinstance(loss, str):
            raise TypeError(f"{owner}: loss must be a name or a callable, got {type(loss).__name__}")
        if (
            isinstance(loss_smoothing, bool)
            or not isinstance(loss_smoothing, int)
            or loss_smoothing < 1
            or loss_smoothing % 2 == 0
        ):
            raise ValueError(
                f"{owner}: loss_smoothing must be a positive odd integer (a centred "
                f"moving average), got {loss_smoothing!r}"
            )
        if band not in ("loss", "rms"):
            raise ValueError(f"{owner}: band must be 'loss' or 'rms', got {band!r}")
        if smoothing_kind not in ("box", "gaussian"):
            raise ValueError(f"{owner}: smoothing_kind must be 'box' or 'gaussian', got {smoothing_kind!r}")
        positive_int(f"{owner}: graph_sparsity", graph_sparsity)
        positive_int(f"{owner}: scatter_sparsity", scatter_sparsity)
        positive_int(f"{owner}: batch_size", batch_size)
        self.output, self.targets = output, yt.shape[1]
        self.origin, self.direction = _line(owner, xt, line)
        self.line = None if xt.shape[1] == 1 else ("pca" if line is None else line)
        position = (xt - self.origin) @ self.direction  # t of every sample: x itself for one feature
        order = torch.argsort(position, stable=True)
        self.x_all, self.y_all = position[order], yt[order, 0 if self.targets == 1 else output]
        self.x_eval = self.x_all[::graph_sparsity].contiguous()
        self.y_eval = self.y_all[::graph_sparsity].contiguous()
        # The model's inputs: the evaluated samples (their loss), and the line at their positions
        # (the curve); for one feature the two are the same points.
        self.inputs = xt[order][::graph_sparsity].contiguous()
        on_line = self.origin + self.x_eval[:, None] * self.direction
        self._forward_inputs = self.inputs if self.line is None else torch.cat([on_line, self.inputs])
        if self.x_eval.shape[0] < loss_smoothing:
            raise ValueError(
                f"{owner}: loss_smoothing {loss_smoothing} is wider than the "
                f"{self.x_eval.shape[0]} evaluated points"
            )
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
        self.loss_smoothing, self.smoothing_kind, self.band = loss_smoothing, smoothing_kind, band
        self.graph_sparsity, self.scatter_sparsity, self.batch_size = (
            graph_sparsity,
            scatter_sparsity,
            batch_size,
        )
        self._total_steps: list[int] = []
        self._total_loss: list[float] = []

    def warm_up(self, model: nn.Module) -> None:
        self._forward(model)

    def _forward(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen output on the line (the curve) and at the evaluated samples (their loss)."""
        out = batched_forward(model, self._forward_inputs, self.batch_size, self.graphs)[:, self.output or 0]
        n = len(self.inputs)
        return (out, out) if self.line is None else (out[:n], out[n:])

    def attach(self, model: nn.Module) -> None:
        owner = f"CurveProbe {self.name!r}"
        out = check_forward(owner, model, self.inputs[:2])
        width = out.reshape(2, -1).shape[1]
        if self.output is None and width != 1:
            raise ValueError(
                f"{owner}: the model returns {width} outputs per sample (shape {tuple(out.shape)} for a "
                "batch of 2); choose the one to draw with output=j"
            )
        if self.output is not None and self.output >= width:
            raise ValueError(f"{owner}: output {self.output} is not one of the model's {width} outputs")
        if self.targets != 1 and self.targets != width:
            raise ValueError(f"{owner}: y has {self.targets} targets but the model returns {width} outputs")
        # Compile the smoothing kernel now, before training, not in the first probe frame.
        smooth_1d(torch.zeros(3), self.loss_smoothing, self.smoothing_kind)

    def per_point_loss(self, y_pred: torch.Tensor) -> torch.Tensor:
        """The loss of every evaluated point, before smoothing."""
        loss = self.loss_fn(y_pred, self.y_eval)
        if loss.shape != y_pred.shape:
            raise ValueError(
                f"CurveProbe {self.name!r}: the loss callable must return one value "
                f"per point (shape {tuple(y_pred.shape)}), got {tuple(loss.shape)}"
            )
        return loss

    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        y_pred, at_samples = self._forward(model)
        raw = self.per_point_loss(at_samples)
        smoothed = smooth_1d(raw, self.loss_smoothing, self.smoothing_kind)
        half_width = smoothed.clamp(min=0).sqrt() if self.band == "rms" else smoothed
        total = float(raw.mean())
        if not np.isfinite(total):
            self.warn_once("nonfinite", f"non-finite predictions or loss at step {context.step}")
        self._total_steps.append(context.step)
        self._total_loss.append(total)
        batch = context.history.get(History.BATCH_LOSS)
        empty = Series(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
        batch = envelope(batch if batch is not None else empty, self.max_points)
        totals = envelope(
            Series(
                np.asarray(self._total_steps, dtype=np.int64),
                np.zeros(len(self._total_steps), np.int64),
                np.asarray(self._total_loss, dtype=np.float64),
            ),
            self.max_points,
        )
        return {
            "y_pred": y_pred,
            "loss": smoothed,
            "band_lower": y_pred - half_width,
            "band_upper": y_pred + half_width,
            "total_loss": np.float64(total),
            "total_loss_steps": totals.steps,
            "total_loss_series": totals.values,
            "batch_loss_steps": batch.steps,
            "batch_loss_series": batch.values,
        }

    def resume(self, frame) -> None:
        self._total_steps = frame.data["total_loss_steps"].tolist()
        self._total_loss = frame.data["total_loss_series"].tolist()

    def static(self) -> dict[str, np.ndarray]:
        arrays = {
            "x": self.x_eval.numpy(),
            "y": self.y_eval.numpy(),
            "scatter_x": self.x_all[:: self.scatter_sparsity].numpy(),
            "scatter_y": self.y_all[:: self.scatter_sparsity].numpy(),
        }
        if self.line is not None:
            arrays.update(origin=self.origin.numpy(), direction=self.direction.numpy())
        return arrays

    def config(self) -> dict[str, Any]:
        return {
            "loss": self.loss_name,
            "loss_smoothing": self.loss_smoothing,
            "smoothing_kind": self.smoothing_kind,
            "band": self.band,
            "graph_sparsity": self.graph_sparsity,
            "scatter_sparsity": self.scatter_sparsity,
            "output": self.output,
            "points": int(self.x_eval.shape[0]),
            "input_dim": int(self.origin.shape[0]),
            "line": "samples" if isinstance(self.line, tuple) else self.line,
        }


def x_label(config: dict[str, Any]) -> str:
    """What a curve's x axis is: the input, or the position along the line through the inputs."""
    return "t (along the line)" if config.get("input_dim", 1) > 1 else "x"


def _line(owner: str, x: torch.Tensor, line) -> tuple[torch.Tensor, torch.Tensor]:
    """Origin and unit direction of the line a curve of ``x`` (N, d) follows: x itself for one
    feature; the data's mean and first principal direction; or two samples."""
    d = x.shape[1]
    if d == 1:
        return torch.zeros(1), torch.ones(1)
    if line is None or isinstance(line, str):
        if line not in (None, "pca"):
            raise ValueError(f"{owner}: line must be None, 'pca' or two samples, got {line!r}")
        mean = x.mean(dim=0)
        _, s, vh = torch.linalg.svd((x - mean).double(), full_matrices=False)
        if x.shape[0] < 2 or s[0] <= 0:
            raise ValueError(f"{owner}: the data spans no direction; no PCA line (pass line=(a, b))")
        direction = vh[0]
        direction = direction * torch.sign(direction[direction.abs().argmax()])  # (its sign: fixed)
        return mean, direction.float()
    try:
        a, b = (as_float_tensor("line point", p, ndim=(1,), owner=owner) for p in line)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: line must be two samples of width {d}: {err}") from None
    if a.shape[0] != d or b.shape[0] != d:
        raise ValueError(f"{owner}: line samples have width {a.shape[0]} and {b.shape[0]}, x has {d}")
    span = (b - a).double()
    if span.norm() == 0:
        raise ValueError(f"{owner}: the line's two samples coincide")
    return a, (span / span.norm()).float()
