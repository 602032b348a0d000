"""Grid generation: the input points of a 2-D plane through a d-dimensional input space."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def grid_inputs_reference(
    origin: torch.Tensor,
    axis_u: torch.Tensor,
    axis_v: torch.Tensor,
    us: torch.Tensor,
    vs: torch.Tensor,
) -> torch.Tensor:
    """Input points ``origin + us[c] * axis_u + vs[r] * axis_v`` in row-major (r, c) order.

    Returns a ``(len(vs) * len(us), d)`` tensor: row ``r * len(us) + c`` is pixel (r, c).
    """
    points = origin + vs[:, None, None] * axis_v + us[None, :, None] * axis_u
    return points.reshape(-1, origin.shape[0])


def grid_inputs(
    origin: torch.Tensor,
    axis_u: torch.Tensor,
    axis_v: torch.Tensor,
    us: torch.Tensor,
    vs: torch.Tensor,
) -> torch.Tensor:
    """Input points of the grid spanned by ``us`` x ``vs`` on the plane (origin, axis_u, axis_v)."""
    return grid_inputs_reference(origin, axis_u, axis_v, us, vs)


@dataclass(frozen=True)
class GridSpec:
    """A ``height`` x ``width`` grid of points on the plane (origin, axis_u, axis_v).

    Pixel (r, c) has plane coordinates ``u = u0 + c·du``, ``v = v0 + r·dv``; row 0 is the top of
    the picture, so ``dv`` is usually negative.
    """

    origin: torch.Tensor
    axis_u: torch.Tensor
    axis_v: torch.Tensor
    u0: float
    du: float
    v0: float
    dv: float
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("origin", "axis_u", "axis_v"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dim() != 1:
                raise ValueError(f"GridSpec: {name} must be a 1-D tensor, got {value!r}")
            object.__setattr__(self, name, value.detach().to("cpu", torch.float64))
        if not self.origin.shape == self.axis_u.shape == self.axis_v.shape:
            raise ValueError(
                "GridSpec: origin, axis_u and axis_v must have the same length, got "
                f"{self.origin.shape[0]}, {self.axis_u.shape[0]}, {self.axis_v.shape[0]}"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GridSpec: {name} must be a positive integer, got {value!r}")
        for name in ("u0", "du", "v0", "dv"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"GridSpec: {name} must be finite, got {getattr(self, name)!r}")

    @classmethod
    def rectangle(cls, domain: tuple[float, float, float, float], width: int, height: int) -> GridSpec:
        """Pixel centres of the 2-D rectangle ``(x0, x1, y0, y1)``, row 0 at the top (y1)."""
        return cls.on_plane(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]),
                            domain, width, height)  # fmt: skip

    @classmethod
    def on_plane(
        cls,
        origin: torch.Tensor,
        axis_u: torch.Tensor,
        axis_v: torch.Tensor,
        domain: tuple[float, float, float, float],
        width: int,
        height: int,
    ) -> GridSpec:
        """Pixel centres of the plane rectangle ``(u0, u1, v0, v1)``, row 0 at the top (v1)."""
        u_lo, u_hi, v_lo, v_hi = (float(x) for x in domain)
        for name, n in (("width", width), ("height", height)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"GridSpec: {name} must be a positive integer, got {n!r}")
        du, dv = (u_hi - u_lo) / width, (v_hi - v_lo) / height
        return cls(origin, axis_u, axis_v, u_lo + 0.5 * du, du, v_hi - 0.5 * dv, -dv, width, height)

    @property
    def input_dim(self) -> int:
        return int(self.origin.shape[0])

    @functools.cached_property
    def basis(self) -> torch.Tensor:
        """``(3, d)`` float64 rows origin, axis_u, axis_v (built once; the spec is frozen)."""
        return torch.stack([self.origin, self.axis_u, self.axis_v])

    def us(self) -> torch.Tensor:
        return self.u0 + self.du * torch.arange(self.width, dtype=torch.float64)

    def vs(self) -> torch.Tensor:
        return self.v0 + self.dv * torch.arange(self.height, dtype=torch.float64)

    def points(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(height * width, d)`` input points, row-major: row ``r * width + c`` is pixel (r, c)."""
        return grid_inputs_reference(self.origin, self.axis_u, self.axis_v, self.us(), self.vs()).to(dtype)
