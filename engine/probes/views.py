"""How the viewer and the exporters draw the frames of a probe of the user's own kind.

A built-in probe has a panel of its own; a probe of another kind is drawn from what its
frames hold: one entry as the panel's picture (an image, a heat map, a mosaic of maps, a
histogram or a line), chosen by its shape or by the probe's ``views``, and every number as a
series over steps (the picture when the frame holds nothing else) and in the caption.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from probescope.kernels.colormap import check_value_range

#: What an entry can be drawn as.
VIEWS = ("image", "heatmap", "maps", "histogram", "line", "series", "hidden")
#: The pictures (a panel draws one of them); a ``series`` is drawn over steps.
PICTURES = ("image", "heatmap", "maps", "histogram", "line")
#: The views coloured over a range, which ``(view, lo, hi)`` fixes for the run.
RANGED = ("heatmap", "maps")
BINS = 30  # a histogram's bins, over the finite values' range


def check_views(owner: str, views) -> dict:
    """``views`` (entry -> one of VIEWS, or ``("heatmap", lo, hi)`` / ``("maps", lo, hi)``:
    coloured over a range fixed for the run) as a JSON-ready dict, or a ValueError that says
    what is wrong."""
    if views is None:
        return {}
    if not isinstance(views, Mapping):
        raise ValueError(f"{owner}: views must map frame entries to {VIEWS}, got {type(views).__name__}")
    checked = {}
    for key, view in views.items():
        if not isinstance(key, str):
            raise ValueError(f"{owner}: views must name frame entries by string, got {key!r}")
        if isinstance(view, (tuple, list)) and len(view) == 3 and view[0] in RANGED:
            try:
                checked[key] = [view[0], *check_value_range(view[1:])]
            except ValueError as err:
                raise ValueError(f"{owner}: views[{key!r}]: a {view[0]} view's {err}") from None
        elif isinstance(view, str) and view in VIEWS:
            checked[key] = view
        else:
            raise ValueError(
                f"{owner}: views[{key!r}] must be one of {VIEWS} or (view, lo, hi) for one of "
                f"{RANGED}, got {view!r}"
            )
    return checked


def view_name(view) -> str:
    """The view of a checked ``views`` entry (``["heatmap", lo, hi]`` is a heat map)."""
    return view if isinstance(view, str) else view[0]


def fixed_range(views: Mapping | None, key: str) -> tuple[float, float] | None:
    """The range ``views`` fixes for the colours of ``key``, or None (each frame's own)."""
    view = (views or {}).get(key)
    return None if view is None or isinstance(view, str) else (float(view[1]), float(view[2]))


def views_config(probe) -> dict:
    """What the run's metadata records of a probe's ``views`` (nothing when it has none)."""
    views = check_views(type(probe).__name__, getattr(probe, "views", None))
    return {"views": views} if views else {}


def is_own_kind(kind: str) -> bool:
    """Whether ``kind`` is not one of probescope's own probes (whose panels draw themselves)."""
    from probescope.probes import BUILT_IN_KINDS

    return kind not in BUILT_IN_KINDS


def default_view(value: np.ndarray) -> str:
    """How an entry is drawn when the probe does not say: by its shape."""
    if value.dtype.kind not in "biuf" or value.size == 0:
        return "hidden"
    if value.size == 1 and value.ndim <= 1:
        return "series"
    if value.ndim == 3 and value.shape[2] in (3, 4) and value.dtype == np.uint8:
        return "image"
    return {1: "histogram", 2: "heatmap", 3: "maps"}.get(value.ndim, "hidden")


def fits(view: str, value: np.ndarray) -> bool:
    """Whether ``value`` can be drawn as ``view``."""
    if view == "hidden":
        return True
    if value.dtype.kind not in "biuf" or value.size == 0:
        return False
    return {
        "image": value.ndim == 3 and value.shape[2] in (3, 4),
        "heatmap": value.ndim == 2,
        "maps": value.ndim == 3,
        "histogram": True,
        "line": value.ndim == 1,
        "series": value.size == 1,
    }[view]


@dataclass
class Layout:
    """What a frame holds to draw: its ``pictures`` (entry, view) in frame order, of which a
    panel draws the first (``picture``), the numbers as ``scalars``, and the entries whose
    declared view their value does not fit (``misfits``, drawn by their shape instead)."""

    pictures: list[tuple[str, str]] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)
    misfits: list[str] = field(default_factory=list)

    @property
    def picture(self) -> tuple[str, str] | None:
        return self.pictures[0] if self.pictures else None


