"""GridProbe: the class-probability map of a model over a dense 2-D grid of its input space."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from probescope.kernels import GridSpec, default_palette, ema_frames, fused_path, grid_mlp, probs_to_rgba
from probescope.kernels.colormap import MODES, check_value_range
from probescope.kernels.mlp import FusableMLP, NotFusableError
from probescope.probes.base import (
    Probe,
    ProbeContext,
    all_finite,
    as_float_tensor,
    attached_palette,
    check_forward,
    check_name_count,
    check_names,
    check_output,
    checked_palette,
    display_name,
    eval_mode,
    model_device_dtype,
)
from probescope.schedule import Schedule
from probescope.validation import positive_int


class GridProbe(Probe):
    """Class-probability map over a 2-D rectangle of input space, coloured by ``mode``
    (``region``, ``boundary``, ``prob``, ``blend``: see ``probescope.kernels.colormap``); or,
    ``mode="value"``, a regression's output as a heat map.

    Pixel (r, c) of every frame is the model at input
    ``origin + us[c] * axis_u + vs[r] * axis_v``; row 0 is the top of the picture, so
    ``vs`` decreases down the rows. For 2-feature inputs the plane is the input space itself
    (origin 0, unit axes); for wider inputs it passes through three given samples
    (``plane=(a, b, c)``) or through the data's mean along its two principal directions
    (``plane="pca"``, the default).

    An MLP (Linear layers, activations, eval-mode batch norms) is evaluated by the fused
    ``grid_mlp`` kernel (Numba on CPU, Triton on CUDA): the grid's points and hidden
    activations never exist in memory. Any other model
    runs its own forward on the grid in chunks of ``batch_size``. ``smoothing`` (an EMA weight
    in (0, 1]) blends each map with the previous ones so that a live view does not flicker (a
    NaN frame shows, and the blend starts again from the next frame: see ``ema_frames``).

    ``hyperplanes=True`` adds each first-layer unit's zero line on the plane to every frame
    (``hyperplanes``: rows ``(A, B, C)`` of ``A u + B v + C = 0``, see ``first_layer_lines``),
    which the viewer and the figures draw over the map.

    ``class_names`` (one per class, or per output in ``value`` mode) name them in legends
    and readouts, in place of their indices; ``palette`` colours the classes (colours, one
    per class, or a matplotlib colormap's name: see ``probescope.kernels.resolve_palette``).

    ``mode="value"`` colours output ``class_index`` (default 0) of a regression model, as it
    is, through the blue-white-red ramp over ``value_range=(lo, hi)``, the same range at every
    frame: by default the range of ``labels``, which are then the targets (floats; NaN for
    unknown), widened to be symmetric about 0 (white) when they have both signs. The data
    points are drawn in the colour of their target, so a point that stands out from the map
    around it is one the model is off on.
    """

    kind = "grid"
    default_schedule = Schedule.every(10)

    def __init__(
        self,
        data,
        labels=None,
        *,
        domain: tuple[float, float, float, float] | None = None,
        margin: float = 0.1,
        resolution: int | tuple[int, int] = 256,
        spacing: float | None = None,
        mode: str = "region",
        class_index: int | None = None,
        value_range: tuple[float, float] | None = None,
        class_names=None,
        palette=None,
        output: str = "auto",
        plane: str | tuple | None = None,
        points: bool = True,
        point_sparsity: int = 1,
        hyperplanes: bool = False,
        batch_size: int = 65536,
        smoothing: float | None = None,
        name: str | None = None,
        schedule: Schedule | None = None,
    ):
        super().__init__(name=name, schedule=schedule)
        owner = f"GridProbe {self.name!r}"
        if mode not in MODES:
            raise ValueError(f"{owner}: mode must be one of {MODES}, got {mode!r}")
        check_output(owner, output)
        if mode == "value" and output not in ("auto", "probs"):
            raise ValueError(
                f"{owner}: mode='value' colours the model's outputs as they are; output={output!r} "
                "is for probabilities (mode='prob' colours one class's)"
            )
        if value_range is not None and mode != "value":
            raise ValueError(f"{owner}: value_range is for mode='value', not mode={mode!r}")
        self.class_names = check_names(owner, class_names)
        self.requested_palette = checked_palette(owner, palette)
        if class_index is None:
            class_index = 1 if mode == "prob" else 0  # a binary model's positive class; the first output
        width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
        positive_int(f"{owner}: resolution width", width)
        positive_int(f"{owner}: resolution height", height)
        positive_int(f"{owner}: point_sparsity", point_sparsity)
        positive_int(f"{owner}: batch_size", batch_size)
        if smoothing is not None and not 0 < smoothing <= 1:
            raise ValueError(f"{owner}: smoothing must be an EMA weight in (0, 1] or None, got {smoothing!r}")
        if not isinstance(hyperplanes, bool):
            raise ValueError(f"{owner}: hyperplanes must be True or False, got {hyperplanes!r}")
        plane_grid = PlaneGrid.fit(owner, data, plane, domain, margin, width, height, spacing)
        width, height = plane_grid.grid.width, plane_grid.grid.height
        self.labels = None
        if labels is not None:
            y = torch.as_tensor(np.asarray(labels, dtype=np.float64 if mode == "value" else None)).reshape(-1)
            if y.shape[0] != len(plane_grid.uv):
                raise ValueError(f"{owner}: {y.shape[0]} labels for {len(plane_grid.uv)} data points")
            self.labels = y.float() if mode == "value" else y.long()
        self.value_range = _value_range(owner, value_range, self.labels) if mode == "value" else None
        self.origin, self.axis_u, self.axis_v = plane_grid.origin, plane_grid.axis_u, plane_grid.axis_v
        self.domain, self.grid, uv = plane_grid.domain, plane_grid.grid, plane_grid.uv
        self.width, self.height = width, height
        self.us = self.grid.us().float()
        self.vs = self.grid.vs().float()
        self.smoothing = smoothing
        self._ema_state: torch.Tensor | None = None
        self._channels = 0  # the frame's probabilities per pixel (set by attach)
        self.path = "not attached"
        self.mode, self.class_index, self.output = mode, class_index, output
        self.points, self.point_sparsity, self.batch_size = points, point_sparsity, batch_size
        self.hyperplanes = hyperplanes
        self.data_uv = uv
        self.num_classes: int | None = None
        self.palette: torch.Tensor | None = None

    def warm_up(self, model: nn.Module) -> None:
        for _ in range(2):  # an eager frame, then the capture (the EMA state stays the frame's)
            self._graphed_frame(model)

    def attach(self, model: nn.Module) -> None:
        owner = f"GridProbe {self.name!r}"
        sample = self.grid.points()[:2]  # one point on a one-pixel grid
        out = check_forward(owner, model, sample)
        if out.dim() != 2 or out.shape[0] != len(sample):
            raise ValueError(
                f"{owner}: the model must map (N, d) inputs to (N, K) outputs, "
                f"got {tuple(out.shape)} for a batch of {len(sample)}"
            )
        k = out.shape[1]
        check_output(owner, self.output, k)
        binary = self.mode != "value" and (self.output == "sigmoid" or (self.output == "auto" and k == 1))
        self.num_classes = 2 if binary else k
        check_name_count(
            owner, self.class_names, self.num_classes, "outputs" if self.mode == "value" else "classes"
        )
        if self.mode in ("prob", "value") and not 0 <= self.class_index < self.num_classes:
            what = "outputs" if self.mode == "value" else "classes"
            raise ValueError(
                f"{owner}: class_index {self.class_index} is out of range for {self.num_classes} {what}"
            )
        self.palette = attached_palette(owner, self.requested_palette, self.num_classes)
        if self.hyperplanes:
            try:
                FusableMLP.from_module(model)
            except NotFusableError as err:
                raise ValueError(
                    f"{owner}: hyperplanes are the first Linear layer's units, of a model the grid "
                    f"kernel reads as an MLP; this one is not ({err})"
                ) from None
        # In eval mode, as frames see the model: the path they take, and no dropout draw or
        # batch norm update on the live model.
        with eval_mode(model), torch.no_grad():
            self.path = fused_path(model)
            # Compile the kernels now, before training, on a 2 x 2 grid of the same model.
            tiny = GridSpec.on_plane(self.origin, self.axis_u, self.axis_v, self.domain, 2, 2)
            probs = grid_mlp(model, tiny, self._kernel_output(), batch_size=self.batch_size)
            self._colour(probs.float())
        self._channels = probs.shape[-1]

    def frame_nbytes(self) -> int | None:
        """Its probabilities (float32 per class) and colours (RGBA) of every pixel."""
        return self.width * self.height * (4 * self._channels + 4)

    def _kernel_output(self) -> str:
        return "raw" if self.output == "probs" or self.mode == "value" else self.output

    def _colour(self, probs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return probs_to_rgba(
            probs, self.mode, self.palette, self.class_index, out=out, value_range=self.value_range
        )

    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        # Everything stays on the model's device (on CUDA: the probe stream) until the ring
        # copies the frame out; the colour mapping runs there too. With CUDA graphs on, the
        # whole frame is one replay per shadow model.
        if self.graphs is None:  # written straight into the ring's slot
            probs, rgba, finite = self._frame(model, context.buffer)
        else:  # into the graph's own outputs, which the ring copies
            probs, rgba, finite = self._graphed_frame(model)
        if not bool(finite):  # on CUDA, waits for the probe stream only
            self.warn_once(
                "nonfinite",
                f"non-finite model outputs at step {context.step}; those pixels are drawn "
                "in magenta (RGBA 255, 0, 255). Training goes on.",
            )
        frame = {"probs": probs, "rgba": rgba}
        if self.hyperplanes:
            frame["hyperplanes"] = first_layer_lines(model, self.origin, self.axis_u, self.axis_v)
        return frame

    def _graphed_frame(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device, _ = model_device_dtype(model)
        return self.graphs.run(("frame", id(model)), device, lambda: self._frame(model))

    def _frame(self, model: nn.Module, buffer=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probabilities, colours and whether every probability is finite (a device scalar):
        the same kernels on the same tensors at every call, so CUDA graphs can capture it.
        ``buffer`` (``ProbeContext.buffer``) gives the storage the kernels write the frame
        into: the ring's slot in a Monitor."""
        size, device = (self.height, self.width), model_device_dtype(model)[0]
        out = None
        if buffer is not None and self.smoothing is None:  # (smoothed: the average is the frame)
            out = buffer("probs", (*size, self._channels), torch.float32, device)
        probs = grid_mlp(model, self.grid, self._kernel_output(), out=out, batch_size=self.batch_size)
        if self.smoothing is not None:
            if (
                self._ema_state is None
                or self._ema_state.shape != probs.shape
                or self._ema_state.device != probs.device
            ):
                self._ema_state = probs.clone()
            probs = ema_frames(probs[None], self.smoothing, state=self._ema_state)[0]
        finite = all_finite(probs)
        out = None if buffer is None else buffer("rgba", (*size, 4), torch.uint8, device)
        return probs, self._colour(probs, out), finite

    def static(self) -> dict[str, np.ndarray]:
        keep = slice(None, None, self.point_sparsity)
        arrays = {
            "us": self.us.numpy(),
            "vs": self.vs.numpy(),
            "origin": self.origin.numpy(),
            "axis_u": self.axis_u.numpy(),
            "axis_v": self.axis_v.numpy(),
            "palette": self.palette.numpy() if self.palette is not None else np.zeros((0, 3), np.uint8),
        }
        if self.points:
            arrays["points_uv"] = self.data_uv[keep].numpy()
            if self.labels is not None:
                key = "points_value" if self.mode == "value" else "points_label"
                arrays[key] = self.labels[keep].numpy()
        return arrays

    def config(self) -> dict[str, Any]:
        return {
            "domain": list(self.domain),
            "resolution": [self.width, self.height],
            "mode": self.mode,
            "class_index": self.class_index,
            "value_range": None if self.value_range is None else list(self.value_range),
            "class_names": None if self.class_names is None else list(self.class_names),
            "output": self.output,
            "num_classes": self.num_classes,
            "points": self.points,
            "point_sparsity": self.point_sparsity,
            "hyperplanes": self.hyperplanes,
            "input_dim": int(self.origin.shape[0]),
            "smoothing": self.smoothing,
            "path": self.path,
        }


@dataclass(frozen=True)
class PlaneGrid:
    """A ``width`` x ``height`` grid on a plane through input space, fitted to data: the plane
    (origin and two orthonormal axes), the data projected onto it (``uv``) and the rectangle
    it covers (``domain``: the data's extent plus ``margin`` of it on each side, unless given)."""

    origin: torch.Tensor
    axis_u: torch.Tensor
    axis_v: torch.Tensor
    uv: torch.Tensor
    domain: tuple[float, float, float, float]
    grid: GridSpec

    @classmethod
    def fit(
        cls,
        owner: str,
        data,
        plane,
        domain,
        margin: float,
        width: int,
        height: int,
        spacing: float | None = None,
    ) -> PlaneGrid:
        """The grid for ``data`` (N, d >= 2); errors name ``owner``. With ``spacing`` (the
        distance between neighbouring pixels, in input units) the size follows from the domain:
        pixels ``spacing`` wide from ``u0`` (``v0``), as many as cover it, the domain extended to
        their edge."""
        x = as_float_tensor("data", data, ndim=(2,), owner=owner)
        if x.shape[1] < 2:
            raise ValueError(f"{owner}: data must have at least 2 features, got {x.shape[1]}")
        if not margin >= 0:
            raise ValueError(f"{owner}: margin must be >= 0, got {margin!r}")
        origin, axis_u, axis_v = _plane(owner, x, plane)
        uv = _project(x, origin, axis_u, axis_v)
        if domain is None:
            lo, hi = uv.min(dim=0).values, uv.max(dim=0).values
            pad = (hi - lo) * margin
            domain = (
                float(lo[0] - pad[0]),
                float(hi[0] + pad[0]),
                float(lo[1] - pad[1]),
                float(hi[1] + pad[1]),
            )
        if len(domain) != 4 or not all(np.isfinite(domain)):
            raise ValueError(f"{owner}: domain must be 4 finite numbers (u0, u1, v0, v1), got {domain!r}")
        u0, u1, v0, v1 = (float(d) for d in domain)
        if not (u1 > u0 and v1 > v0):
            raise ValueError(
                f"{owner}: the domain {domain!r} has zero area; it needs u1 > u0 and v1 > v0 "
                "(all data on one line? pass domain= explicitly)"
            )
        if spacing is not None:
            width = _points_per_axis(owner, u1 - u0, spacing)
            height = _points_per_axis(owner, v1 - v0, spacing)
            u1, v1 = u0 + width * spacing, v0 + height * spacing
        domain = (u0, u1, v0, v1)
        grid = GridSpec.on_plane(origin, axis_u, axis_v, domain, width, height)
        return cls(origin, axis_u, axis_v, uv, domain, grid)


MAX_POINTS_PER_AXIS = 8192


def first_layer_lines(model: nn.Module, origin, axis_u, axis_v) -> torch.Tensor:
    """Where each unit of the model's first Linear layer is zero on the plane
    ``origin + u * axis_u + v * axis_v``: (units, 3) rows ``(A, B, C)`` of the line
    ``A u + B v + C = 0`` (a ReLU unit's kink; a batch norm right after the layer folded in), on
    the model's device."""
    mlp = FusableMLP.from_module(model)
    weight, bias = mlp.weights[0], mlp.biases[0]
    plane = torch.stack([axis_u, axis_v, origin], dim=1).to(weight.device, torch.float32)
    lines = weight.float() @ plane
    if bias is not None:
        lines[:, 2] += bias.float()
    return lines


def line_segments(lines: np.ndarray, domain) -> np.ndarray:
    """(k, 2, 2): the two ends of each line ``A u + B v + C = 0`` (rows of ``lines``) inside
    the rectangle ``domain = (u0, u1, v0, v1)``; NaN for a line that misses it (or only touches
    a corner)."""
    u0, u1, v0, v1 = (float(d) for d in domain)
    a, b, c = (np.asarray(lines, np.float64)[:, i, None] for i in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):  # a line parallel to an edge meets it nowhere
        left, right, bottom, top = (np.full_like(a, edge) for edge in (u0, u1, v0, v1))
        us = np.concatenate([left, right, -(b * bottom + c) / a, -(b * top + c) / a], 1)
        vs = np.concatenate([-(a * left + c) / b, -(a * right + c) / b, bottom, top], 1)
    slack = 1e-9 * max(u1 - u0, v1 - v0)
    inside = (
        np.isfinite(us) & np.isfinite(vs)
        & (us >= u0 - slack) & (us <= u1 + slack) & (vs >= v0 - slack) & (vs <= v1 + slack)
    )  # fmt: skip
    points = np.where(inside[..., None], np.stack([us, vs], -1), 0.0)  # (k, 4 edges, 2)
    gaps = np.linalg.norm(points[:, :, None] - points[:, None, :], axis=-1)
    gaps = np.where(inside[:, :, None] & inside[:, None, :], gaps, -1.0)
    best = gaps.reshape(len(points), -1).argmax(1)
    first, second = np.divmod(best, 4)
    rows = np.arange(len(points))
    ends = np.stack([points[rows, first], points[rows, second]], 1)
    ends[gaps.reshape(len(points), -1)[rows, best] <= 0] = np.nan
    return ends


def _value_range(owner: str, value_range, targets: torch.Tensor | None) -> tuple[float, float]:
    """The range ``mode="value"`` colours over: the one given, else the targets' own."""
    if value_range is not None:
        try:
            return check_value_range(value_range)
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None
    known = None if targets is None else targets[torch.isfinite(targets)]
    if known is None or known.numel() == 0 or float(known.min()) == float(known.max()):
        got = "no labels" if targets is None else "targets that span no range"
        raise ValueError(
            f"{owner}: mode='value' colours over value_range=(lo, hi), by default the targets' "
            f"(labels=) range; got {got}: pass value_range="
        )
    lo, hi = float(known.min()), float(known.max())
    if lo < 0 < hi:  # signed targets: white at 0
        lo, hi = -max(-lo, hi), max(-lo, hi)
    return lo, hi


def _points_per_axis(owner: str, extent: float, spacing: float) -> int:
    """How many pixels ``spacing`` wide cover ``extent``."""
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"{owner}: spacing must be a positive distance, got {spacing!r}")
    count = math.ceil(extent / spacing * (1 - 1e-12))
    if count > MAX_POINTS_PER_AXIS:
        raise ValueError(
            f"{owner}: spacing {spacing!r} puts {count} points on an axis of length {extent:.6g}; "
            f"at most {MAX_POINTS_PER_AXIS} (a larger spacing, or resolution=)"
        )
    return max(count, 1)


