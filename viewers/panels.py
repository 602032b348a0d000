"""One vispy panel per probe kind: axes, caption, legend, and visuals updated in place.

A panel is built from a :class:`PanelSpec` (name, kind, config, static arrays: what a probe
or a recorded run says about itself) into a cell of a SceneCanvas grid, and ``update(data,
step, epoch)`` moves its visuals to one frame. Nothing is re-created per frame: the map's
texture, the lines' vertices and the markers' positions are updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from vispy import scene
from vispy.color import Color
from vispy.visuals.transforms import STTransform

from probescope.figures import fixed_limits, spread
from probescope.kernels import default_palette
from probescope.kernels.colormap import DIVERGING_ANCHORS
from probescope.probes.base import display_name
from probescope.probes.curve import x_label
from probescope.probes.grid import line_segments, point_colours, ramp_ends
from probescope.probes.histogram import Distributions, distributions_readout, distributions_rgba
from probescope.probes.loss import first_nonfinite, frame_series
from probescope.probes.prediction import confusion_shares, scatter_colours, scatter_legend, scatter_points
from probescope.probes.views import (
    Numbers,
    frame_layout,
    histogram,
    picture_axes,
    picture_caption,
    picture_readout,
    picture_rgba,
    scalars_caption,
    views_config,
)

BAND = (0.84, 0.15, 0.16)  # the curve and its loss band
GREY = (0.45, 0.45, 0.45, 1.0)
HYPERPLANE = (0.15, 0.15, 0.15, 0.55)  # a first-layer unit's zero line over a map
DIVERGED = (0.84, 0.15, 0.16, 1.0)  # the step where a series turned NaN or infinite
METRIC_COLOURS = ((0.17, 0.63, 0.17), (0.58, 0.40, 0.74), (0.84, 0.15, 0.16), (0.55, 0.34, 0.29))


@dataclass
class PanelSpec:
    """What a panel needs to know about its probe."""

    name: str
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    static: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of_probe(cls, probe) -> PanelSpec:
        return cls(probe.name, probe.kind, {**probe.config(), **views_config(probe)}, probe.static())

    @classmethod
    def of_record(cls, record) -> PanelSpec:
        return cls(record.name, record.kind, record.config, record.static)


def _rgba(colours: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    colours = np.asarray(colours, dtype=np.float32)
    if colours.max(initial=0) > 1.0:
        colours = colours / 255.0
    return np.concatenate([colours[:, :3], np.full((len(colours), 1), alpha, np.float32)], axis=1)


class LeftLabel(scene.Label):
    """A label whose text starts at its left edge (vispy's Label puts the text's anchor at its
    centre, so left-anchored text began halfway across and ran off the right edge)."""

    MARGIN = 4.0

    def __init__(self, text: str, **kwargs):
        super().__init__(text, anchor_x="left", **kwargs)

    def _set_pos(self):
        rect = self.rect
        self._text_visual.pos = (rect.left + self.MARGIN, rect.center[1])


class Legend:
    """Names in their colours, one row each, beside the top of a panel's view. Placed by hand
    from the view's rectangle: as labels in a column of the layout, the entries moved from one
    canvas to the next (the layout solver's choice among equally good solutions), so the same
    frame drew differently."""

    ROW = 23.0  # pixels per entry
    WIDTH = 90.0  # the column the layout keeps for it
    MARGIN = LeftLabel.MARGIN

    def __init__(self, grid, view, entries: list[tuple[str, tuple]], row: int, col: int):
        column = scene.Widget()  # holds the column's width in the layout; draws nothing
        column.width_min = column.width_max = self.WIDTH
        grid.add_widget(column, row=row, col=col)
        self.view = view
        # One visual for every entry (a draw call, not one per entry: each costs the drawing
        # thread GL calls, and GIL hand-offs beside a training thread).
        self.text = scene.visuals.Text(
            [text for text, _ in entries],
            color=np.array([c for _, c in entries], np.float32),
            font_size=7,
            anchor_x="left",
            anchor_y="center",
            parent=grid,
        )
        self.rows = len(entries)
        view.events.resize.connect(self.place)
        self.place()

    def place(self, event=None) -> None:
        left, top = self.view.pos[0] + self.view.size[0], self.view.pos[1]
        self.text.pos = [(left + self.MARGIN, top + (i + 0.5) * self.ROW) for i in range(self.rows)]

    def positions(self) -> np.ndarray:
        """Where each entry's text is anchored, (entries, 2) in the panel grid's pixels."""
        return np.asarray(self.text.pos)[:, :2]

    def set_entries(self, entries: list[tuple[str, tuple]]) -> None:
        """Other names and colours (a panel whose series appear as training goes on)."""
        self.text.text = [text for text, _ in entries]
        self.text.color = np.array([c for _, c in entries], np.float32)
        self.rows = len(entries)
        self.place()


class Panel:
    """Caption, a pan-and-zoom view with ticked axes, and an optional legend column."""

    x_label = "x"
    y_label = "y"
    accumulates = False  # draws the history of the frames it was given (replays feed it every one)

    def __init__(self, parent_grid, spec: PanelSpec, row: int, col: int, legend: list | None = None):
        self.spec = spec
        self.grid = parent_grid.add_grid(row=row, col=col, margin=4)
        self.caption = LeftLabel(spec.name, color="black", font_size=9)
        # Fixed sizes for everything but the view: with only maxima, the layout solver sized
        # them differently from one canvas to the next, and the same frame drew differently.
        self.caption.height_min = self.caption.height_max = 26
        self.grid.add_widget(self.caption, row=0, col=0, col_span=3 if legend else 2)
        self.y_axis = scene.AxisWidget(orientation="left", axis_label=self.y_label, axis_font_size=7,
                                       axis_label_margin=32, tick_label_margin=4, text_color="black",
                                       axis_color="black", tick_color="black")  # fmt: skip
        self.y_axis.width_min = self.y_axis.width_max = 58
        self.grid.add_widget(self.y_axis, row=1, col=0)
        self.x_axis = scene.AxisWidget(orientation="bottom", axis_label=self.x_label, axis_font_size=7,
                                       axis_label_margin=26, tick_label_margin=12, text_color="black",
                                       axis_color="black", tick_color="black")  # fmt: skip
        self.x_axis.height_min = self.x_axis.height_max = 40
        self.grid.add_widget(self.x_axis, row=2, col=1)
        self.view = self.grid.add_view(row=1, col=1, border_color=(0.5, 0.5, 0.5, 1.0), bgcolor="white")
        self.view.camera = scene.PanZoomCamera()
        self.x_axis.link_view(self.view)
        self.y_axis.link_view(self.view)
        self.legend = Legend(self.grid, self.view, legend, row=1, col=2) if legend else None
        self.step = self.epoch = None
        self.data: dict[str, np.ndarray] | None = None  # the frame on screen
        self.hover = ""  # what the pointer is over, in the caption
        self.hover_at: tuple[float, float] | None = None

    def set_range(self, x: tuple[float, float], y: tuple[float, float]) -> None:
        self.view.camera.set_range(x=x, y=y, z=(-1.0, 1.0), margin=0)

    def update(self, data: dict[str, np.ndarray], step: float, epoch: float) -> None:
        self.step, self.epoch = round(step), round(epoch)
        self.data = data
        self.draw(data)
        if self.hover:  # the pointer stays where it is: say what is under it now
            self.hover = self.readout(*self.hover_at) or ""
        self._set_caption()

    def _set_caption(self) -> None:
        base = f"{self.spec.name}  ·  step {self.step}  ·  epoch {self.epoch}"
        subtitle = self.subtitle(self.data) if self.data is not None else ""
        self.caption.text = base + subtitle + (f"  ·  {self.hover}" if self.hover else "")

    def subtitle(self, data: dict[str, np.ndarray]) -> str:
        return ""

    def point_under(self, canvas_pos) -> tuple[float, float] | None:
        """The data point under canvas pixel ``canvas_pos``, or None outside this panel's view."""
        mapped = self.view.scene.node_transform(self.view.canvas.scene).imap([*canvas_pos[:2], 0, 1])
        x, y = float(mapped[0] / mapped[3]), float(mapped[1] / mapped[3])
        rect = self.view.camera.rect
        inside = rect.left <= x <= rect.right and rect.bottom <= y <= rect.top
        return (x, y) if inside else None

    def point_at(self, canvas_pos) -> bool:
        """The pointer moved to ``canvas_pos``: show what is under it; True if the caption changed."""
        point = self.point_under(canvas_pos)
        hover = (self.readout(*point) or "") if point is not None and self.data is not None else ""
        self.hover_at = point
        if hover == self.hover:
            return False
        self.hover = hover
        if self.step is not None:
            self._set_caption()
        return True

    def readout(self, x: float, y: float) -> str | None:
        """The frame's values at data point (x, y), in words (None: nothing to say)."""
        return None

    def draw(self, data: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def data_to_canvas(self, x: float, y: float) -> tuple[float, float]:
        """Canvas pixel coordinates (x right, y down) of a data point of this panel."""
        mapped = self.view.scene.node_transform(self.view.canvas.scene).map([[x, y, 0, 1]])[0]
        return float(mapped[0] / mapped[3]), float(mapped[1] / mapped[3])


class MapPanel(Panel):
    """The probability map as an Image whose texture takes each frame's RGBA, points on top."""

    def __init__(self, parent_grid, spec: PanelSpec, row: int, col: int):
        config, static = spec.config, spec.static
        palette = static.get("palette")
        if palette is None or len(palette) == 0:
            palette = default_palette(max(2, config.get("num_classes") or 2)).numpy()
        self.palette = np.asarray(palette)
        legend = None
        ends = ramp_ends(config)
        if ends is not None:
            low, high = _rgba(np.asarray([DIVERGING_ANCHORS[0], DIVERGING_ANCHORS[-1]]))
            legend = [(f"{ends[0]} {ends[1]}", tuple(low)), (ends[3], tuple(high))]
        elif len(self.palette) <= 12:
            legend = [(display_name(config, i), tuple(c)) for i, c in enumerate(_rgba(self.palette))]
        plane = config.get("input_dim", 2) > 2
        self.x_label, self.y_label = ("u", "v") if plane else ("x1", "x2")
        super().__init__(parent_grid, spec, row, col, legend)
        u0, u1, v0, v1 = config["domain"]
        w, h = config["resolution"]
        # A sized internal format: CUDA can register the texture for the interop upload.
        self.image = scene.visuals.Image(
            np.zeros((h, w, 4), np.uint8),
            parent=self.view.scene,
            interpolation="nearest",
            method="subdivide",
            texture_format="r8",
        )  # fmt: skip  (vispy makes it rgba8)
        self.interop = None
        self.upload_path = "host"
        # Row 0 of a frame is the top of the domain (v1): scale rows downwards.
        self.image.transform = STTransform(scale=((u1 - u0) / w, -(v1 - v0) / h), translate=(u0, v1))
        self.points = None
        if "points_uv" in static and len(static["points_uv"]):
            uv = np.asarray(static["points_uv"], np.float32)
            colours = point_colours(config, static)
            face = _rgba(colours) if colours is not None else np.ones((len(uv), 4), np.float32)
            self.points = scene.visuals.Markers(parent=self.view.scene)
            self.points.set_data(uv, face_color=face, edge_color="black", edge_width=0.5, size=5)
            self.points.order = -1  # above the image
        self.hyperplanes = None  # the first layer's zero lines (GridProbe(hyperplanes=True))
        self.set_range((u0, u1), (v0, v1))

    def draw(self, data: dict[str, np.ndarray]) -> None:
        self.image.set_data(np.ascontiguousarray(data["rgba"]))
        if "hyperplanes" in data:
            self._draw_hyperplanes(np.asarray(data["hyperplanes"]))

    def _draw_hyperplanes(self, lines: np.ndarray) -> None:
        """Each unit of the first layer: the line where it is zero, across the map."""
        ends = line_segments(lines, self.spec.config["domain"])
        ends = ends[np.isfinite(ends).all(axis=(1, 2))].reshape(-1, 2).astype(np.float32)
        if self.hyperplanes is None:
            self.hyperplanes = scene.visuals.Line(
                parent=self.view.scene, connect="segments", color=HYPERPLANE, width=1.0, method="gl"
            )
            self.hyperplanes.order = -1  # above the image, as the points
        self.hyperplanes.visible = len(ends) > 0
        if len(ends):
            self.hyperplanes.set_data(pos=ends)

    def readout(self, x: float, y: float) -> str | None:
        probs = None if self.data is None else self.data.get("probs")
        if probs is None:  # a CUDA frame drawn through interop has no host copy
            return None
        us, vs = self.spec.static.get("us"), self.spec.static.get("vs")
        if us is None or vs is None:
            return None
        c, r = int(np.abs(np.asarray(us) - x).argmin()), int(np.abs(np.asarray(vs) - y).argmin())
        p = np.asarray(probs[r, c], np.float64).reshape(-1)
        where = f"({x:.3g}, {y:.3g})"
        if not np.all(np.isfinite(p)):
            return f"{where}: not finite"
        config = self.spec.config
        if config.get("mode") == "value":
            index = int(config.get("class_index", 0))
            named = len(p) > 1 or config.get("class_names")
            return f"{where}: " + (
                f"{display_name(config, index, 'output')} {p[index]:.4g}" if named else f"value {p[0]:.4g}"
            )
        if len(p) == 1:
            return f"{where}: P({display_name(config, 1)}) {p[0]:.2f}"
        top = np.argsort(-p, kind="stable")[:3]
        return f"{where}: " + ", ".join(f"{display_name(config, k)} {p[k]:.2f}" for k in top)

    def update_device(self, rgba, step: float, epoch: float, hyperplanes=None) -> None:
        """Show an (H, W, 4) uint8 CUDA frame: through CUDA-GL interop when it can be used
        (registered on first use, after the texture exists), else through host memory; its
        ``hyperplanes`` (a few numbers a unit) through host memory."""
        lines = None if hyperplanes is None else hyperplanes.cpu().numpy()  # (its copy is done)
        from probescope.viewers.interop import InteropTexture, why_not_interop

        if self.interop is None and self.upload_path == "host":
            reason = why_not_interop(rgba.device)
            if reason is None:
                try:
                    self.interop = InteropTexture(self.view.canvas, self.image._texture, rgba.device)
                    self.upload_path = "cuda-gl interop"
                except Exception as err:
                    reason = f"{type(err).__name__}: {err}"
            if reason is not None:
                self.upload_path = f"host ({reason})"
        if self.interop is not None:
            self.step, self.epoch = round(step), round(epoch)
            self.data, self.hover = None, ""  # no host copy of this frame to read values from
            self._set_caption()
            self.interop.upload(rgba)
            self.image.update()
            if lines is not None:
                self._draw_hyperplanes(lines)
        else:
            data = {"rgba": rgba.cpu().numpy()}
            self.update(data if lines is None else {**data, "hyperplanes": lines}, step, epoch)


class CurvePanel(Panel):
    """Data points, the model's curve and the per-point loss band."""

    def __init__(self, parent_grid, spec: PanelSpec, row: int, col: int):
        self.x_label = x_label(spec.config)
        super().__init__(parent_grid, spec, row, col)
        static = spec.static
        self.x = np.asarray(static["x"], np.float32)
        n = len(self.x)
        scatter = np.stack([static["scatter_x"], static["scatter_y"]], axis=1).astype(np.float32)
        self.data_points = scene.visuals.Markers(parent=self.view.scene)
        self.data_points.set_data(scatter, face_color=(0.55, 0.55, 0.55, 0.6), edge_width=0, size=4)
        idx = np.arange(n - 1)
        faces = np.concatenate(
            [np.stack([idx, idx + 1, n + idx], 1), np.stack([idx + 1, n + idx + 1, n + idx], 1)]
        )
        self.faces = faces.astype(np.uint32)
        self.band = scene.visuals.Mesh(
            vertices=np.zeros((2 * n, 2), np.float32),
            faces=self.faces,
            color=(*BAND, 0.25),
            parent=self.view.scene,
        )
        self.curve = np.stack([self.x, np.zeros_like(self.x)], 1)  # (x, prediction), data units
        self.line = scene.visuals.Line(
            self.curve,
            color=(*BAND, 1.0),
            width=2.5,
            method="agg",  # thick lines: GL's own line width is 1 px on core profiles
            parent=self.view.scene,
        )
        self.view.camera.transform.changed.connect(lambda event: in_pixels(self.line, self.curve, self.view))
        self.set_range(fixed_limits(static["scatter_x"], 0.02), fixed_limits(static["scatter_y"], 0.15))

    def draw(self, data: dict[str, np.ndarray]) -> None:
        lower = np.asarray(data["band_lower"], np.float32)
        upper = np.asarray(data["band_upper"], np.float32)
        vertices = np.concatenate([np.stack([self.x, lower], 1), np.stack([self.x, upper], 1)])
        self.band.set_data(vertices=vertices, faces=self.faces, color=(*BAND, 0.25))
        self.curve = np.stack([self.x, np.asarray(data["y_pred"], np.float32)], 1)
        in_pixels(self.line, self.curve, self.view)

    def readout(self, x: float, y: float) -> str | None:
        i = int(np.abs(self.x - x).argmin())
        pred, loss = float(self.data["y_pred"][i]), float(self.data["loss"][i])
        return f"x {self.x[i]:.3g}: prediction {pred:.3g}, loss {loss:.3g}"


class PredictionPanel(Panel):
    """Predictions on the fixed batch: jittered probability of the true class (of each label's
    true state), or y_hat vs y."""

    def __init__(self, parent_grid, spec: PanelSpec, row: int, col: int):
        config, static = spec.config, spec.static
        self.task = config["task"]
        self.y = np.asarray(static["y_true"], np.float32)
        self.jitter = np.asarray(static["jitter"], np.float32)
        palette = spec.static.get("palette")
        self.colours = _rgba(scatter_colours(self.task, self.y, palette), 0.6)
        entries = scatter_legend(self.task, config, palette=palette)
        legend = [(name, (*colour, 1.0)) for name, colour in entries] or None
        self.x_label, self.y_label = {
            "regression": ("y (true)", "y (predicted)"),
            "binary": ("predicted P(class 1)", "true class"),
            "multilabel": ("label (pale: samples without it)", "predicted P(true state)"),
        }.get(self.task, ("true class", "predicted P(true class)"))
        super().__init__(parent_grid, spec, row, col, legend)
        self.points = scene.visuals.Markers(parent=self.view.scene)
        self.guide = None
        if self.task == "regression":
            lo, hi = fixed_limits(self.y)
            self.guide = scene.visuals.Line(np.array([[lo, lo], [hi, hi]], np.float32), color=GREY,
                                            parent=self.view.scene)  # fmt: skip
            self.scatter_range = ((lo, hi), (lo, hi))
        elif self.task == "binary":
            threshold = float(config.get("threshold", 0.5))
            self.guide = scene.visuals.Line(np.array([[threshold, -0.5], [threshold, 1.5]], np.float32),
                                            color=GREY, parent=self.view.scene)  # fmt: skip
            self.scatter_range = ((-0.02, 1.02), (-0.5, 1.5))
        else:
            self.scatter_range = ((-0.6, int(config["num_classes"]) - 0.4), (-0.02, 1.02))
        self.set_range(*self.scatter_range)
        self.confusion_shown = False
        self.matrix: scene.visuals.Image | None = None  # the confusion matrix (key c), made when first shown
        self.counts: scene.visuals.Text | None = None

    def toggle_confusion(self) -> bool:
        """Show the confusion matrix instead of the predictions, or the predictions again (key
        ``c``); False for a regression, which has none, and for labels (each its own 2x2, which
        the pointer reads out over the label)."""
        if self.task in ("regression", "multilabel"):
            return False
        self.confusion_shown = not self.confusion_shown
        shown = self.confusion_shown
        if shown and self.matrix is None:
            self.matrix = scene.visuals.Image(np.zeros((1, 1, 4), np.uint8), interpolation="nearest",
                                              parent=self.view.scene)  # fmt: skip
            self.matrix.transform = STTransform(translate=(-0.5, -0.5))  # cell (r, c) centred on (c, r)
            self.counts = scene.visuals.Text("", font_size=7, anchor_x="center", anchor_y="center",
                                             parent=self.view.scene)  # fmt: skip
        for visual in (self.points, self.guide):
            if visual is not None:
                visual.visible = not shown
        if self.matrix is not None:
            self.matrix.visible = self.counts.visible = shown
        self.x_axis.axis.axis_label = "predicted class" if shown else self.x_label
        self.y_axis.axis.axis_label = "true class" if shown else self.y_label
        classes = int(self.spec.config.get("num_classes") or 2)
        self.set_range(*(((-0.5, classes - 0.5),) * 2 if shown else self.scatter_range))
        if self.data is not None:
            self.draw(self.data)
        return True

    def positions(self, data: dict[str, np.ndarray]) -> np.ndarray:
        return scatter_points(self.task, self.y, self.jitter, data).astype(np.float32)

    def draw(self, data: dict[str, np.ndarray]) -> None:
        self.points.set_data(self.positions(data), face_color=self.colours, edge_width=0, size=6)
        if self.confusion_shown and data.get("confusion") is not None:
            self._draw_matrix(np.asarray(data["confusion"]))

    def _draw_matrix(self, counts: np.ndarray) -> None:
        """Each cell shaded from white to blue by its share of its row (the true class), as
        ``probescope.figures.confusion_figure`` draws it, and up to 20 classes its count."""
        shares = confusion_shares(counts)
        rgb = 255.0 + (np.asarray(CONFUSION_BLUE, np.float64) - 255.0) * shares[..., None]
        alpha = np.full((*shares.shape, 1), 255.0)
        self.matrix.set_data(np.round(np.concatenate([rgb, alpha], -1)).astype(np.uint8))
        classes = len(counts)
        if classes <= 20:
            rows, cols = np.indices(counts.shape)
            self.counts.text = [str(int(n)) for n in counts.reshape(-1)]
            self.counts.pos = np.stack([cols.reshape(-1), rows.reshape(-1)], 1).astype(np.float32)
            dark = shares.reshape(-1) > 0.6
            self.counts.color = np.where(dark[:, None], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]).astype(
                np.float32
            )
        else:
            self.counts.text = ""

    def subtitle(self, data: dict[str, np.ndarray]) -> str:
        if self.task == "regression":
            return f"  ·  MSE {float(data['mse']):.4g}  R² {float(data['r2']):.3f}"
        if self.task == "multilabel":
            return (
                f"  ·  accuracy {float(data['accuracy']):.3f}  exact {float(data['exact_match']):.3f}"
                f"  F1 {float(data['f1']):.3f}"
            )
        return f"  ·  accuracy {float(data['accuracy']):.3f}"

    def readout(self, x: float, y: float) -> str | None:
        """Over a class (the x-axis, or the y-axis of a binary task): its samples, how many
        are right, and the class they are most often mistaken for. Over a cell of the
        confusion matrix: its count and its share of the true class. Over a label: its samples
        right, and those it misses and those it marks wrongly."""
        if self.task == "multilabel" and self.data is not None:
            return _label_readout(np.asarray(self.data["label_confusion"]), x, self.spec.config)
        confusion = None if self.data is None else self.data.get("confusion")
        if confusion is None:
            return None
        confusion = np.asarray(confusion)
        if self.confusion_shown:
            r, c = round(y), round(x)
            if not (0 <= r < len(confusion) and 0 <= c < len(confusion)):
                return None
            total = int(confusion[r].sum())
            share = f" ({confusion[r, c] / total:.0%} of the class)" if total else ""
            config = self.spec.config
            true = display_name(config, r)
            predicted = display_name(config, c, None)
            return f"true {true}, predicted {predicted}: {int(confusion[r, c])} samples{share}"
        where = y if self.task == "binary" else x
        k = round(where)
        if not 0 <= k < len(confusion) or abs(where - k) > 0.45:
            return None
        row = confusion[k]
        total = int(row.sum())
        name = display_name(self.spec.config, k)
        if total == 0:
            return f"{name}: no samples"
        text = f"{name}: {int(row[k])} of {total} right"
        wrong = row.copy()
        wrong[k] = 0
        if wrong.any():
            j = int(wrong.argmax())
            text += f", {int(wrong[j])} taken for {display_name(self.spec.config, j)}"
        return text


def _label_readout(label_confusion: np.ndarray, x: float, config: dict) -> str | None:
    """What the pointer over label ``round(x)`` says, from its 2x2 counts (rows: absent,
    present; columns: predicted absent, present)."""
    k = round(x)
    if not 0 <= k < len(label_confusion) or abs(x - k) > 0.45:
        return None
    true_neg, false_pos, false_neg, true_pos = (int(n) for n in label_confusion[k].reshape(-1))
    total = true_neg + false_pos + false_neg + true_pos
    name = display_name(config, k, "label")
    return (
        f"{name}: {true_pos + true_neg} of {total} right; present in {false_neg + true_pos}, "
        f"{false_neg} missed; {false_pos} marked where absent"
    )


#: The darkest cell of a confusion matrix (matplotlib's "Blues" at 1), drawn at a share of 1.
CONFUSION_BLUE = (8, 48, 107)


def in_pixels(line: scene.visuals.Line, pos: np.ndarray, view) -> None:
    """Give an antialiased line its vertices in (about) screen pixels, with a transform back
    to data units. vispy's agg line shader misdraws caps and joins (segments fade out) when a
    data unit is far from a pixel, as on a plot of a loss near 1 over thousands of steps
    (vispy issue #947, pull request #2793); in pixel units it draws them as designed. Called
    again whenever the camera's transform changes (pan, zoom, resize, a new range)."""
    rect = view.camera.rect
    width, height = (float(v) for v in view.size)
    sx = width / rect.width if rect.width > 0 and width > 0 else 1.0
    sy = height / rect.height if rect.height > 0 and height > 0 else 1.0
    line.set_data(pos=(np.asarray(pos, np.float64) * (sx, sy)).astype(np.float32))
    if isinstance(line.transform, STTransform):  # new values, same transform: no shader rebuilt
        line.transform.scale = (1.0 / sx, 1.0 / sy)
    else:  # a new transform changes the line's shader program, which is built again (ms each)
        line.transform = STTransform(scale=(1.0 / sx, 1.0 / sy))


class SeriesPanel(Panel):
    """Lines of named series over steps, optionally on a log10 scale."""

    x_label = "step"

    def __init__(
        self, parent_grid, spec: PanelSpec, row: int, col: int, log_y: bool = True, legend=None, y_label=None
    ):
        self.log_y = log_y
        self.y_label = y_label or ("log10 value" if log_y else "value")
        super().__init__(parent_grid, spec, row, col, legend)
        self.lines: dict[str, scene.visuals.Line] = {}
        self.series: dict[str, np.ndarray] = {}  # each line's vertices in data units (x, y)
        self.spans: dict[str, tuple[float, float]] = {}  # each series' first and last step
        self.view.camera.transform.changed.connect(self._lines_in_pixels)  # pans, zooms, resizes

    def set_series(
        self, name: str, steps: np.ndarray, values: np.ndarray, colour, dense: bool = False
    ) -> None:
        """Draw series ``name``; ``dense``: one point a step or so (a batch loss), drawn as a
        thin GL line (vispy's antialiased lines break up on a zigzag of hundreds of points)."""
        values = np.asarray(values, np.float64)
        steps = np.asarray(steps, np.float64)
        if len(steps):  # every step, drawn or not: a run's stretch of NaN stays on the axis
            self.spans[name] = (float(steps.min()), float(steps.max()))
        else:
            self.spans.pop(name, None)
        if self.log_y:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(values > 0, np.log10(values), np.nan)
        keep = np.isfinite(values)
        pos = np.stack([steps[keep], values[keep]], 1).astype(np.float32)
        if len(pos) < 2:
            pos = np.concatenate([pos, pos])[:2] if len(pos) else np.zeros((2, 2), np.float32)
        self.series[name] = pos
        line = self.lines.get(name)
        if line is None:
            line = self.lines[name] = scene.visuals.Line(
                pos,
                color=colour,
                width=1.0 if dense else 2.0,
                method="gl" if dense else "agg",
                parent=self.view.scene,
            )
        else:
            line.set_data(pos=pos, color=colour)
        if line.method == "agg":
            in_pixels(line, pos, self.view)

    def readout(self, x: float, y: float) -> str | None:
        parts, step = [], None
        for name, pos in self.series.items():
            if not len(pos):
                continue
            i = int(np.abs(pos[:, 0] - x).argmin())
            step = pos[i, 0] if step is None else step
            value = 10.0 ** float(pos[i, 1]) if self.log_y else float(pos[i, 1])
            parts.append(f"{name} {value:.4g}")
        return f"step {step:.0f}: " + ", ".join(parts) if parts else None

    def rescale(self) -> None:
        if self.series:
            stacked = np.concatenate(list(self.series.values()))
            steps = np.concatenate([stacked[:, 0], np.ravel(list(self.spans.values()))])
            self.set_range(fixed_limits(steps, 0.02), fixed_limits(stacked[:, 1]))

    def _lines_in_pixels(self, event=None) -> None:
        for name, line in self.lines.items():  # the pixels per data unit changed
            if line.method == "agg":
                in_pixels(line, self.series[name], self.view)


class LossPanel(SeriesPanel):
    """Train loss per step and epoch, valid loss and metrics (metrics on a linear scale)."""

    COLOURS: ClassVar[dict[str, tuple]] = {"train_loss": GREY, "train_loss_epoch": (0.12, 0.47, 0.71, 1.0),
                                 "valid_loss": (1.0, 0.5, 0.05, 1.0)}  # fmt: skip

    def __init__(self, parent_grid, spec: PanelSpec, row: int, col: int, log_y: bool = True):
        # The legend names the series in their colours as they appear (none before a frame).
        super().__init__(parent_grid, spec, row, col, log_y=log_y, legend=[("", (0.0, 0.0, 0.0, 0.0))])
        self.diverged: scene.visuals.InfiniteLine | None = None  # at the first NaN or infinity
        self.names: list[str] = []  # the frame's series and its first NaN or infinity, for the caption
        self.divergence: tuple[str, int, float] | None = None
        self.colours: dict[str, tuple] = {}  # each series' colour, kept from its first frame

    def colour(self, name: str):
        if name in self.COLOURS:
            return self.COLOURS[name]
        return (*METRIC_COLOURS[len(self.lines) % len(METRIC_COLOURS)], 1.0)

    def draw(self, data: dict[str, np.ndarray]) -> None:
        series = frame_series(data)
        for name, (steps, values) in series.items():
            colour = self.colours.setdefault(name, self.colour(name))
            self.set_series(name, steps, values, colour, dense=name == "train_loss")
        if list(series) != self.names:
            self.legend.set_entries([(name, self.colours[name]) for name in series] or [("", (0, 0, 0, 0))])
        self.rescale()
        self.names, self.divergence = list(series), first_nonfinite(series)
        if self.divergence is not None and self.diverged is None:  # where the run blew up
            self.diverged = scene.visuals.InfiniteLine(0.0, DIVERGED, vertical=True, parent=self.view.scene)
        if self.diverged is not None:
            self.diverged.visible = self.divergence is not None
            if self.divergence is not None:
                self.diverged.set_data(pos=float(self.divergence[1]))

    def subtitle(self, data: dict[str, np.ndarray]) -> str:
        """Where a series first turned NaN or infinite (as of the last draw: the caption is
        redrawn at every move of the pointer); the legend names the series."""
        if self.divergence is None:
            return ""
        name, step, value = self.divergence
        return f"  ·  {name} {value} at step {step}"


def legend_names(names: list[str], width: int = 20) -> list[str]:
    """Names short enough for a legend column: without the prefix they all share (up to a
    ``/`` or ``.``) and ``.weight``, the rest cut at the front to ``width`` characters
    (``…layer.3.mlp.fc/l2``): the end names the layer and the statistic. The pointer's
    readout gives them whole."""
    if len(names) > 1:
        first, last = min(names), max(names)  # the prefix all share is these two's
        pairs = enumerate(zip(first, last, strict=False))  # (first is a prefix of last: all of it)
        common = first[: next((i for i, (a, b) in pairs if a != b), len(first))]
        cut = max(common.rfind("/"), common.rfind(".")) + 1
        names = [n[cut:] for n in names]
    names = [n.replace(".weight/", "/") for n in names]
    return [n if len(n) <= width else "…" + n[-(width - 1) :] for n in names]


class StatsPanel(SeriesPanel):
    """Statistics at the hook points over the frames seen so far (L2 norms, spectral norms).

    With a state model (``StatsProbe(states=...)``), a strip along the bottom shows the
    latent state at every frame so far, in the training map's state colours, and the caption
    names the current one."""

    accumulates = True

    def __init__(self, parent_grid, spec: PanelSpec, row: int, col: int, max_lines: int = 6):
        columns = [str(c) for c in spec.static.get("columns", [])]
        norms = [c for c in columns if c.endswith("/l2") or c.endswith("/spectral")]
        chosen = spread(norms, max_lines)  # from the first layers to the last, not the first few
        self.columns = {c: columns.index(c) for c in chosen}
        colours = [(*METRIC_COLOURS[i % len(METRIC_COLOURS)], 1.0) for i in range(len(chosen))]
        legend = list(zip(legend_names(chosen), colours, strict=True))
        super().__init__(parent_grid, spec, row, col, log_y=True, legend=legend)
        self.history: dict[str, list[tuple[float, float]]] = {c: [] for c in chosen}
        self.states: list[tuple[float, int]] = []  # (step, latent state) per frame
        self.strip: scene.visuals.Mesh | None = None
        self._last_step: float | None = None

    def update(self, data: dict[str, np.ndarray], step: float, epoch: float) -> None:
        values = np.asarray(data["values"], np.float64)
        if self._last_step is not None and step < self._last_step:  # replay went back: start over
            for series in self.history.values():
                series.clear()
            self.states.clear()
        self._last_step = step
        if "state" in data and (not self.states or self.states[-1][0] != step):
            self.states.append((step, int(data["state"])))
        for column, index in self.columns.items():
            series = self.history[column]
            if not series or series[-1][0] != step:
                series.append((step, values[index] if index < len(values) else np.nan))
        super().update(data, step, epoch)

    def draw(self, data: dict[str, np.ndarray]) -> None:
        for i, (column, series) in enumerate(self.history.items()):
            steps, values = (np.array(v) for v in zip(*series, strict=True)) if series else ([], [])
            self.set_series(column, np.asarray(steps), np.asarray(values), (*METRIC_COLOURS[i % 4], 1.0))
        self.rescale()
        if self.states:
            self._draw_states()

    def subtitle(self, data: dict[str, np.ndarray]) -> str:
        if "state" not in data:
            return ""
        state = int(data["state"])
        probs = np.asarray(data.get("state_probs", ()), np.float64)
        p = f" (p={probs[state]:.2f})" if state < len(probs) else ""
        return f"  ·  latent state {state}{p}"

    def _draw_states(self) -> None:
        """One band per frame, from its step to the next, along the bottom of the view."""
        from probescope.analysis.report import state_colour

        steps = np.array([s for s, _ in self.states], np.float64)
        ends = np.append(steps[1:], steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1.0))
        rect = self.view.camera.rect
        y0, y1 = rect.bottom + 0.01 * rect.height, rect.bottom + 0.05 * rect.height
        n = len(steps)
        vertices = np.empty((4 * n, 2), np.float32)
        vertices[0::4] = np.stack([steps, np.full(n, y0)], 1)
        vertices[1::4] = np.stack([ends, np.full(n, y0)], 1)
        vertices[2::4] = np.stack([ends, np.full(n, y1)], 1)
        vertices[3::4] = np.stack([steps, np.full(n, y1)], 1)
        first = 4 * np.arange(n, dtype=np.uint32)[:, None]
        corners = np.array([[0, 1, 2], [0, 2, 3]], np.uint32)  # two triangles a band
        faces = np.concatenate([first + corners[0], first + corners[1]])
        colours = np.array([Color(state_colour(k)).rgba for _, k in self.states], np.float32)
        face_colours = np.concatenate([colours, colours])
        if self.strip is None:
            self.strip = scene.visuals.Mesh(vertices, faces, face_colors=face_colours, parent=self.view.scene)
        else:
            self.strip.set_data(vertices=vertices, faces=faces, face_colors=face_colours)


