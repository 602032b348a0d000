"""Static figures (matplotlib) for every probe kind: one frame, or small multiples over training.

Each probe kind has a panel that builds its artists once and updates them in place per
frame; the exporters reuse the same panels to render animation frames. No pyplot: figures
are plain ``Figure`` objects on an Agg canvas, so nothing depends on a display.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from probescope.kernels import default_palette
from probescope.probes.base import display_name
from probescope.probes.curve import x_label
from probescope.probes.grid import line_segments, point_colours, ramp_ends
from probescope.probes.histogram import Distributions, distributions_rgba
from probescope.probes.loss import first_nonfinite, frame_series
from probescope.probes.neurons import GAP
from probescope.probes.prediction import confusion_shares, scatter_colours, scatter_legend, scatter_points
from probescope.probes.views import (
    Numbers,
    frame_layout,
    histogram,
    is_own_kind,
    mosaic_columns,
    picture_axes,
    picture_caption,
    picture_rgba,
    scalars_caption,
)
from probescope.run import ProbeRecord

FIGURE_SIZE = (768, 512)  # a frame's figure, in pixels
TILE_SIZE = (150, 90)  # the least room a HistogramProbe's tile takes in a picture, name and range
MAX_SIDE = 4096

BAND_COLOUR = "steelblue"


def fixed_limits(values, pad: float = 0.08) -> tuple[float, float]:
    """Axis limits around the finite ``values`` with ``pad`` of their span on each side."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo or 1.0
    return lo - pad * span, hi + pad * span


class GridPanel:
    """The probability map as an image, with the training points on top."""

    def __init__(self, ax: Axes, record: ProbeRecord, compact: bool = False):
        static, config = record.static, record.config
        u0, u1, v0, v1 = config["domain"]
        w, h = config["resolution"]
        self.image = ax.imshow(
            np.zeros((h, w, 4), np.uint8),
            extent=(u0, u1, v0, v1),
            origin="upper",
            interpolation="nearest",
            aspect="auto",
        )
        palette = static["palette"] if len(static["palette"]) else default_palette(2).numpy()
        if "points_uv" in static:
            uv = static["points_uv"]
            colours = point_colours(config, static)
            colours = colours / 255.0 if colours is not None else "white"
            ax.scatter(
                uv[:, 0],
                uv[:, 1],
                c=colours,
                s=4 if compact else 9,
                edgecolors="black",
                linewidths=0.25 if compact else 0.4,
                zorder=3,
            )
        ax.set_xlim(u0, u1)
        ax.set_ylim(v0, v1)
        plane = config.get("input_dim", 2) > 2
        if compact:
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.set_xlabel("u (plane axis 1)" if plane else "x₁")
            ax.set_ylabel("v (plane axis 2)" if plane else "x₂")
            ends = ramp_ends(config)
            if ends is not None:
                ax.set_title(f"{ends[0]}: blue {ends[1]}, white {ends[2]}, red {ends[3]}", fontsize=9)
            elif len(palette) <= 12:
                handles = [
                    Patch(color=c / 255.0, label=display_name(config, i)) for i, c in enumerate(palette)
                ]
                ax.legend(
                    handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False
                )

        self.ax, self.domain, self.hyperplanes = ax, config["domain"], None

    def update(self, data: dict[str, np.ndarray]) -> None:
        self.image.set_data(data["rgba"])
        if "hyperplanes" in data:  # each first-layer unit's zero line
            ends = line_segments(np.asarray(data["hyperplanes"]), self.domain)
            ends = ends[np.isfinite(ends).all(axis=(1, 2))]
            if self.hyperplanes is None:
                self.hyperplanes = LineCollection(ends, colors="0.15", linewidths=0.8, alpha=0.55, zorder=2)
                self.ax.add_collection(self.hyperplanes)
            else:
                self.hyperplanes.set_segments(ends)


