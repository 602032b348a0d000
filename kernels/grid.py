"""Grid generation: the input points of a 2-D plane through a d-dimensional input space."""

from __future__ import annotations

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