class CheckpointPanel(SeriesPanel):
    """A CheckpointProbe's metric at every frame seen so far, each saved frame ringed, the
    best so far starred (from the frame's own ``best``: right even when a live view missed
    frames); the caption says the value, the best and its step."""

    accumulates = True

    VALUE = (*METRIC_COLOURS[1], 1.0)
    BEST = (0.93, 0.69, 0.13, 1.0)

    def __init__(self, parent_grid, spec: PanelSpec, row: int, col: int):
        metric = str(spec.config.get("metric", "value"))
        self.metric = metric
        super().__init__(parent_grid, spec, row, col, log_y=False, y_label=metric)
        self.history: dict[float, tuple[float, bool]] = {}  # step -> (value, saved)
        self.saved = scene.visuals.Markers(parent=self.view.scene)
        self.best = scene.visuals.Markers(parent=self.view.scene)
        self.saved.order, self.best.order = 1, 2  # drawn after the line: on top of it

    def update(self, data: dict[str, np.ndarray], step: float, epoch: float) -> None:
        if self.history and step < max(self.history):  # a replay went back: start over
            self.history.clear()
        self.history[float(step)] = (float(data["value"]), bool(data["saved"]))
        super().update(data, step, epoch)

    def draw(self, data: dict[str, np.ndarray]) -> None:
        steps = np.array(sorted(self.history), np.float64)
        values = np.array([self.history[s][0] for s in steps], np.float64)
        self.set_series(self.metric, steps, values, self.VALUE)
        best, best_step = float(data["best"]), float(data["best_step"])
        saved = np.array(
            [(s, self.history[s][0]) for s in steps if self.history[s][1] and s != best_step], np.float32
        ).reshape(-1, 2)
        self._set_markers(self.saved, saved[np.isfinite(saved[:, 1])], "disc", 9, (1, 1, 1, 1), self.VALUE)
        here = np.array([[best_step, best]], np.float32) if np.isfinite(best) and best_step >= 0 else None
        self._set_markers(self.best, here, "star", 18, self.BEST, (0.3, 0.3, 0.3, 1.0))
        points = [p for p in (here,) if p is not None]
        finite = np.isfinite(values)
        if finite.any() or points:
            xy = np.concatenate([np.stack([steps[finite], values[finite]], 1), *points])
            self.set_range(fixed_limits(xy[:, 0], 0.02), fixed_limits(xy[:, 1]))

    @staticmethod
    def _set_markers(markers, pos, symbol: str, size: float, face, edge) -> None:
        if pos is None or not len(pos):
            markers.visible = False
            return
        markers.set_data(pos, symbol=symbol, size=size, face_color=face, edge_color=edge, edge_width=1.2)
        markers.visible = True

    def subtitle(self, data: dict[str, np.ndarray]) -> str:
        value, best, best_step = float(data["value"]), float(data["best"]), int(data["best_step"])
        text = f"  ·  {self.metric} {value:.4g}"
        if best_step >= 0:
            text += f"  ·  best {best:.4g} at step {best_step}"
        return text + ("  ·  saved" if bool(data["saved"]) else "")