class CurvePanel:
    """Data scatter, the model's curve and the per-point loss band."""

    def __init__(self, ax: Axes, record: ProbeRecord, compact: bool = False):
        static = record.static
        self.ax, self.x = ax, static["x"]
        ax.scatter(
            static["scatter_x"],
            static["scatter_y"],
            s=3 if compact else 5,
            color="0.55",
            alpha=0.45,
            linewidths=0,
            zorder=1,
        )
        (self.line,) = ax.plot(
            self.x, np.zeros_like(self.x), color=BAND_COLOUR, lw=1.5 if compact else 2.5, zorder=5
        )
        self.band = None
        ax.set_xlim(*fixed_limits(static["scatter_x"], 0.02))
        ax.set_ylim(*fixed_limits(static["scatter_y"], 0.15))
        if compact:
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.set_xlabel(x_label(record.config))
            ax.set_ylabel("y")

    def update(self, data: dict[str, np.ndarray]) -> None:
        self.line.set_ydata(data["y_pred"])
        if self.band is not None:
            self.band.remove()
        self.band = self.ax.fill_between(
            self.x,
            data["band_lower"],
            data["band_upper"],
            color=BAND_COLOUR,
            alpha=0.25,
            linewidth=0,
            zorder=4,
        )


class SeriesPanel:
    """Line charts of named series ``series/<name>/steps|values``, updated in place."""

    def __init__(self, ax: Axes, title: str | None = None, log_y: bool = True):
        self.ax, self.log_y = ax, log_y
        self.lines: dict[str, Any] = {}
        if title:
            ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")

    def set_series(self, name: str, steps: np.ndarray, values: np.ndarray, **style) -> None:
        line = self.lines.get(name)
        if line is None:
            (line,) = self.ax.plot([], [], label=name, **style)
            self.lines[name] = line
        line.set_data(steps, values)

    def rescale(self) -> None:
        values = [np.asarray(line.get_ydata(), float) for line in self.lines.values()]
        values = np.concatenate(values) if values else np.zeros(0)
        positive = values[np.isfinite(values) & (values > 0)]
        if self.log_y and positive.size and positive.size == values[np.isfinite(values)].size:
            self.ax.set_yscale("log")
        self.ax.relim()
        self.ax.autoscale_view()


def mark_divergence(
    ax: Axes, series: dict[str, tuple[np.ndarray, np.ndarray]], line=None, since: float | None = None
):
    """A red dotted line at the first NaN or infinity of ``series`` (where the run diverged),
    labelled with it, unless it comes before step ``since``: ``line`` (the one of an earlier
    frame) moved there or hidden, or a new one when there is something to mark. Returns it."""
    diverged = first_nonfinite(series)
    if diverged is None or (since is not None and diverged[1] < since):
        if line is not None:
            line.set_visible(False)
        return line
    name, step, value = diverged
    if line is None:
        line = ax.axvline(step, color="tab:red", ls=":", lw=1.2)
    line.set_xdata([step, step])
    line.set_label(f"{name} {value} at step {step}")
    line.set_visible(True)
    return line


