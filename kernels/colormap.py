"""Probabilities (or a regression's values) -> RGBA pixels for the map modes ``region``,
``boundary``, ``prob``, ``blend`` and ``value``.

Exact semantics (every implementation matches ``probs_to_rgba_reference``):

- a pixel with any non-finite probability gets ``NONFINITE_RGBA``;
- ``region``: the argmax class's colour, blended towards white as its probability falls
  towards chance, ``shade = clamp((p_max - 1/C) / (1 - 1/C), 0, 1)``;
- ``boundary``: a pale class colour that darkens to ``BOUNDARY_INK`` where the margin
  ``m = p_top1 - p_top2`` vanishes, ``t = 1 - (1 - m)^4``;
- ``prob``: the probability of one class through a blue-white-red diverging ramp
  (white at 0.5);
- ``blend``: the class colours mixed by probability,
  ``rgb = sum_c w_c * colour_c / sum_c w_c`` with ``w_c = max(p_c, 0)`` (white where every
  ``w_c`` is 0): a pixel torn between two classes shows their mixture, a sure one its
  class's colour (TF Playground's look, for any number of classes);
- ``value``: one output of a regression through the same ramp, over a fixed
  ``value_range = (lo, hi)``: ``q = clamp((v - lo) * (1 / (hi - lo)), 0, 1)`` (white at
  the middle of the range; values outside it take the colour of its end). ``prob`` is
  ``value`` over (0, 1).

Channels are rounded half up and clamped to [0, 255]; alpha is 255.
"""

from __future__ import annotations

import colorsys
import math
import numbers

import torch

from probescope.kernels.backend import choose_impl

MODES = ("region", "boundary", "prob", "value", "blend")  # (the kernels take the index)
NONFINITE_RGBA = (255, 0, 255, 255)
BOUNDARY_INK = (28, 28, 36)
BOUNDARY_PALE = 0.55
# Anchors of the diverging ramp at q = 0, 0.25, 0.5, 0.75, 1 (ColorBrewer RdBu, reversed).
DIVERGING_ANCHORS = (
    (33, 102, 172),
    (146, 197, 222),
    (247, 247, 247),
    (244, 165, 130),
    (178, 24, 43),
)
_BASE_PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def default_palette(num_classes: int) -> torch.Tensor:
    """A ``(num_classes, 3)`` uint8 palette: ten distinct colours, then golden-ratio hues."""
    colours = list(_BASE_PALETTE[:num_classes])
    for i in range(len(colours), num_classes):
        hue = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.85)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return torch.tensor(colours, dtype=torch.uint8).reshape(num_classes, 3)


def check_palette(palette):
    """``palette=`` as a probe takes it, checked before the class count is known: None (the
    default palette), a matplotlib colormap's name, or colours (``(r, g, b)`` of ints 0-255 or
    floats 0-1, or names and hex strings matplotlib knows), returned as a tuple of RGB."""
    if palette is None or isinstance(palette, str):
        if isinstance(palette, str):
            _colormap(palette)
        return palette
    if not hasattr(palette, "__iter__"):
        raise TypeError(
            f"palette must be a colormap's name or a sequence of colours, got {type(palette).__name__}"
        )
    if hasattr(palette, "tolist"):  # an array or a tensor of rows
        palette = palette.tolist()
    colours = tuple(_rgb(c) for c in palette)
    if not colours:
        raise ValueError("palette must hold at least one colour")
    return colours


def resolve_palette(palette, count: int) -> torch.Tensor:
    """A ``(count, 3)`` uint8 palette from ``check_palette``'s result: the default one, the
    colours given (exactly ``count``), or a colormap's: a qualitative map's first ``count``
    colours (tab10, Set1, ...), else ``count`` colours spread evenly over it."""
    if palette is None:
        return default_palette(count)
    if isinstance(palette, str):
        cmap = _colormap(palette)
        listed = getattr(cmap, "colors", None)
        if listed is not None and count <= cmap.N <= 32:  # qualitative: its own colours, in order
            rgb = [tuple(c)[:3] for c in listed[:count]]
        else:
            rgb = [cmap(t)[:3] for t in ([0.5] if count == 1 else [i / (count - 1) for i in range(count)])]
    else:
        if len(palette) != count:
            raise ValueError(f"palette has {len(palette)} colours for {count} classes")
        rgb = list(palette)
    return torch.tensor([[round(v * 255) for v in c] for c in rgb], dtype=torch.uint8).reshape(count, 3)


def _colormap(name: str):
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"palette {name!r} is no matplotlib colormap (tab10, Set2, viridis, ...)") from None


def _rgb(colour) -> tuple[float, float, float]:
    """One colour as floats 0-1: ints 0-255, floats 0-1, or a name or hex string."""
    from matplotlib.colors import to_rgb

    if isinstance(colour, str):
        try:
            return to_rgb(colour)
        except ValueError:
            raise ValueError(f"palette colour {colour!r} is no colour matplotlib knows") from None
    values = tuple(colour) if hasattr(colour, "__iter__") else ()
    numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)
    if len(values) != 3 or not numeric:
        raise ValueError(f"palette colour {colour!r} must be (r, g, b) or a name or hex string")
    if all(isinstance(v, numbers.Integral) for v in values):
        if not all(0 <= v <= 255 for v in values):
            raise ValueError(f"palette colour {colour!r}: ints are 0-255")
        return tuple(v / 255.0 for v in values)
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"palette colour {colour!r}: floats are 0-1 (ints 0-255)")
    return tuple(float(v) for v in values)


def _to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb + 0.5).floor().clamp(0, 255).to(torch.uint8)