class NeuronsPanel(Panel):
    """Each unit's map over the grid, as one mosaic Image (NeuronProbe); the pointer names the
    unit and its output at that point."""

    x_label = y_label = "units"

    def __init__(self, parent_grid, spec: PanelSpec, row: int, col: int):
        from probescope.kernels.colormap import DIVERGING_ANCHORS

        config = spec.config
        self.size, self.gap = int(config["resolution"]), int(config["gap"])
        self.columns, self.rows = int(config["columns"]), int(config["rows"])
        self.width = self.columns * (self.size + self.gap) - self.gap
        self.height = self.rows * (self.size + self.gap) - self.gap
        ends = np.asarray([DIVERGING_ANCHORS[0], DIVERGING_ANCHORS[-1]], np.float32)
        legend = [(text, tuple(c)) for text, c in zip(("negative", "positive"), _rgba(ends), strict=True)]
        super().__init__(parent_grid, spec, row, col, legend)
        self.image = scene.visuals.Image(
            np.zeros((self.height, self.width, 4), np.uint8),
            parent=self.view.scene,
            interpolation="nearest",
            method="subdivide",
        )
        self.image.transform = STTransform(scale=(1.0, -1.0), translate=(0.0, self.height))  # row 0 on top
        self.set_range((0, self.width), (0, self.height))
        for axis in (self.x_axis, self.y_axis):  # mosaic pixels are no coordinates: no tick labels
            axis.axis.text_color = (0.0, 0.0, 0.0, 0.0)
            axis.axis.tick_color = (0.0, 0.0, 0.0, 0.0)

    def draw(self, data: dict[str, np.ndarray]) -> None:
        self.image.set_data(np.ascontiguousarray(data["rgba"]))

    def subtitle(self, data: dict[str, np.ndarray]) -> str:
        units = len(self.spec.static.get("units", ()))
        return f"  ·  {units} units of {self.spec.config.get('layer')!r}, ±{float(data['scale']):.3g}"

    def readout(self, x: float, y: float) -> str | None:
        pitch = self.size + self.gap
        col, px = divmod(x, pitch)
        row, py = divmod(self.height - y, pitch)
        unit = int(row) * self.columns + int(col)
        activations = np.asarray(self.data["activations"])
        if px >= self.size or py >= self.size or not 0 <= unit < len(activations) or col >= self.columns:
            return None
        r, c = int(py), int(px)
        units, us, vs = (self.spec.static[k] for k in ("units", "us", "vs"))
        return f"unit {int(units[unit])} at ({us[c]:.3g}, {vs[r]:.3g}): {float(activations[unit, r, c]):.3g}"