class LossPanel:
    """Train loss per step and per epoch, valid loss, and metrics on a second axis."""

    STYLES: ClassVar[dict[str, dict]] = {
        "train_loss": {"color": "0.6", "lw": 0.8},
        "train_loss_epoch": {"color": "tab:blue", "lw": 2, "marker": "o", "ms": 3},
        "valid_loss": {"color": "tab:orange", "lw": 2, "marker": "s", "ms": 3},
    }
    METRIC_COLOURS: ClassVar[tuple[str, ...]] = (
        "tab:green",
        "tab:purple",
        "tab:red",
        "tab:brown",
        "tab:pink",
        "tab:olive",
    )

    def __init__(
        self, ax: Axes, record: ProbeRecord | None = None, compact: bool = False, log_y: bool = True
    ):
        self.losses = SeriesPanel(ax, None if compact else "loss", log_y)
        self.metrics_ax = ax.twinx()
        self.metrics = SeriesPanel(self.metrics_ax, None, log_y=False)
        self.metrics_ax.set_xlabel("")
        if not compact:
            ax.set_ylabel("loss")
            self.metrics_ax.set_ylabel("metrics (dashed)")
        self.compact = compact
        self._diverged = None  # the line at the step where a series turned NaN or infinite

    def _metric_colour(self, name: str) -> str:
        known = {**self.metrics.lines, **self.losses.lines}
        if name in known:
            return known[name].get_color()
        return self.METRIC_COLOURS[len(known) % len(self.METRIC_COLOURS)]

    def update(self, data: dict[str, np.ndarray]) -> None:
        series = frame_series(data)
        for name, (steps, values) in series.items():
            target = self.losses if "loss" in name else self.metrics
            style = self.STYLES.get(name) or {"lw": 1.5, "ls": "--", "color": self._metric_colour(name)}
            target.set_series(name, steps, values, **style)
        self.losses.rescale()
        self.metrics.rescale()
        self._diverged = mark_divergence(self.losses.ax, series, self._diverged)
        if not self.compact and series:
            handles = list(self.losses.lines.values()) + list(self.metrics.lines.values())
            if self._diverged is not None and self._diverged.get_visible():
                handles.append(self._diverged)
            self.losses.ax.legend(
                handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="upper right"
            )


class PredictionPanel:
    """Predictions on the fixed batch: jittered probability of the true class (of each label's
    true state), or y_hat vs y."""

    def __init__(self, ax: Axes, record: ProbeRecord, compact: bool = False):
        static, config = record.static, record.config
        self.ax, self.task = ax, config["task"]
        self.y, self.jitter = static["y_true"], static["jitter"]
        colours = scatter_colours(self.task, self.y, static.get("palette"))
        size = 4 if compact else 10
        self.points = ax.scatter(*np.zeros((2, len(colours))), s=size, c=colours, alpha=0.5, linewidths=0)
        self.means = []
        if self.task == "regression":
            lo, hi = fixed_limits(self.y)
            ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            labels = ("y (true)", "ŷ (predicted)")
        elif self.task == "binary":
            ax.axvline(config["threshold"], color="0.3", lw=1, ls="--")
            ax.set_xlim(-0.02, 1.02)
            ax.set_yticks([0, 1], [display_name(config, 0), display_name(config, 1)])
            labels = (f"predicted P({display_name(config, 1)})", None)
        else:
            classes = config["num_classes"]
            self.means = [
                ax.plot([c - 0.4, c + 0.4], [np.nan, np.nan], color="black", lw=2)[0] for c in range(classes)
            ]
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlim(-0.6, classes - 0.4)
            names = [display_name({} if compact else config, k, None) for k in range(classes)]
            ax.set_xticks(range(classes), names, rotation=_tick_rotation(names))  # (small: indices)
            labels = (
                ("label (pale: samples without it)", "predicted P(true state)")
                if self.task == "multilabel"
                else ("true class", "predicted P(true class)")
            )
        if not compact:
            ax.set_xlabel(labels[0])
            if labels[1]:
                ax.set_ylabel(labels[1])
            if self.task in ("regression", "multilabel"):  # (the classes are the x ticks)
                entries = scatter_legend(self.task, config, palette=static.get("palette"))
                if entries:
                    handles = [Patch(color=colour, label=name) for name, colour in entries]
                    ax.legend(handles=handles, fontsize=7, loc="best")
        self.ax, self.compact = ax, compact

    def update(self, data: dict[str, np.ndarray]) -> None:
        self.points.set_offsets(scatter_points(self.task, self.y, self.jitter, data))
        for line, mean in zip(self.means, data.get("class_mean", ()), strict=False):
            line.set_ydata([mean, mean])
        if self.task == "regression":
            label = f"MSE {float(data['mse']):.4g}   R² {float(data['r2']):.3f}"
        elif self.task == "binary":
            label = (
                f"accuracy {float(data['accuracy']):.3f}   sensitivity {float(data['sensitivity']):.3f}"
                f"   specificity {float(data['specificity']):.3f}"
            )
        elif self.task == "multilabel":
            label = (
                f"accuracy {float(data['accuracy']):.3f}   exact match {float(data['exact_match']):.3f}"
                f"   F1 {float(data['f1']):.3f}"
            )
        else:
            label = f"accuracy {float(data['accuracy']):.3f}"
        if not self.compact:
            self.ax.set_title(label, fontsize=9)