def frame_layout(data: Mapping, views: Mapping[str, str] | None = None) -> Layout:
    """The layout of one frame: its entries drawn as pictures, and its numbers."""
    views = views or {}
    layout = Layout()
    for key, value in data.items():
        value = np.asarray(value)
        view = views.get(key)
        view = None if view is None else view_name(view)
        if view is not None and not fits(view, value):
            layout.misfits.append(key)
            view = None
        view = view or default_view(value)
        if view == "series":
            layout.scalars[key] = float(value.reshape(-1)[0])
        elif view != "hidden":
            layout.pictures.append((key, view))
    return layout


class Numbers:
    """The numbers of the frames drawn so far, each by step; a frame of an earlier step than the
    last starts them over (a replay went back)."""

    def __init__(self):
        self.by_step: dict[str, dict[float, float]] = {}
        self.last: float | None = None

    def add(self, step: float, scalars: Mapping[str, float]) -> None:
        if self.last is not None and step < self.last:
            self.by_step.clear()
        self.last = step
        for key, value in scalars.items():
            self.by_step.setdefault(key, {})[float(step)] = value

    def names(self) -> list[str]:
        return list(self.by_step)

    def series(self):
        """(name, steps, values) of each number, in step order."""
        for key, values in self.by_step.items():
            steps = np.array(sorted(values), np.float64)
            yield key, steps, np.array([values[s] for s in steps], np.float64)


MAGENTA = np.array([255, 0, 255, 255], np.uint8)  # non-finite, as the maps draw it


def image_rgba(value: np.ndarray) -> np.ndarray:
    """An (H, W, 3|4) image as (H, W, 4) uint8: uint8 as it is, other numbers read as 0-1
    (clipped), a pixel with a non-finite channel magenta."""
    value = np.asarray(value)
    height, width, channels = value.shape
    if value.dtype == np.uint8:
        rgb = value[..., :3]
        alpha = value[..., 3] if channels == 4 else np.full((height, width), 255, np.uint8)
        return np.ascontiguousarray(np.concatenate([rgb, alpha[..., None]], axis=2))
    as_float = value.astype(np.float64)
    finite = np.isfinite(as_float).all(axis=2)
    scaled = np.round(np.clip(np.nan_to_num(as_float), 0.0, 1.0) * 255.0).astype(np.uint8)
    rgba = np.full((height, width, 4), 255, np.uint8)
    rgba[..., :channels] = scaled
    rgba[~finite] = MAGENTA
    return rgba


def heatmap_range(value: np.ndarray) -> tuple[float, float]:
    """The ramp's ends for a heat map: symmetric about 0 (white) when its finite values have
    both signs, else their range (widened to a unit when they are all one number)."""
    finite = np.asarray(value, np.float64)[np.isfinite(value)]
    if not finite.size:
        return -1.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if lo < 0 < hi:
        reach = max(-lo, hi)
        return -reach, reach
    if lo == hi:
        return lo - 0.5, hi + 0.5
    return lo, hi


