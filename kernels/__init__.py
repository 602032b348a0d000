"""Device kernels behind the probes: one public function per op, dispatched by device.

Each op has a plain torch reference (``*_reference``) that defines its exact semantics;
the public function is what probes call.
"""

from probescope.kernels.colormap import (
    NONFINITE_RGBA,
    default_palette,
    probs_to_rgba,
    probs_to_rgba_reference,
)
from probescope.kernels.grid import grid_inputs, grid_inputs_reference
from probescope.kernels.interpolate import interpolate_frames, interpolate_frames_reference
from probescope.kernels.smooth import smooth_1d, smooth_1d_reference

__all__ = [
    "NONFINITE_RGBA",
    "default_palette",
    "grid_inputs",
    "grid_inputs_reference",
    "interpolate_frames",
    "interpolate_frames_reference",
    "probs_to_rgba",
    "probs_to_rgba_reference",
    "smooth_1d",
    "smooth_1d_reference",
]