class HistogramsPanel(Panel):
    """Each tensor's distribution over training (HistogramProbe), one mosaic Image of a tile per
    tensor (probescope.probes.histogram.Distributions: columns the frames so far, rows its
    values, highest on top); the pointer names the tensor, the step, the slice of values and
    its share of the entries."""

    x_label = "frames (tiles: tensors)"
    y_label = "values"
    accumulates = True

    def __init__(self, parent_grid, spec: PanelSpec, row: int, col: int):
        from probescope.kernels.colormap import DIVERGING_ANCHORS

        red = np.asarray([DIVERGING_ANCHORS[-1]], np.float32)
        legend = [
            ("few", (0.96, 0.62, 0.56, 1.0)),
            ("most", tuple(_rgba(red)[0])),
            ("not finite", (1.0, 0.0, 1.0, 1.0)),
        ]
        super().__init__(parent_grid, spec, row, col, legend)
        self.names = [str(n) for n in spec.static.get("names", ())]
        self.history = Distributions()
        self.picture = None
        self.image = scene.visuals.Image(
            np.zeros((1, 1, 4), np.uint8), parent=self.view.scene, interpolation="nearest", method="subdivide"
        )
        self.image.transform = STTransform(scale=(1.0, -1.0), translate=(0.0, 1.0))  # row 0 on top
        for axis in (self.x_axis, self.y_axis):  # mosaic pixels are no coordinates: no tick labels
            axis.axis.text_color = (0.0, 0.0, 0.0, 0.0)
            axis.axis.tick_color = (0.0, 0.0, 0.0, 0.0)

    def update(self, data: dict[str, np.ndarray], step: float, epoch: float) -> None:
        self.history.add(step, data)
        super().update(data, step, epoch)

    def draw(self, data: dict[str, np.ndarray]) -> None:
        self.picture = self.history.picture()
        rgba = distributions_rgba(self.picture)
        height, width = rgba.shape[:2]
        self.image.set_data(rgba)
        self.image.transform.translate = (0.0, height)
        self.set_range((0, width), (0, height))

    def subtitle(self, data: dict[str, np.ndarray]) -> str:
        bad = [n for n, count in zip(self.names, np.asarray(data["nonfinite"]), strict=True) if count]
        text = f"  ·  {len(self.names)} tensors, {len(self.history)} frames"
        return text + (
            f"  ·  not finite: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad else ""
        )

    def readout(self, x: float, y: float) -> str | None:
        return distributions_readout(self.names, self.picture, x, y) if self.picture is not None else None