def ramp_scale(mode: str, value_range: tuple[float, float] | None) -> tuple[float, float]:
    """``(lo, 1 / (hi - lo))`` in float32, as every implementation scales the ramp's values."""
    lo, hi = (0.0, 1.0) if mode == "prob" or value_range is None else value_range
    lo32 = float(torch.tensor(lo, dtype=torch.float32))
    return lo32, float(torch.tensor(1.0 / (hi - lo), dtype=torch.float32))


def check_value_range(value_range) -> tuple[float, float]:
    """``value_range`` as two floats ``lo < hi``, finite and apart in float32."""
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be two numbers (lo, hi), got {value_range!r}") from None
    scale = 1.0 / (hi - lo) if hi > lo else math.inf
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo and scale < 3.4e38):
        raise ValueError(f"value_range must be two finite numbers lo < hi, got {value_range!r}")
    return lo, hi


def probs_to_rgba_reference(
    probs: torch.Tensor,
    mode: str,
    palette: torch.Tensor,
    class_index: int = 0,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``(H, W, C)`` probabilities (``value``: values) -> ``(H, W, 4)`` uint8 RGBA, computed
    in float32."""
    p = probs.to(torch.float32)
    num_classes = p.shape[-1]
    pal = palette.to(device=p.device, dtype=torch.float32)
    if mode == "region":
        p_max, k = p.max(dim=-1)
        if num_classes == 1:
            shade = torch.ones_like(p_max)
        else:
            chance = 1.0 / num_classes
            shade = ((p_max - chance) / (1.0 - chance)).clamp(0.0, 1.0)
        rgb = 255.0 + (pal[k] - 255.0) * shade[..., None]
    elif mode == "boundary":
        if num_classes == 1:
            margin = torch.ones(p.shape[:-1], device=p.device)
            k = torch.zeros(p.shape[:-1], dtype=torch.long, device=p.device)
        else:
            top2, idx = p.topk(2, dim=-1)
            margin = (top2[..., 0] - top2[..., 1]).clamp(0.0, 1.0)
            k = idx[..., 0]
        t = 1.0 - (1.0 - margin) ** 4
        pale = pal[k] * (1.0 - BOUNDARY_PALE) + 255.0 * BOUNDARY_PALE
        ink = torch.tensor(BOUNDARY_INK, dtype=torch.float32, device=p.device)
        rgb = ink + (pale - ink) * t[..., None]
    elif mode == "blend":
        w = torch.nan_to_num(p).clamp(min=0.0)
        total = w.sum(-1, keepdim=True)
        mixed = (w @ pal) / torch.where(total > 0, total, 1.0)
        rgb = torch.where(total > 0, mixed, torch.full_like(mixed, 255.0))
    elif mode in ("prob", "value"):
        anchors = torch.tensor(DIVERGING_ANCHORS, dtype=torch.float32, device=p.device)
        lo, scale = ramp_scale(mode, value_range)
        q = (torch.nan_to_num(p[..., class_index]) - lo) * scale
        q = q.clamp(0.0, 1.0) * (len(DIVERGING_ANCHORS) - 1)
        lo = q.floor().clamp(max=len(DIVERGING_ANCHORS) - 2).long()
        frac = (q - lo)[..., None]
        rgb = anchors[lo] + (anchors[lo + 1] - anchors[lo]) * frac
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rgba = torch.empty((*p.shape[:-1], 4), dtype=torch.uint8, device=p.device)
    rgba[..., :3] = _to_uint8(torch.nan_to_num(rgb))
    rgba[..., 3] = 255
    bad = ~torch.isfinite(p).all(dim=-1)
    if bad.any():
        rgba[bad] = torch.tensor(NONFINITE_RGBA, dtype=torch.uint8, device=p.device)
    return rgba


def probs_to_rgba(
    probs: torch.Tensor,
    mode: str,
    palette: torch.Tensor,
    class_index: int = 0,
    out: torch.Tensor | None = None,
    *,
    value_range: tuple[float, float] | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Colour a ``(..., C)`` probability map (``value``: a map of ``C`` outputs, coloured over
    ``value_range``) into ``(..., 4)`` uint8; writes into ``out`` (a ring slot)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    num_classes = probs.shape[-1]
    ramp = mode in ("prob", "value")
    if palette.shape != (num_classes, 3) and not ramp:
        raise ValueError(
            f"palette must be ({num_classes}, 3) for {num_classes} classes, got {tuple(palette.shape)}"
        )
    if ramp and not 0 <= class_index < num_classes:
        what = "outputs" if mode == "value" else "classes"
        raise ValueError(f"class_index {class_index} is out of range for {num_classes} {what}")
    if mode == "value":
        if value_range is None:
            raise ValueError("mode 'value' needs value_range=(lo, hi), the values the ramp spans")
        value_range = check_value_range(value_range)
    elif value_range is not None:
        raise ValueError(f"value_range is for mode 'value', not {mode!r}")
    shape = (*probs.shape[:-1], 4)
    if out is not None and (tuple(out.shape) != shape or out.dtype != torch.uint8):
        raise ValueError(f"out must be a uint8 tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    kind = choose_impl("probs_to_rgba", probs.device, impl)
    if kind == "torch":
        rgba = probs_to_rgba_reference(probs, mode, palette, class_index, value_range)
        return rgba if out is None else out.copy_(rgba)
    target = (
        out
        if out is not None and out.is_contiguous()
        else torch.empty(shape, dtype=torch.uint8, device=probs.device)
    )
    if kind == "triton":
        from probescope.kernels._triton.colormap import probs_to_rgba_triton as run
    else:
        from probescope.kernels._numba.colormap import probs_to_rgba_numba as run
    run(probs, mode, palette, class_index, target, ramp=ramp_scale(mode, value_range))
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target