class NeuronsPanel:
    """Each unit's map over the grid (NeuronProbe's mosaic), with the units' indices."""

    def __init__(self, ax: Axes, record: ProbeRecord, compact: bool = False):
        config = record.config
        size, gap, columns = config["resolution"], config["gap"], config["columns"]
        height = config["rows"] * (size + gap) - gap
        width = columns * (size + gap) - gap
        self.image = ax.imshow(np.zeros((height, width, 4), np.uint8), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        self.ax, self.compact, self.layer = ax, compact, config["layer"]
        if not compact:
            for i, unit in enumerate(record.static["units"]):
                r, c = divmod(i, columns)
                ax.text(c * (size + gap) + 1, r * (size + gap) + 1, str(unit), fontsize=6, va="top",
                        color="0.25")  # fmt: skip

    def update(self, data: dict[str, np.ndarray]) -> None:
        self.image.set_data(data["rgba"])
        if not self.compact:
            self.ax.set_xlabel(
                f"units of {self.layer!r}: blue negative, white 0, red positive (±{float(data['scale']):.3g})"
            )


class HistogramsPanel:
    """Each tensor's distribution over the frames drawn so far (HistogramProbe), one tile per
    tensor named by it; its last frame is the whole run's picture."""

    accumulates = True
    over_training = True  # the last frame draws every frame before it: no small multiples

    def __init__(self, ax: Axes, record: ProbeRecord, compact: bool = False):
        self.ax, self.compact = ax, compact
        self.names = [str(n) for n in record.static.get("names", ())]
        self.history = Distributions()
        self.image = None

    def update(self, data: dict[str, np.ndarray], step: float | None = None) -> None:
        self.history.add(len(self.history) if step is None else step, data)
        picture = self.history.picture()
        rgba = distributions_rgba(picture)
        ax = self.ax
        if self.image is None:
            self.image = ax.imshow(rgba, interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            self.image.set_data(rgba)
            self.image.set_extent((-0.5, rgba.shape[1] - 0.5, rgba.shape[0] - 0.5, -0.5))
        for text in list(ax.texts):
            text.remove()
        if self.compact:
            return
        tensors, rows, width = picture.cells.shape
        columns = mosaic_columns(tensors)
        for i, name in enumerate(self.names):
            r, c = divmod(i, columns)
            lo, hi = picture.spans[i]
            span = "" if np.isnan(lo) else f"\n{lo:.3g} to {hi:.3g}"
            ax.text(c * (width + GAP) + 0.5, r * (rows + GAP) + 0.5, name + span, fontsize=6, va="top",
                    color="0.15")  # fmt: skip
        ax.set_xlabel(
            f"{len(picture.steps)} frames, steps {picture.steps[0]:.0f} to {picture.steps[-1]:.0f}, left to "
            "right; values bottom to top; white none, red most, magenta not finite",
            fontsize=8,
        )


class FramePanel:
    """A probe of the user's own kind, drawn from what its frames hold (probescope.probes.views):
    one entry as a picture (an image, a heat map, a mosaic of maps, a histogram or a line), its
    numbers in the title; frames of numbers alone as series over the frames drawn so far (so
    an animation grows them). Redrawn from scratch each frame: what a frame holds may change."""

    accumulates = True

    def __init__(self, ax: Axes, record: ProbeRecord, compact: bool = False):
        self.ax, self.compact = ax, compact
        self.views = dict(record.config.get("views") or {})
        self.numbers = Numbers()

    def update(self, data: dict[str, np.ndarray], step: float | None = None) -> None:
        layout = frame_layout(data, self.views)
        if step is not None:
            self.numbers.add(step, layout.scalars)
        ax = self.ax
        ax.clear()
        caption = ""
        if layout.picture is not None:
            key, view = layout.picture
            value = np.asarray(data[key])
            extra = None
            if view in ("image", "heatmap", "maps"):
                rgba, extra = picture_rgba(key, view, value, self.views)
                ax.imshow(rgba, interpolation="nearest", aspect="auto" if view == "heatmap" else "equal")
            elif view == "histogram":
                counts, edges, extra = histogram(value)
                ax.stairs(counts, edges, fill=True, color="tab:purple", alpha=0.8)
            else:
                ax.plot(np.arange(len(value)), value, color="tab:purple", lw=1.5)
            x, y = picture_axes(key, view)
            caption = picture_caption(key, view, value, extra)
        else:
            for key, steps, values in self.numbers.series():
                ax.plot(steps, values, lw=1.5, label=key)
            if self.numbers.names():
                ax.legend(fontsize=7)
            x, y = "step", "value"
        numbers = scalars_caption(layout.scalars)
        caption = "  ·  ".join(c for c in (caption, numbers) if c)
        if self.compact:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=6)
        else:
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            ax.set_title(caption, fontsize=9)


PANELS = {
    "grid": GridPanel,
    "curve": CurvePanel,
    "prediction": PredictionPanel,
    "loss": LossPanel,
    "neurons": NeuronsPanel,
    "histograms": HistogramsPanel,
}


def figure_panel(kind: str):
    """The figure panel of a probe kind: a built-in kind's own (None for the kinds drawn over
    training as a whole: statistics, checkpoints), any other kind's a FramePanel."""
    return PANELS.get(kind) or (FramePanel if is_own_kind(kind) else None)


class FrameRenderer:
    """Renders frames of one probe to RGB images, reusing one figure and its artists."""

    def __init__(self, record: ProbeRecord, *, size: tuple[int, int] = FIGURE_SIZE, dpi: int = 100):
        panel = figure_panel(record.kind)
        if panel is None:
            raise ValueError(f"no figure for probe kind {record.kind!r}")
        self.record = record
        self.figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.figure)
        self.side: list[SeriesPanel] = []
        if record.kind == "curve":
            spec = self.figure.add_gridspec(2, 3)
            self.panel = CurvePanel(self.figure.add_subplot(spec[:, :2]), record)
            self.side = [
                SeriesPanel(self.figure.add_subplot(spec[0, 2]), "loss over the sample"),
                SeriesPanel(self.figure.add_subplot(spec[1, 2]), "batch loss"),
            ]
        else:
            self.panel = panel(self.figure.add_subplot(1, 1, 1), record)
        self.title = self.figure.suptitle("", fontsize=11)
        self.figure.set_layout_engine("tight" if record.kind != "grid" else "constrained")
        # A map's axes never change, so the layout of its first picture holds for every frame:
        # working it out again (text extents of every tick and legend entry) was a third of a
        # frame's time. Panels whose axes rescale keep laying out each frame.
        self._freeze_layout = record.kind == "grid"

    def draw(self, data: dict[str, np.ndarray], step: float, epoch: float) -> None:
        """Update every artist to ``data`` and caption the figure with step and epoch."""
        if getattr(self.panel, "accumulates", False):
            self.panel.update(data, step)
        else:
            self.panel.update(data)
        if self.side:
            self.side[0].set_series(
                "sample", data["total_loss_steps"], data["total_loss_series"], color=BAND_COLOUR, lw=1.5
            )
            self.side[1].set_series(
                "batch", data["batch_loss_steps"], data["batch_loss_series"], color="0.5", lw=0.8
            )
            for panel in self.side:
                panel.rescale()
        self.title.set_text(f"{self.record.name}  ·  step {round(step)}  ·  epoch {round(epoch)}")

    def image(self) -> np.ndarray:
        """The current figure as an (H, W, 3) uint8 array."""
        self.canvas.draw()
        if self._freeze_layout:
            self.figure.set_layout_engine("none")  # keeps the positions just worked out
            self._freeze_layout = False
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def picture_size(record: ProbeRecord) -> tuple[int, int]:
    """The size of a picture of one frame: ``FIGURE_SIZE``, larger for a HistogramProbe of
    more tensors than its tiles fit in with their names (at most ``MAX_SIDE`` a side)."""
    if record.kind != "histograms":
        return FIGURE_SIZE
    tensors = len(record.static.get("names", ()))
    columns = mosaic_columns(tensors)
    rows = -(-tensors // columns) if tensors else 0
    width = min(MAX_SIDE, max(FIGURE_SIZE[0], TILE_SIZE[0] * columns + 40))
    height = min(MAX_SIDE, max(FIGURE_SIZE[1], TILE_SIZE[1] * rows + 90))  # (title, caption)
    return width, height


def plot_frame(record: ProbeRecord, index: int = -1, **kwargs) -> Figure:
    """A figure of one recorded frame (default: the last; ``picture_size`` unless a ``size``
    is given); a panel that draws the frames so far (a probe of the user's own kind's numbers)
    is given every frame up to it."""
    kwargs.setdefault("size", picture_size(record))
    renderer = FrameRenderer(record, **kwargs)
    index = range(len(record))[index]
    first = 0 if getattr(renderer.panel, "accumulates", False) else index
    for i in range(first, index + 1):
        frame = record.frame(i)
        renderer.draw(frame.data, frame.step, frame.epoch)
    return renderer.figure


def small_multiples(record: ProbeRecord, count: int = 12, columns: int = 4, cell: float = 2.4) -> Figure:
    """A grid of ``count`` frames spread evenly over training, each captioned with its step."""
    total = len(record)
    if total == 0:
        raise ValueError(f"probe {record.name!r} has no frames yet")
    picks = sorted({round(i) for i in np.linspace(0, total - 1, min(count, total))})
    rows = -(-len(picks) // columns)
    cols = min(columns, len(picks))
    figure = Figure(figsize=(cell * cols, cell * rows + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for i, index in enumerate(picks):
        ax = figure.add_subplot(rows, cols, i + 1)
        frame = record.frame(index)
        figure_panel(record.kind)(ax, record, compact=True).update(frame.data)
        ax.set_title(f"step {frame.step} · epoch {frame.epoch}", fontsize=8)
    figure.suptitle(f"{record.name} across training", fontsize=10)
    return figure


def metrics_figure(record: ProbeRecord, *, final_losses: bool = True, perc: float = 0.5) -> Figure:
    """A LossProbe's last frame as tsai's ``plot_metrics``: the losses over training, the
    same over the last ``perc`` of it (``final_losses``, where the curves flatten and one
    scale hides their differences), and one panel per metric, its train and valid series
    together (``train_x`` and ``valid_x`` share the panel ``x``)."""
    if not 0 < perc <= 1:
        raise ValueError(f"perc must be in (0, 1], got {perc!r}")
    if not len(record):
        raise ValueError(f"probe {record.name!r} has no frames yet")
    series = frame_series(record.frame(-1).data)
    losses = {n: s for n, s in series.items() if "loss" in n}
    groups: dict[str, dict[str, tuple]] = {}
    for name, s in series.items():
        if name not in losses:
            groups.setdefault(name.removeprefix("train_").removeprefix("valid_"), {})[name] = s
    panels = [("losses", losses, None)]
    if final_losses and losses:
        last = max(float(np.max(steps)) for steps, _ in losses.values() if len(steps))
        first = min(float(np.min(steps)) for steps, _ in losses.values() if len(steps))
        panels.append(("final losses", losses, last - perc * (last - first)))
    panels += [(group, members, None) for group, members in sorted(groups.items())]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4 * columns, 3 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).reshape(-1)
    for ax, (title, members, start) in zip(axes, panels, strict=False):
        for name, (steps, values) in sorted(members.items()):
            steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
            if start is not None:
                keep = steps >= start
                steps, values = steps[keep], values[keep]
            style = LossPanel.STYLES.get(name, {"lw": 1.5, "marker": "o", "ms": 3})
            ax.plot(steps, values, label=name, **style)
        mark_divergence(ax, members, since=start)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(color="gainsboro", lw=0.5)
        if members:
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    figure.suptitle(f"{record.name}: losses and metrics")
    return figure


def confusion_figure(record: ProbeRecord, frame: int = -1) -> Figure:
    """A classification PredictionProbe's confusion matrix at one frame (default the last):
    rows the true class, columns the predicted one, each cell shaded by its share of its row
    (the class's recall on the diagonal) and, up to 20 classes, labelled with its count."""
    if not len(record):
        raise ValueError(f"probe {record.name!r} has no frames yet")
    shown = record.frame(frame)
    if "confusion" not in shown.data:
        raise ValueError(f"probe {record.name!r} ({record.kind}) has no confusion matrix in its frames")
    counts = np.asarray(shown.data["confusion"], np.int64)
    classes = len(counts)
    shares = confusion_shares(counts)
    side = min(3.2 + 0.45 * classes, 12.0)
    figure = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=ax, label="share of the true class's samples", shrink=0.8)
    if classes <= 20:
        for (r, c), n in np.ndenumerate(counts):
            colour = "white" if shares[r, c] > 0.6 else "black"
            ax.text(c, r, str(n), ha="center", va="center", fontsize=8, color=colour)
    ticks = list(range(classes) if classes <= 30 else range(0, classes, -(-classes // 15)))
    names = [display_name(record.config, k, None) for k in ticks]
    ax.set_xticks(ticks, names, rotation=_tick_rotation(names))
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    right = int(np.trace(counts))
    ax.set_title(
        f"{record.name} · step {shown.step} · {right} of {int(counts.sum())} right "
        f"(accuracy {float(shown.data['accuracy']):.3f})",
        fontsize=10,
    )
    return figure


def _tick_rotation(names: list[str]) -> float:
    """Tick labels of several characters side by side slant so that they do not run together."""
    return 30.0 if max((len(n) for n in names), default=0) > 3 else 0.0


def spread(items: list[str], n: int) -> list[str]:
    """``n`` of ``items`` spaced evenly from the first to the last (all of them if no more)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in dict.fromkeys(np.linspace(0, len(items) - 1, n).round().astype(int))]


def stats_figure(record: ProbeRecord, lines: int = 6) -> Figure:
    """A StatsProbe over training: norms (L2 and spectral, of weights, gradients and outputs
    as the probe measured them; log scale) above, its loss
    and metric columns below, the background coloured by latent state when the probe
    decoded one (``StatsProbe(states=...)``)."""
    table = record.table()
    if not len(table):
        raise ValueError(f"probe {record.name!r} has no frames yet")
    steps = table["step"].to_numpy(np.float64)
    norms = spread([c for c in table.columns if c.endswith("/l2") or c.endswith("/spectral")], lines)
    losses = [c for c in table.columns if c.startswith("loss/")][:lines]
    figure = Figure(figsize=(9, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for ax, columns, log in ((top, norms, True), (bottom, losses, False)):
        for column in columns:
            ax.plot(steps, table[column].to_numpy(np.float64), lw=1.5, label=column)
        if log and columns:
            ax.set_yscale("log")
        if columns:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        if "state" in table.columns:
            from probescope.analysis.report import segments, state_colour

            states = table["state"].to_numpy()
            known = ~np.isnan(states.astype(np.float64))
            for start, end, state in segments(states[known].astype(np.int64), steps[known]):
                ax.axvspan(start, end, color=state_colour(state), alpha=0.15, lw=0)
    top.set_ylabel("norms" if any(not c.startswith("weight/") for c in norms) else "weight norms")
    bottom.set_ylabel("losses and metrics")
    bottom.set_xlabel("step")
    figure.suptitle(
        f"{record.name} over training" + ("  ·  latent states shaded" if "state" in table.columns else "")
    )
    return figure
