"""Device kernels behind the probes: one public function per op, dispatched by device.

Each op has a plain torch reference (``*_reference``) that defines its exact semantics, a
Triton kernel (CUDA tensors) and a Numba kernel (CPU tensors); the public function picks one
by the tensors' device (``impl="auto"``) or runs the one named. Backends are imported on
first use, so importing probescope compiles nothing.
"""

from probescope.kernels.backend import IMPLS, choose_impl
from probescope.kernels.colormap import (
    NONFINITE_RGBA,
    default_palette,
    probs_to_rgba,
    probs_to_rgba_reference,
    resolve_palette,
)
from probescope.kernels.ema import ema_frames, ema_frames_reference
from probescope.kernels.grid import GridSpec, grid_inputs, grid_inputs_reference
from probescope.kernels.grid_mlp import fused_path, grid_mlp, grid_mlp_reference, module_forward_on_grid
from probescope.kernels.histogram import HISTOGRAM_HEAD, tensor_histogram, tensor_histogram_reference
from probescope.kernels.interpolate import interpolate_frames, interpolate_frames_reference
from probescope.kernels.lds import lds_kernel_window, lds_weights, lds_weights_reference
from probescope.kernels.mlp import FusableMLP, NotFusableError, final_output_kind
from probescope.kernels.smooth import smooth_1d, smooth_1d_reference
from probescope.kernels.stats import (
    STAT_NAMES,
    spectral_norm,
    spectral_norm_reference,
    tensor_stats,
    tensor_stats_reference,
)

__all__ = [
    "HISTOGRAM_HEAD",
    "IMPLS",
    "NONFINITE_RGBA",
    "STAT_NAMES",
    "FusableMLP",
    "GridSpec",
    "NotFusableError",
    "choose_impl",
    "default_palette",
    "ema_frames",
    "ema_frames_reference",
    "final_output_kind",
    "fused_path",
    "grid_inputs",
    "grid_inputs_reference",
    "grid_mlp",
    "grid_mlp_reference",
    "interpolate_frames",
    "interpolate_frames_reference",
    "lds_kernel_window",
    "lds_weights",
    "lds_weights_reference",
    "module_forward_on_grid",
    "probs_to_rgba",
    "probs_to_rgba_reference",
    "resolve_palette",
    "smooth_1d",
    "smooth_1d_reference",
    "spectral_norm",
    "spectral_norm_reference",
    "tensor_histogram",
    "tensor_histogram_reference",
    "tensor_stats",
    "tensor_stats_reference",
]