def _plane(owner: str, x: torch.Tensor, plane) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Origin and two orthonormal axes of the plane the grid lies on."""
    d = x.shape[1]
    if plane is None:
        if d == 2:
            return torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        plane = "pca"
    if isinstance(plane, str):
        if plane != "pca":
            raise ValueError(f"{owner}: plane must be None, 'pca' or three samples, got {plane!r}")
        if x.shape[0] < 3:
            raise ValueError(f"{owner}: plane='pca' needs at least 3 data points, got {x.shape[0]}")
        mean = x.mean(dim=0)
        _, s, vh = torch.linalg.svd((x - mean).double(), full_matrices=False)
        if s.shape[0] < 2 or s[1] <= 1e-12 * max(float(s[0]), 1.0):
            raise ValueError(f"{owner}: the data spans fewer than two directions; no PCA plane")
        return mean, vh[0].float(), vh[1].float()
    try:
        a, b, c = (as_float_tensor("plane point", p, ndim=(1,), owner=owner) for p in plane)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: plane must be three samples of width {d}: {err}") from None
    for p in (a, b, c):
        if p.shape[0] != d:
            raise ValueError(f"{owner}: plane samples have width {p.shape[0]}, data has {d}")
    e1 = (b - a).double()
    if e1.norm() == 0:
        raise ValueError(f"{owner}: the plane's first two samples coincide")
    e1 = e1 / e1.norm()
    e2 = (c - a).double()
    e2 = e2 - (e2 @ e1) * e1
    if e2.norm() <= 1e-9 * max(float((c - a).norm()), 1.0):
        raise ValueError(f"{owner}: the three plane samples are collinear")
    return a, e1.float(), (e2 / e2.norm()).float()


def _project(x: torch.Tensor, origin, axis_u, axis_v) -> torch.Tensor:
    rel = x - origin
    return torch.stack([rel @ axis_u, rel @ axis_v], dim=1)


# Drawing a map's data points and its key, shared by the live viewer and the exported figures.

POINT_UNKNOWN = (255, 255, 255)  # a point with no label (or an unknown target)


def point_colours(config: dict[str, Any], static: dict[str, np.ndarray]) -> np.ndarray | None:
    """``(N, 3)`` uint8 colours of a map's data points: their class's, or in ``value`` mode
    their target's on the map's ramp (an unknown target: white); None when they have none."""
    if config.get("mode") == "value" and "points_value" in static:
        targets = torch.from_numpy(np.asarray(static["points_value"], np.float32))[:, None]
        colours = probs_to_rgba(targets, "value", torch.zeros(1, 3, dtype=torch.uint8), 0,
                                value_range=tuple(config["value_range"]))[:, :3].numpy()  # fmt: skip
        colours[~np.isfinite(targets[:, 0].numpy())] = POINT_UNKNOWN
        return colours
    labels = static.get("points_label")
    if labels is None:
        return None
    palette = np.asarray(static["palette"]) if len(static.get("palette", ())) else default_palette(2).numpy()
    return palette[np.asarray(labels, np.int64) % len(palette)]


def ramp_ends(config: dict[str, Any]) -> tuple[str, str, str, str] | None:
    """In a ``prob`` or ``value`` map, what the ramp shows and what its blue, white and red
    stand for; None for the other modes."""
    index = config.get("class_index", 1)
    if config.get("mode") == "prob":
        return f"P({display_name(config, index)})", "0", "0.5", "1"
    if config.get("mode") == "value":
        lo, hi = config["value_range"]
        return display_name(config, index, "output"), f"{lo:.3g}", f"{(lo + hi) / 2:.3g}", f"{hi:.3g}"
    return None