class FramePanel(SeriesPanel):
    """A probe of the user's own kind, drawn from what its frames hold (probescope.probes.views):
    one entry as a picture (an image, a heat map, a mosaic of maps, a histogram or a line), its
    numbers in the caption; a frame of numbers alone draws them as series over the frames
    seen so far."""

    accumulates = True

    def __init__(self, parent_grid, spec: PanelSpec, row: int, col: int):
        super().__init__(parent_grid, spec, row, col, log_y=False, legend=[("", (0.0, 0.0, 0.0, 0.0))])
        self.views = dict(spec.config.get("views") or {})
        self.layout = frame_layout({})
        self.numbers = Numbers()
        self.picture_visuals: dict[str, Any] = {}  # view -> its visual, made at first use
        self.picture_extra = None  # a heat map's range, a histogram's (counts, edges)
        self.picture_caption = ""
        self.axes: tuple[str, str] | None = None
        self.nonfinite = 0  # a histogram's values left out
        self.legend_shown: list[str] = []

    def update(self, data: dict[str, np.ndarray], step: float, epoch: float) -> None:
        self.layout = frame_layout(data, self.views)
        self.numbers.add(step, self.layout.scalars)
        super().update(data, step, epoch)

    def draw(self, data: dict[str, np.ndarray]) -> None:
        picture = self.layout.picture
        for view, visual in self.picture_visuals.items():
            visual.visible = picture is not None and view == picture[1]
        if picture is None:
            self._draw_series()
            return
        for line in self.lines.values():
            line.visible = False
        key, view = picture
        value = np.asarray(data[key])
        self._label_axes(*picture_axes(key, view))
        getattr(self, f"_draw_{view}")(value)
        extra = self.picture_extra if view != "histogram" else self.nonfinite
        self.picture_caption = picture_caption(key, view, value, extra)

    def _visual(self, view: str, make):
        if view not in self.picture_visuals:
            self.picture_visuals[view] = make()
        return self.picture_visuals[view]

    def _label_axes(self, x: str, y: str) -> None:
        if self.axes != (x, y):
            self.x_axis.axis.axis_label, self.y_axis.axis.axis_label = x, y
            self.axes = (x, y)

    def _draw_series(self) -> None:
        self._label_axes("step", "value")
        for i, (key, steps, values) in enumerate(self.numbers.series()):
            self.set_series(key, steps, values, (*METRIC_COLOURS[i % len(METRIC_COLOURS)], 1.0))
            self.lines[key].visible = True
        names = legend_names(self.numbers.names())
        if names != self.legend_shown:
            colours = [(*METRIC_COLOURS[i % len(METRIC_COLOURS)], 1.0) for i in range(len(names))]
            self.legend.set_entries(list(zip(names, colours, strict=True)) or [("", (0.0, 0.0, 0.0, 0.0))])
            self.legend_shown = names
        self.rescale()
        self.picture_caption = ""

    def _draw_image(self, value: np.ndarray) -> None:
        key, view = self.layout.picture
        rgba, self.picture_extra = picture_rgba(key, view, value, self.views)
        height, width = rgba.shape[:2]

        def make():
            image = scene.visuals.Image(
                rgba, parent=self.view.scene, interpolation="nearest", method="subdivide"
            )
            image.transform = STTransform(scale=(1.0, -1.0), translate=(0.0, height))  # row 0 on top
            return image

        image = self._visual("image", make)
        image.set_data(rgba)
        image.transform.translate = (0.0, height)
        image.visible = True
        self.set_range((0, width), (0, height))

    _draw_heatmap = _draw_maps = _draw_image  # coloured by picture_rgba

    def _draw_histogram(self, value: np.ndarray) -> None:
        counts, edges, self.nonfinite = histogram(value)
        n = len(counts)
        left, right, top = edges[:-1], edges[1:], counts.astype(np.float64)
        vertices = np.empty((4 * n, 2), np.float32)
        vertices[0::4] = np.stack([left, np.zeros(n)], 1)
        vertices[1::4] = np.stack([right, np.zeros(n)], 1)
        vertices[2::4] = np.stack([right, top], 1)
        vertices[3::4] = np.stack([left, top], 1)
        first = 4 * np.arange(n, dtype=np.uint32)[:, None]
        faces = np.concatenate(
            [first + np.array([0, 1, 2], np.uint32), first + np.array([0, 2, 3], np.uint32)]
        )
        colour = (*METRIC_COLOURS[1], 0.8)
        bars = self._visual(
            "histogram", lambda: scene.visuals.Mesh(vertices, faces, color=colour, parent=self.view.scene)
        )
        bars.set_data(vertices=vertices, faces=faces, color=colour)
        self.picture_extra = (counts, edges)
        self.set_range(fixed_limits(edges, 0.02), (0.0, max(1.0, float(top.max())) * 1.08))

    def _draw_line(self, value: np.ndarray) -> None:
        y = np.asarray(value, np.float64)
        pos = np.stack([np.arange(len(y), dtype=np.float64), y], 1)
        finite = np.isfinite(y)
        pos = pos[finite].astype(np.float32) if finite.any() else np.zeros((2, 2), np.float32)
        if len(pos) < 2:
            pos = np.concatenate([pos, pos])
        colour = (*METRIC_COLOURS[1], 1.0)
        line = self._visual(
            "line",
            lambda: scene.visuals.Line(pos, color=colour, width=2.0, method="gl", parent=self.view.scene),
        )
        line.set_data(pos=pos, color=colour)
        self.picture_extra = None
        self.set_range(fixed_limits([-0.5, len(y) - 0.5], 0.0), fixed_limits(y))

    def subtitle(self, data: dict[str, np.ndarray]) -> str:
        parts = [self.picture_caption, scalars_caption(self.layout.scalars)]
        if self.layout.misfits:
            parts.append(f"{', '.join(self.layout.misfits)}: drawn by shape (its view does not fit it)")
        return "".join(f"  ·  {p}" for p in parts if p)

    def readout(self, x: float, y: float) -> str | None:
        picture = self.layout.picture
        if picture is None:
            return super().readout(x, y)
        key, view = picture
        return picture_readout(view, np.asarray(self.data[key]), x, y, self.picture_extra)


PANELS = {
    "grid": MapPanel,
    "curve": CurvePanel,
    "prediction": PredictionPanel,
    "loss": LossPanel,
    "stats": StatsPanel,
    "neurons": NeuronsPanel,
    "checkpoint": CheckpointPanel,
    "histograms": HistogramsPanel,
}


def panel_class(kind: str):
    """The panel of a probe kind: a built-in kind's own, any other kind's a FramePanel."""
    return PANELS.get(kind, FramePanel)
