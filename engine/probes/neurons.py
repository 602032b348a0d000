"""NeuronProbe: what each unit of one layer computes over a 2-D grid of the input space.

After TF Playground's node maps: every unit gets a small map of its output over the same
plane as GridProbe's, blue where it is negative, white at zero, red where positive, the maps
laid out as one mosaic picture. The scale is shared by every unit of a frame (the largest
|output| among them, or a fixed ``scale``), so a unit that barely responds looks pale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from probescope.kernels import probs_to_rgba
from probescope.probes.base import (
    ForwardHooks,
    Probe,
    ProbeContext,
    all_finite,
    check_forward,
    model_device_dtype,
    named_layers,
    to_model,
)
from probescope.probes.grid import PlaneGrid
from probescope.schedule import Schedule
from probescope.validation import positive_int

GAP = 2  # white pixels between the maps of a mosaic
WHITE = 255


class NeuronProbe(Probe):
    """One map per unit of ``layer`` over a grid (a name from ``model.named_modules()``, or a
    Keras layer name).

    ``units``: how many of the layer's output features to show (the first ones), or which
    (a list of indices); a layer with more than one output dimension (a convolution) is
    flattened per sample. The grid: as GridProbe's (``domain``, ``margin``, ``plane`` for
    inputs wider than 2), at ``resolution`` per map. ``scale``: the |output| drawn at full
    colour (default: per frame, the largest among the shown units). Frames hold ``rgba`` (the
    mosaic, ``columns`` maps a row), ``activations`` (units, H, W) and ``scale``.
    """

    kind = "neurons"
    default_schedule = Schedule.every(10)

    def __init__(
        self,
        data,
        layer: str,
        *,
        units: int | Sequence[int] = 16,
        domain: tuple[float, float, float, float] | None = None,
        margin: float = 0.1,
        resolution: int = 48,
        plane: str | tuple | None = None,
        columns: int | None = None,
        scale: float | None = None,
        batch_size: int = 65536,
        name: str | None = None,
        schedule: Schedule | None = None,
    ):
        super().__init__(name=name, schedule=schedule)
        owner = f"NeuronProbe {self.name!r}"
        if not isinstance(layer, str):
            swapped = " (the data come first: NeuronProbe(data, layer))" if isinstance(data, str) else ""
            raise TypeError(f"{owner}: layer must be a module name, got {type(layer).__name__}{swapped}")
        positive_int(f"{owner}: resolution", resolution)
        positive_int(f"{owner}: batch_size", batch_size)
        if columns is not None:
            positive_int(f"{owner}: columns", columns)
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"{owner}: scale must be a positive number or None, got {scale!r}")
        if isinstance(units, int) and not isinstance(units, bool):
            positive_int(f"{owner}: units", units)
            self._first, self.units = units, None
        else:
            chosen = list(units)
            if not chosen or not all(isinstance(u, int) and u >= 0 for u in chosen):
                raise ValueError(f"{owner}: units must be a count or a list of output indices, got {units!r}")
            self._first, self.units = None, chosen
        plane_grid = PlaneGrid.fit(owner, data, plane, domain, margin, resolution, resolution)
        self.domain, self.grid = plane_grid.domain, plane_grid.grid
        self.layer, self.resolution, self.batch_size = layer, resolution, batch_size
        self.columns, self.scale = columns, scale
        self.rows = 0
        self._points: dict[tuple, torch.Tensor] = {}  # the grid's inputs, per device and dtype
        self._index: dict[torch.device, torch.Tensor] = {}  # the shown units, per device

    def attach(self, model: nn.Module) -> None:
        owner = f"NeuronProbe {self.name!r}"
        modules = named_layers(model)
        if self.layer not in modules:
            names = ", ".join(repr(n) for n in modules if n) or "(none)"
            raise ValueError(f"{owner}: no module named {self.layer!r}; the modules are {names}")
        captured: dict[str, torch.Tensor] = {}
        with ForwardHooks(model, [self.layer], captured.__setitem__):
            check_forward(owner, model, self.grid.points()[:2])
        if self.layer not in captured:
            raise ValueError(f"{owner}: module {self.layer!r} produced no tensor in the model's forward")
        output = captured[self.layer]
        features = output.reshape(output.shape[0], -1).shape[1]
        if self.units is None:
            self.units = list(range(min(self._first, features)))
        bad = [u for u in self.units if u >= features]
        if bad:
            raise ValueError(f"{owner}: units {bad} are not among the {features} outputs of {self.layer!r}")
        self.columns = self.columns or math.ceil(math.sqrt(len(self.units)))
        self.rows = math.ceil(len(self.units) / self.columns)

    def evaluate(self, model: nn.Module, context: ProbeContext) -> dict[str, Any]:
        device, dtype = model_device_dtype(model)
        key = (device, dtype)
        if key not in self._points:
            self._points[key] = to_model(self.grid.points(), device, dtype)
        points = self._points[key]
        index = self._index.get(device)
        if index is None:  # copied to the device once, not at every frame
            index = self._index[device] = torch.tensor(self.units, device=device)
        parts, captured = [], {}
        with ForwardHooks(model, [self.layer], captured.__setitem__), torch.no_grad():
            for start in range(0, points.shape[0], self.batch_size):
                model(points[start : start + self.batch_size])
                out = captured[self.layer]
                parts.append(out.reshape(out.shape[0], -1).index_select(1, index).float())
        size = self.resolution
        activations = torch.cat(parts).T.reshape(len(self.units), size, size).contiguous()
        if not bool(all_finite(activations)):
            self.warn_once(
                "nonfinite", f"non-finite outputs of {self.layer!r} at step {context.step}; drawn in magenta"
            )
        # The scale stays a device scalar: on CUDA nothing here waits for the GPU but the check
        # above (which waits for the probe stream only).
        scale = activations.new_full((), float(self.scale)) if self.scale else _largest(activations)
        return {
            "rgba": neuron_mosaic(activations, scale, self.columns),
            "activations": activations,
            "scale": scale.to(torch.float64),
        }

    def static(self) -> dict[str, np.ndarray]:
        return {
            "units": np.asarray(self.units or [], np.int64),
            "us": self.grid.us().float().numpy(),
            "vs": self.grid.vs().float().numpy(),
        }

    def config(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "units": len(self.units or []),
            "columns": self.columns,
            "rows": self.rows,
            "resolution": self.resolution,
            "domain": list(self.domain),
            "scale": self.scale,
            "gap": GAP,
        }


def neuron_mosaic(activations: torch.Tensor, scale: float | torch.Tensor, columns: int) -> torch.Tensor:
    """``(U, H, W)`` unit outputs -> one ``(rows*(H+GAP)-GAP, columns*(W+GAP)-GAP, 4)`` uint8
    picture: unit ``u`` at row ``u // columns``, column ``u % columns``; -scale blue, 0 white,
    +scale red, non-finite magenta; white between maps."""
    units, h, w = activations.shape
    p = ((activations.float() / scale).clamp(-1.0, 1.0) + 1.0) * 0.5
    p = torch.where(torch.isfinite(activations), p, activations.float())  # keep NaN/inf: magenta
    palette = torch.zeros((1, 3), dtype=torch.uint8)
    tiles = probs_to_rgba(p.reshape(units * h, w, 1).contiguous(), "prob", palette, 0).reshape(units, h, w, 4)
    return tile_mosaic(tiles, columns)


def tile_mosaic(tiles: torch.Tensor, columns: int) -> torch.Tensor:
    """``(U, H, W, 4)`` uint8 tiles -> one mosaic, tile ``u`` at row ``u // columns``, column
    ``u % columns``, ``GAP`` white pixels between them."""
    units, h, w, _ = tiles.shape
    rows = math.ceil(units / columns)
    # Every tile padded with white to (h + GAP, w + GAP), rows x columns of them, then laid
    # out row by row in one copy; the last gap of each direction is cut off.
    padded = torch.full((rows * columns, h + GAP, w + GAP, 4), WHITE, dtype=torch.uint8, device=tiles.device)
    padded[:units, :h, :w] = tiles
    mosaic = padded.reshape(rows, columns, h + GAP, w + GAP, 4).permute(0, 2, 1, 3, 4)
    return mosaic.reshape(rows * (h + GAP), columns * (w + GAP), 4)[
        : rows * (h + GAP) - GAP, : columns * (w + GAP) - GAP
    ]


def _largest(activations: torch.Tensor) -> torch.Tensor:
    """The largest finite |output| (1 where there is none), a 0-d tensor on their device."""
    largest = torch.where(torch.isfinite(activations), activations.abs(), 0.0).amax()
    return torch.where(largest > 0, largest, torch.ones_like(largest))