def heatmap_rgba(
    value: np.ndarray, value_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """A 2-D array through the maps' blue-white-red ramp over ``value_range`` (values beyond
    it take its ends), by default ``heatmap_range`` of the frame; non-finite values magenta.
    Returns (H, W, 4) uint8 and the range."""
    from probescope.kernels import probs_to_rgba

    value_range = heatmap_range(value) if value_range is None else value_range
    values = torch.from_numpy(np.ascontiguousarray(value, np.float32))[..., None]
    rgba = probs_to_rgba(values, "value", torch.zeros(1, 3), 0, value_range=value_range)
    return rgba.numpy(), value_range


def picture_rgba(
    key: str, view: str, value: np.ndarray, views: Mapping | None = None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """An image, heat map or maps entry as (H, W, 4) uint8, and the range of its colours (None
    for an image): what the viewer, the figures and TensorBoard show alike."""
    if view == "image":
        return image_rgba(value), None
    if view == "maps":
        return maps_rgba(value, fixed_range(views, key))
    return heatmap_rgba(value, fixed_range(views, key))


def maps_rgba(
    value: np.ndarray, value_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """``(N, H, W)`` maps (attention heads, feature maps) as one mosaic of heat maps, ``N``
    coloured over one range (``value_range``, or ``heatmap_range`` of all of them), laid out
    ``mosaic_columns(N)`` a row with white between: (rows, columns) of tiles as NeuronProbe's."""
    from probescope.probes.neurons import tile_mosaic

    n, h, w = value.shape
    rgba, value_range = heatmap_rgba(np.asarray(value).reshape(n * h, w), value_range)
    mosaic = tile_mosaic(torch.from_numpy(rgba.reshape(n, h, w, 4)), mosaic_columns(n))
    return mosaic.numpy(), value_range


def mosaic_columns(n: int) -> int:
    """Maps a row in a mosaic of ``n``: as square as it gets."""
    return math.ceil(math.sqrt(n))


def histogram(value: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, int]:
    """Counts and edges of the finite values (``bins`` bins over their range; one value's bins
    centred on it) and how many values are not finite."""
    flat = np.asarray(value, np.float64).reshape(-1)
    finite = flat[np.isfinite(flat)]
    if not finite.size:
        return np.zeros(bins, np.int64), np.linspace(0.0, 1.0, bins + 1), int(flat.size)
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
    return counts, edges, int(flat.size - finite.size)


def picture_axes(key: str, view: str) -> tuple[str, str]:
    """The x and y axis labels of a picture."""
    return {
        "image": ("column", "row"),
        "heatmap": ("column", "row"),
        "maps": ("maps", "maps"),
        "histogram": (key, "count"),
        "line": ("index", key),
    }[view]


def picture_caption(key: str, view: str, value: np.ndarray, extra: tuple[float, float] | int | None) -> str:
    """What the caption says of the picture: the entry, its shape, and its range, or how many
    values are not finite."""
    shape = "x".join(str(n) for n in value.shape)
    text = f"{key} ({shape})"
    if view in RANGED and extra is not None:
        lo, hi = extra
        text += f": blue {lo:.3g}, white {(lo + hi) / 2:.3g}, red {hi:.3g}"
    elif view == "histogram" and extra:
        text += f": {extra} not finite"
    return text


def scalars_caption(scalars: Mapping[str, float], limit: int = 4) -> str:
    """The frame's numbers in words (the first ``limit``, then how many more)."""
    parts = [f"{key} {value:.4g}" for key, value in list(scalars.items())[:limit]]
    if len(scalars) > limit:
        parts.append(f"+{len(scalars) - limit} more")
    return ", ".join(parts)


def picture_readout(view: str, value: np.ndarray, x: float, y: float, extra=None) -> str | None:
    """The picture's value at data point (x, y), in words (None outside it). Images, heat
    maps and mosaics put pixel (r, c) at x = c + 0.5, y = H - r - 0.5 (row 0 on top); a
    histogram's bars span their edges (``extra``: the edges); a line's point i is at x = i."""
    if view == "maps":
        return _maps_readout(value, x, y)
    if view in ("image", "heatmap"):
        height, width = value.shape[:2]
        c, r = int(np.floor(x)), int(np.floor(height - y))
        if not (0 <= r < height and 0 <= c < width):
            return None
        pixel = value[r, c]
        shown = (
            f"{float(pixel):.4g}" if view == "heatmap" else "(" + ", ".join(f"{v:.3g}" for v in pixel) + ")"
        )
        return f"row {r}, column {c}: {shown}"
    if view == "histogram":
        counts, edges = extra
        i = int(np.searchsorted(edges, x, side="right")) - 1
        if x == edges[-1]:  # the last bin holds its right edge (numpy's histogram)
            i = len(counts) - 1
        if not 0 <= i < len(counts):
            return None
        close = "]" if i == len(counts) - 1 else ")"
        return f"[{edges[i]:.4g}, {edges[i + 1]:.4g}{close}: {int(counts[i])}"
    if view == "line":
        i = round(float(x))
        return f"index {i}: {float(value[i]):.4g}" if 0 <= i < len(value) else None
    return None


def _maps_readout(value: np.ndarray, x: float, y: float) -> str | None:
    """The map, row and column under (x, y) of a mosaic of ``value`` (N, H, W), and its value."""
    from probescope.probes.neurons import GAP

    n, h, w = value.shape
    columns = mosaic_columns(n)
    height = math.ceil(n / columns) * (h + GAP) - GAP
    tile_row, r = divmod(int(np.floor(height - y)), h + GAP)
    tile_col, c = divmod(int(np.floor(x)), w + GAP)
    index = tile_row * columns + tile_col
    if min(tile_row, tile_col) < 0 or r >= h or c >= w or tile_col >= columns or index >= n:
        return None
    return f"map {index}, row {r}, column {c}: {float(value[index, r, c]):.4g}"
