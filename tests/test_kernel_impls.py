"""Every implementation of every kernel op, held to its torch reference on random inputs.

Tolerances are stated per op and dtype. Outputs are poisoned (see ``poisoned``), so an element
an implementation fails to write cannot pass. Without a GPU the Triton kernels run in Triton's
interpreter on CPU tensors (sizes kept small); with one, the same tests run on CUDA.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probescope.kernels import (
    HISTOGRAM_HEAD,
    NONFINITE_RGBA,
    STAT_NAMES,
    FusableMLP,
    GridSpec,
    NotFusableError,
    default_palette,
    ema_frames,
    ema_frames_reference,
    final_output_kind,
    fused_path,
    grid_mlp,
    grid_mlp_reference,
    interpolate_frames,
    interpolate_frames_reference,
    lds_kernel_window,
    lds_weights,
    lds_weights_reference,
    module_forward_on_grid,
    probs_to_rgba,
    probs_to_rgba_reference,
    smooth_1d,
    smooth_1d_reference,
    spectral_norm,
    spectral_norm_reference,
    tensor_histogram,
    tensor_histogram_reference,
    tensor_stats,
    tensor_stats_reference,
)
from probescope.kernels.backend import triton_interpreting
from probescope.kernels.colormap import MODES, ramp_scale
from tests.conftest import WrappedModule
from tests.kernel_cases import DEVICE, IMPLS, device_for

# Absolute error allowed on probabilities against the float64 reference. fp32: accumulation
# order only. fp16 / bf16: activations are rounded to 11 / 8 significant bits before every
# matrix product, as tensor cores need (the Numba path computes in fp32 and meets 1e-5).
PROB_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}

ACTIVATION_MODULES = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


def make_mlp(widths, activation="relu", dtype=torch.float32, seed=0, scale=1.0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(ACTIVATION_MODULES[activation]())
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.to(dtype)


def random_grid(d, width, height, seed=1):
    g = torch.Generator().manual_seed(seed)
    origin, u, v = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3))
    return GridSpec.on_plane(origin, u, v, (-2.0, 2.5, -1.5, 1.0), width, height)


def max_error(got, ref):
    return (got.double().cpu() - ref.double().cpu()).abs().max().item()


# ---------------------------------------------------------------- grid_mlp

GRID_CASES = [
    # (widths, activation, grid width, grid height)
    ((2, 32, 32, 3), "relu", 37, 23),
    ((2, 24, 40, 20, 7), "gelu", 19, 11),  # non-powers of two, three hidden layers
    ((5, 100, 70, 10), "leaky_relu", 13, 9),  # 5-D input: the grid is a plane through it
    ((2, 16, 1), "tanh", 1, 17),  # one pixel wide; one output -> sigmoid pair
    ((2, 16, 1), "silu", 17, 1),  # one pixel high
    ((2, 5), "relu", 7, 6),  # logistic regression: no hidden layer
    ((2, 12, 12, 12, 12, 12, 4), "gelu_tanh", 9, 8),  # six Linear layers (odd pair count)
    ((3, 300, 2), "sigmoid", 11, 5),
    ((2, 13, 11, 3), "relu", 131, 3),  # widths that are neither even nor multiples of four
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("widths", "activation", "w", "h"), GRID_CASES)
def test_grid_mlp_matches_float64_reference(poisoned, impl, widths, activation, w, h):
    model = make_mlp(widths, activation).to(device_for(impl))
    grid = random_grid(widths[0], w, h)
    ref = grid_mlp_reference(FusableMLP.from_module(model), grid)
    got = grid_mlp(model, grid, impl=impl)
    assert got.shape == ref.shape == (h, w, max(widths[-1], 2) if widths[-1] == 1 else widths[-1])
    assert got.dtype == torch.float32
    assert max_error(got, ref) <= PROB_TOL[torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_grid_mlp_half_precision_models(poisoned, impl, dtype, activation):
    model = make_mlp((2, 48, 48, 5), activation, dtype=dtype).to(device_for(impl))
    grid = random_grid(2, 21, 10)
    ref = grid_mlp_reference(FusableMLP.from_module(model), grid)
    got = grid_mlp(model, grid, impl=impl)
    assert max_error(got, ref) <= PROB_TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", sorted(ACTIVATION_MODULES))
def test_grid_mlp_every_activation(poisoned, impl, activation):
    model = make_mlp((2, 20, 20, 3), activation, scale=2.0).to(device_for(impl))
    grid = random_grid(2, 15, 6)
    ref = grid_mlp_reference(FusableMLP.from_module(model), grid)
    assert max_error(grid_mlp(model, grid, impl=impl), ref) <= PROB_TOL[torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
def test_grid_mlp_width_1024_and_raw_regression_outputs(poisoned, impl):
    model = make_mlp((2, 1024, 1024, 10), "relu").to(device_for(impl))
    grid = random_grid(2, 9, 4)
    mlp = FusableMLP.from_module(model)
    probs_ref, raw_ref = grid_mlp_reference(mlp, grid), grid_mlp_reference(mlp, grid, "raw")
    assert max_error(grid_mlp(model, grid, impl=impl), probs_ref) <= 1e-5
    raw = grid_mlp(model, grid, "raw", impl=impl)
    assert max_error(raw, raw_ref) <= 1e-5 * max(1.0, raw_ref.abs().max().item())


TRITON = next(p for p in IMPLS if p.values == ("triton",))
# Interpreted: every GRID_CASES shape in small tiles. On a GPU the same, plus the benchmark MLPs
# in their real launch configurations: the shapes where Triton once miscompiled chained products.
LAYOUT_CASES = [(widths, activation, w, h, {"block_m": 32, "block_n": 16, "num_warps": 4})
                for widths, activation, w, h in GRID_CASES]  # fmt: skip
if DEVICE.type == "cuda":
    LAYOUT_CASES += [((2, 32, 32, 3), "relu", 70, 37, {}), ((2, 64, 64, 3), "relu", 70, 37, {}),
                     ((2, 256, 256, 256, 7), "relu", 70, 37, {}),
                     ((2, 1024, 1024, 10), "relu", 33, 9, {})]  # fmt: skip


@pytest.mark.parametrize("impl", [TRITON])
@pytest.mark.parametrize("layout", ["units", "pixels", "kloop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("widths", "activation", "w", "h", "config"), LAYOUT_CASES)
def test_triton_grid_mlp_layouts_match_the_reference(impl, layout, dtype, widths, activation, w, h, config):
    from probescope.kernels._triton.grid_mlp import grid_mlp_triton
    from probescope.kernels.grid_mlp import output_width, resolve_output

    model = make_mlp(widths, activation, dtype=dtype).to(device_for(impl))
    grid = random_grid(widths[0], w, h)
    mlp = FusableMLP.from_module(model)
    mode = resolve_output("auto", mlp.out_features)
    out = torch.full((w * h, output_width(mode, mlp.out_features)), float("nan"), device=device_for(impl))
    # an empty config: the launch configuration (shrunk to fit if it must), the layout named
    grid_mlp_triton(mlp, grid, mode, out, **config, layout=layout)
    assert max_error(out.view(h, w, -1), grid_mlp_reference(mlp, grid)) <= PROB_TOL[dtype]


def test_triton_launch_shrinks_a_configuration_that_does_not_fit_unless_it_was_given(monkeypatch):
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    import probescope.kernels._triton.grid_mlp as tg

    launched = []

    def launch(args, constants, config):  # a device whose shared memory takes BLOCK_N <= 16 only
        launched.append(dict(config))
        if config["block_n"] > 16:
            raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(tg, "_launch", launch)
    monkeypatch.setattr(tg, "_FITTED", {})
    mlp = FusableMLP.from_module(make_mlp((2, 64, 64, 3)))
    grid, out = random_grid(2, 5, 4), torch.empty(20, 3)
    tg.grid_mlp_triton(mlp, grid, "softmax", out, layout="pixels")  # a layout alone: shrinks
    assert launched[-1]["block_n"] == 16 and launched[-1]["layout"] == "pixels"
    assert len(launched) > 1 and launched[0]["block_n"] > 16
    launched.clear()
    tg.grid_mlp_triton(mlp, grid, "softmax", out, layout="pixels")  # the fitted one, at once
    assert [c["block_n"] for c in launched] == [16]
    launched.clear()
    tg.grid_mlp_triton(mlp, grid, "softmax", out)  # the other layout is fitted on its own
    assert launched[0]["layout"] == "units" and launched[0]["block_n"] > 16
    with pytest.raises(OutOfResources):  # block sizes given (a tuning run): no silent change
        tg.grid_mlp_triton(mlp, grid, "softmax", out, block_m=64, block_n=32, num_warps=4)


def test_triton_packed_weights_live_as_long_as_the_parameters_and_no_longer(monkeypatch):
    # A CUDA graph of a frame reads the packed buffers at every replay: evicting them to make
    # room (as the cache once did past 32 MLPs) would leave it reading freed memory.
    pytest.importorskip("triton")
    import gc

    import probescope.kernels._triton.grid_mlp as tg

    monkeypatch.setattr(tg, "_launch", lambda *args: None)
    monkeypatch.setattr(tg, "_PACKED", {})
    grid = random_grid(2, 3, 3)
    kept = FusableMLP.from_module(make_mlp((2, 8, 3)))
    tg.grid_mlp_triton(kept, grid, "softmax", torch.empty(9, 3))
    (entry,) = tg._PACKED.values()
    for seed in range(40):  # many other models come and go
        other = FusableMLP.from_module(make_mlp((2, 8, 3), seed=seed + 1))
        tg.grid_mlp_triton(other, grid, "softmax", torch.empty(9, 3))
        del other
    gc.collect()
    assert list(tg._PACKED.values()) == [entry]  # the live model's buffers, the same ones
    del kept
    gc.collect()
    assert tg._PACKED == {}


def test_triton_grid_mlp_rejects_an_unknown_layout():
    pytest.importorskip("triton")
    from probescope.kernels._triton.grid_mlp import grid_mlp_triton

    mlp = FusableMLP.from_module(make_mlp((2, 8, 3)))
    with pytest.raises(ValueError, match="layout must be one of"):
        grid_mlp_triton(mlp, random_grid(2, 3, 3), "softmax", torch.empty(9, 3), layout="rows")


def test_auto_dispatch_sends_cpu_mlps_up_to_width_512_to_numba_and_wider_ones_to_torch():
    # Measured (benchmarks/RESULTS.md): the fused kernel wins clearly up to 512, not at 1024.
    from probescope.kernels import fused_path

    assert fused_path(make_mlp((2, 64, 3))) == "numba"
    assert fused_path(make_mlp((2, 512, 512, 10))) == "numba"
    assert fused_path(make_mlp((2, 1024, 1024, 10))) == "torch"
    assert fused_path(make_mlp((2, 1024, 10)), impl="numba") == "numba"


@pytest.mark.parametrize("impl", IMPLS)
def test_grid_mlp_single_class_softmax_is_one_everywhere(poisoned, impl):
    model = make_mlp((2, 8, 1), "relu").to(device_for(impl))
    got = grid_mlp(model, random_grid(2, 5, 3), "softmax", impl=impl)
    assert got.shape == (3, 5, 1)
    assert torch.equal(got.cpu(), torch.ones(3, 5, 1))


@pytest.mark.parametrize("impl", IMPLS)
def test_grid_mlp_writes_into_the_given_slot(impl):
    model = make_mlp((2, 16, 4), "relu").to(device_for(impl))
    grid = random_grid(2, 6, 5)
    slot = torch.full((5, 6, 4), float("nan"), device=device_for(impl))
    result = grid_mlp(model, grid, out=slot, impl=impl)
    assert result is slot
    assert max_error(slot, grid_mlp_reference(FusableMLP.from_module(model), grid)) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid", "silu", "gelu"])
@pytest.mark.parametrize("where", ["first weight", "hidden weight", "last bias"])
def test_grid_mlp_non_finite_weights_give_non_finite_pixels(impl, activation, where):
    # A NaN must survive every activation on its way out (a max(x, 0) on the GPU returns 0
    # for NaN, which would hide a diverged model behind a plausible map).
    model = make_mlp((2, 8, 8, 3), activation).to(device_for(impl))
    with torch.no_grad():
        if where == "first weight":
            model[0].weight[0, 0] = float("nan")
        elif where == "hidden weight":
            model[2].weight[3, 1] = float("nan")
        else:
            model[4].bias[1] = float("nan")
    got = grid_mlp(model, random_grid(2, 4, 4), impl=impl)
    assert torch.isnan(got).all(dim=-1).all()


def test_a_non_fusable_model_gives_the_same_map_through_the_fallback():
    inner = make_mlp((2, 32, 32, 7), "gelu")
    grid = random_grid(2, 33, 17)
    with pytest.raises(NotFusableError, match="own forward"):
        FusableMLP.from_module(WrappedModule(inner))
    fused = grid_mlp(inner, grid)
    fallback = grid_mlp(WrappedModule(inner), grid)
    assert max_error(fallback, fused) <= 1e-5
    assert (
        max_error(
            module_forward_on_grid(inner, grid), grid_mlp_reference(FusableMLP.from_module(inner), grid)
        )
        <= 1e-5
    )


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 2)), "LayerNorm"),
        (nn.Sequential(nn.ReLU(), nn.Linear(2, 2)), "before the first Linear"),
        (nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 2)), "two activations"),
        (nn.Sequential(nn.Linear(2, 2048), nn.ReLU(), nn.Linear(2048, 2)), "width 2048"),
        (nn.Sequential(nn.Linear(2, 4).double()), "dtype"),
    ],
)
def test_models_that_do_not_fuse_say_why(model, reason):
    with pytest.raises(NotFusableError, match=reason):
        FusableMLP.from_module(model)


def test_a_model_with_forward_hooks_takes_its_forward_which_runs_them():
    # The fused kernels read the Linear layers' weights and cannot run hooks: torch's
    # weight_norm computes the weight in a pre-hook at every forward (read as it stood when the
    # hook last ran, the map was stale), a hook of the user's may scale the outputs.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        normed = nn.Sequential(nn.utils.weight_norm(nn.Linear(2, 16)), nn.Tanh(), nn.Linear(16, 3))
    scaled = make_mlp((2, 16, 3), "relu")
    scaled[-1].register_forward_hook(lambda module, inputs, output: output / 4.0)
    grid = random_grid(2, 9, 7)
    with torch.no_grad():
        normed[0].weight_g.mul_(3.0)  # the weight the hook computes at the next forward changes
    for model, hooked in ((normed, "0 has forward hooks"), (scaled, "2 has forward hooks")):
        with pytest.raises(NotFusableError, match=hooked):
            FusableMLP.from_module(model)
        assert fused_path(model).startswith("module forward")
        assert max_error(grid_mlp(model, grid), module_forward_on_grid(model, grid)) <= 1e-6


def test_nested_sequentials_dropout_in_eval_and_identity_fuse():
    inner = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    model = nn.Sequential(nn.Flatten(), inner, nn.Dropout(0.5), nn.Identity(), nn.Linear(8, 3)).eval()
    mlp = FusableMLP.from_module(model)
    assert mlp.widths == (8, 3) and mlp.activations == ("relu", "identity")
    grid = random_grid(2, 5, 5)
    assert max_error(grid_mlp(model, grid), module_forward_on_grid(model, grid)) <= 1e-5


# ---------------------------------------------------------------- batch norms folded in


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with its batch norms given random running statistics and affine parameters
    (fresh ones are the identity map, which any fold would pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))
    return model


def module_reference(model: nn.Module, grid: GridSpec) -> torch.Tensor:
    """The module's own forward on the grid, in float64 (parameters and statistics widened)."""
    import copy

    return module_forward_on_grid(copy.deepcopy(model).cpu().double(), grid)


BN = nn.BatchNorm1d
NORM_CASES = {
    "after a linear": lambda: nn.Sequential(nn.Linear(2, 24), BN(24), nn.ReLU(), nn.Linear(24, 5)),
    "after an activation": lambda: nn.Sequential(nn.Linear(2, 24), nn.GELU(), BN(24), nn.Linear(24, 5)),
    "on the inputs": lambda: nn.Sequential(BN(3), nn.Linear(3, 17), nn.Tanh(), nn.Linear(17, 4)),
    "everywhere": lambda: nn.Sequential(
        BN(2), BN(2, affine=False), nn.Linear(2, 20, bias=False), BN(20), nn.SiLU(), nn.Dropout(0.3),
        nn.Linear(20, 13), nn.ReLU(), BN(13), nn.Linear(13, 3), BN(3),
    ),
}  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_batch_norms_fold_into_the_linear_layers_next_to_them(poisoned, impl, case):
    model = with_statistics(NORM_CASES[case]()).eval().to(device_for(impl))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    grid = random_grid(linears[0].in_features, 19, 7)
    mlp = FusableMLP.from_module(model)  # it used to take the module's forward
    assert mlp.widths == tuple(m.out_features for m in linears)
    got = grid_mlp(model, grid, impl=impl)
    assert max_error(got, module_reference(model, grid)) <= PROB_TOL[torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_batch_norms_fold_into_half_precision_models(poisoned, impl, dtype):
    model = with_statistics(NORM_CASES["everywhere"]()).eval().to(device_for(impl), dtype)
    grid = random_grid(2, 21, 10)
    mlp = FusableMLP.from_module(model)
    assert all(w.dtype == dtype for w in mlp.weights)
    assert max_error(grid_mlp(model, grid, impl=impl), module_reference(model, grid)) <= PROB_TOL[dtype]


def test_folded_layers_keep_their_tensors_from_frame_to_frame_and_follow_the_statistics():
    model = with_statistics(NORM_CASES["after a linear"]()).eval()
    grid = random_grid(2, 9, 8)
    first, again = FusableMLP.from_module(model), FusableMLP.from_module(model)
    assert first.weights[0] is again.weights[0] and first.biases[0] is again.biases[0]
    assert first.weights[1] is model[3].weight  # a layer with no norm beside it is read as it is
    with torch.no_grad():
        model[1].running_mean.add_(1.5)  # training moved the statistics (the snapshot copies them)
    assert max_error(grid_mlp(model, grid), module_reference(model, grid)) <= PROB_TOL[torch.float32]


class NormedMLP(nn.Module):
    """A forward of its own that calls a batch norm between its layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(2, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.norm(self.fc1(x))))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: NORM_CASES["after a linear"]().train(), "BatchNorm1d in train mode normalises by its batch"),
        (lambda: NormedMLP().train(), "BatchNorm1d in train mode: not run"),
        (
            lambda: nn.Sequential(nn.Linear(2, 4), BN(4, track_running_stats=False), nn.Linear(4, 2)).eval(),
            "without running statistics",
        ),
        (lambda: nn.Sequential(nn.Linear(2, 4), nn.ReLU(), BN(4)).eval(), "follows the last Linear"),
        (lambda: nn.Sequential(nn.Linear(2, 4), BN(5), nn.Linear(5, 2)).eval(), "of 5 features after 4"),
    ],
)
def test_batch_norms_that_do_not_fold_take_the_forward_and_say_why(make, reason):
    model = with_statistics(make())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotFusableError, match=reason):
        FusableMLP.from_module(model)
    assert fused_path(model).startswith("module forward")
    # nothing was run to find out: a batch norm in train mode kept its statistics
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_forward_of_its_own_with_a_batch_norm_fuses():
    model = with_statistics(NormedMLP()).eval()
    grid = random_grid(2, 11, 13)
    assert fused_path(model) == "numba"
    assert max_error(grid_mlp(model, grid), module_reference(model, grid)) <= PROB_TOL[torch.float32]


def test_grid_spec_rectangle_puts_row_zero_at_the_top_and_validates():
    grid = GridSpec.rectangle((0.0, 4.0, 0.0, 2.0), 4, 2)
    pts = grid.points().reshape(2, 4, 2)
    assert torch.allclose(pts[0, :, 0], torch.tensor([0.5, 1.5, 2.5, 3.5]))
    assert torch.allclose(pts[:, 0, 1], torch.tensor([1.5, 0.5]))
    with pytest.raises(ValueError, match="width"):
        GridSpec.rectangle((0, 1, 0, 1), 0, 3)
    with pytest.raises(ValueError, match="same length"):
        GridSpec(torch.zeros(2), torch.zeros(3), torch.zeros(2), 0.0, 1.0, 0.0, 1.0, 2, 2)


# ---------------------------------------------------------------- probs_to_rgba


def random_probs(h, w, c, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(h, w, c, generator=g) * 3
    return torch.softmax(logits, dim=-1).to(device)


# value mode: values spread past both ends of the range, so that both clamps are taken
VALUE_RANGE = (-2.0, 4.5)


def colour_case(mode, probs):
    """The inputs and keyword arguments of a mode: probabilities, or values for ``value``."""
    if mode == "value":
        return probs * 9.0 - 3.0, {"value_range": VALUE_RANGE}
    return probs, {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("h", "w", "c"), [(1, 1, 3), (1, 29, 2), (13, 7, 1), (17, 19, 7), (5, 3, 23)])
def test_probs_to_rgba_matches_reference_into_a_poisoned_slot(impl, mode, h, w, c):
    device = device_for(impl)
    probs, kw = colour_case(mode, random_probs(h, w, c, seed=h * w * c, device=device))
    probs[0, 0, 0] = float("nan") if h * w > 1 else probs[0, 0, 0]
    palette = default_palette(c)
    ref = probs_to_rgba_reference(probs.cpu(), mode, palette, class_index=c - 1, **kw)
    for poison in (0, 255):
        slot = torch.full((h, w, 4), poison, dtype=torch.uint8, device=device)
        got = probs_to_rgba(probs, mode, palette, class_index=c - 1, out=slot, impl=impl, **kw)
        assert got is slot
        # Rounding half up is exact in both; float32 evaluation order can move a channel by 1.
        diff = (got.cpu().int() - ref.int()).abs()
        assert diff.max() <= 1
        assert (diff == 0).float().mean() >= 0.99
    if h * w > 1:
        assert tuple(got[0, 0].cpu().tolist()) == NONFINITE_RGBA


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("h", "w", "c"), [(1, 1, 3), (13, 7, 1), (17, 19, 7), (5, 3, 23)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_triton_colouring_launches_match_the_reference(staged, mode, h, w, c, dtype):
    """Both ways a program reads its rows (strided per class, or staged in one span), with
    programs that cover the map partly (block 64) and several times over (block 16)."""
    from probescope.kernels._triton.colormap import probs_to_rgba_triton

    device = device_for("triton")
    probs, kw = colour_case(mode, random_probs(h, w, c, seed=h * w + c, device=device))
    probs = probs.to(dtype)
    if h * w > 1:
        probs[h - 1, w - 1, c - 1] = float("inf")
    palette = default_palette(c)
    ref = probs_to_rgba_reference(probs.float().cpu(), mode, palette, class_index=c - 1, **kw)
    ramp = ramp_scale(mode, kw.get("value_range"))
    for block in (16, 64):
        slot = torch.full((h, w, 4), 7, dtype=torch.uint8, device=device)
        probs_to_rgba_triton(
            probs, mode, palette, c - 1, slot, ramp=ramp, block=block, staged=staged, num_warps=1
        )
        assert (slot.cpu().int() - ref.int()).abs().max() <= 1
    if h * w > 1:
        assert tuple(slot[h - 1, w - 1].cpu().tolist()) == NONFINITE_RGBA


@pytest.mark.parametrize("impl", IMPLS)
def test_probs_to_rgba_half_precision_inputs_and_non_contiguous_slots(impl):
    device = device_for(impl)
    probs = random_probs(9, 8, 4, device=device).to(torch.float16)
    palette = default_palette(4)
    backing = torch.zeros((8, 9, 4), dtype=torch.uint8, device=device)
    slot = backing.transpose(0, 1)  # (9, 8, 4), not contiguous
    probs_to_rgba(probs, "region", palette, out=slot, impl=impl)
    ref = probs_to_rgba_reference(probs.float().cpu(), "region", palette)
    assert (slot.cpu().int() - ref.int()).abs().max() <= 1


def test_probs_to_rgba_rejects_a_wrong_slot_or_class():
    probs = random_probs(4, 4, 3)
    with pytest.raises(ValueError, match="out must be"):
        probs_to_rgba(probs, "region", default_palette(3), out=torch.zeros(4, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="class_index"):
        probs_to_rgba(probs, "prob", default_palette(3), class_index=3)
    with pytest.raises(ValueError, match="class_index 3 is out of range for 3 outputs"):
        probs_to_rgba(probs, "value", default_palette(3), class_index=3, value_range=(0, 1))
    with pytest.raises(ValueError, match="needs value_range"):
        probs_to_rgba(probs, "value", default_palette(3))
    for bad in [(1.0, 1.0), (2.0, 1.0), (0.0, float("inf")), (float("nan"), 1.0), (0.0,), "ab", (0.0, 1e-45)]:
        with pytest.raises(ValueError, match="value_range must be"):
            probs_to_rgba(probs, "value", default_palette(3), value_range=bad)
    with pytest.raises(ValueError, match="value_range is for mode 'value', not 'prob'"):
        probs_to_rgba(probs, "prob", default_palette(3), value_range=(0, 1))


# ---------------------------------------------------------------- smooth_1d


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("n", "width", "kind"), [(1, 3, "box"), (7, 9, "gaussian"), (100, 5, "box"),
                                                   (1000, 31, "gaussian"), (333, 1, "box"),
                                                   (4100, 31, "gaussian"), (9001, 9, "box")])  # fmt: skip
def test_smooth_1d_matches_numpy_convolve_same(poisoned, impl, n, width, kind):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float32)
    got = smooth_1d(values.to(device_for(impl)), width, kind, impl=impl)
    ref = smooth_1d_reference(values.double(), width, kind)
    window = torch.ones(width) / width if kind == "box" else None
    if window is not None:
        assert np.allclose(
            ref.numpy(), np.convolve(values.double().numpy(), window.double().numpy(), mode="same")
        )
    assert got.shape == values.shape and got.dtype == values.dtype
    assert max_error(got, ref) <= 1e-5


# ---------------------------------------------------------------- ema_frames


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1), (6, 5, 7, 3), (3, 1001), (4, 97, 101)])
def test_ema_frames_matches_reference_and_chains_through_state(poisoned, impl, shape):
    device = device_for(impl)
    frames = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape)))
    got = ema_frames(frames.to(device), 0.3, impl=impl)
    ref = ema_frames_reference(frames.double(), 0.3)
    assert max_error(got, ref) <= 1e-6
    # Two calls chained through ``state`` equal one call over the whole stack.
    state = frames[0].clone().to(device)
    head = ema_frames(frames[:1].to(device), 0.3, state=state, impl=impl)
    tail = ema_frames(frames[1:].to(device), 0.3, state=state, impl=impl)
    assert max_error(torch.cat([head, tail]), ref) <= 1e-6
    assert max_error(state, ref[-1]) <= 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_ema_frames_shows_a_nan_frame_and_starts_again_from_the_next_one(poisoned, impl):
    device = device_for(impl)
    frames = torch.rand(5, 13, 7, generator=torch.Generator().manual_seed(5))
    frames[2, 3:6, 2] = float("nan")  # a frame the model got wrong in places
    frames[2, 0, 0] = float("inf")
    ref = ema_frames_reference(frames.double(), 0.25)
    got = ema_frames(frames.to(device), 0.25, impl=impl)
    assert torch.equal(torch.isnan(got.cpu()), torch.isnan(ref)) and torch.isnan(got[2, 3:6, 2]).all()
    assert got[2, 0, 0].item() == float("inf")
    np.testing.assert_array_equal(got[3, 3:6, 2].cpu(), frames[3, 3:6, 2])  # the next frame, as it is
    assert got[3, 0, 0].item() == frames[3, 0, 0].item()
    finite = torch.isfinite(ref)
    assert max_error(got.cpu()[finite], ref[finite]) <= 1e-6
    assert max_error(got[4, 3:6, 2], 0.75 * frames[3, 3:6, 2] + 0.25 * frames[4, 3:6, 2]) <= 1e-6
    # The same through ``state``, a frame per call (as a probe calls it).
    state = frames[0].clone().to(device)
    chained = torch.cat(
        [ema_frames(frames[t : t + 1].to(device), 0.25, state=state, impl=impl) for t in range(5)]
    )
    assert max_error(chained.cpu()[finite], ref[finite]) <= 1e-6 and torch.isfinite(state).all()


def test_ema_frames_rejects_bad_alpha_and_state():
    with pytest.raises(ValueError, match="alpha"):
        ema_frames(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="state"):
        ema_frames(torch.zeros(2, 3), 0.5, state=torch.zeros(4))


# ---------------------------------------------------------------- interpolate_frames


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", ["linear", "smoothstep", "geometric"])
@pytest.mark.parametrize(("shape", "k", "dtype"), [((1,), 1, torch.float32), ((7, 5, 3), 4, torch.float32),
                                                    ((33, 17, 2), 3, torch.float16),
                                                    ((70, 65, 3), 2, torch.float32)])  # fmt: skip
def test_interpolate_frames_matches_reference(poisoned, impl, method, shape, k, dtype):
    """Tolerances: 1e-6 absolute in float32, 1e-3 in float16 (values in [0, 1]); a few
    elements are 0 in one frame (the geometric blend's log of 0) and, geometric, one is
    negative (NaN, in the same place as the reference's)."""
    device = device_for(impl)
    g = torch.Generator().manual_seed(k)
    a, b = torch.rand(shape, generator=g).to(dtype), torch.rand(shape, generator=g).to(dtype)
    a.view(-1)[::5] = 0.0
    if method == "geometric" and a.numel() > 3:
        b.view(-1)[3] = -0.5
    got = interpolate_frames(a.to(device), b.to(device), k, method, impl=impl)
    ref = interpolate_frames_reference(a.double(), b.double(), k, method)
    assert got.shape == (k, *shape) and got.dtype == dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got.cpu()), nan) and (method != "geometric" or a.numel() <= 3 or nan.any())
    assert max_error(got.cpu()[~nan], ref[~nan]) <= (1e-6 if dtype == torch.float32 else 1e-3)


# ---------------------------------------------------------------- lds_weights


def tsai_style_lds(labels, n_bins, label_range, reweight, kernel, ks, sigma, max_rel_weight):
    """The seed's algorithm written with numpy/scipy, as an independent check of ours."""
    from scipy.ndimage import convolve1d, gaussian_filter1d
    from scipy.signal.windows import triang

    half = (ks - 1) // 2
    if kernel == "gaussian":
        base = [0.0] * half + [1.0] + [0.0] * half
        window = gaussian_filter1d(base, sigma=sigma) / max(gaussian_filter1d(base, sigma=sigma))
    elif kernel == "triang":
        window = triang(ks)
    else:
        window = np.exp(-np.abs(np.arange(-half, half + 1)) / sigma)
        window = window / window.max()
    counts, _ = np.histogram(labels, bins=n_bins, range=label_range)
    density = np.sqrt(counts) if reweight == "sqrt_inv" else counts.astype(float)
    smoothed = convolve1d(density, weights=window, mode="constant")
    lo, hi = label_range
    index = np.clip(np.floor((labels - lo) * np.float32(n_bins / (hi - lo))).astype(int), 0, n_bins - 1)
    weights = 1.0 / smoothed[index]
    if max_rel_weight is not None:
        weights = np.clip(weights, None, weights.min() * max_rel_weight)
    return weights / weights.sum() * len(labels), window


@pytest.mark.parametrize("kernel", ["gaussian", "triang", "laplace"])
@pytest.mark.parametrize(("ks", "sigma"), [(9, 1.0), (5, 2.0), (1, 1.0)])
def test_lds_window_matches_scipy(kernel, ks, sigma):
    pytest.importorskip("scipy")
    _, window = tsai_style_lds(np.zeros(3, np.float32), 3, (0.0, 1.0), "inv", kernel, ks, sigma, None)
    assert np.allclose(lds_kernel_window(kernel, ks, sigma).numpy(), window, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("kernel", "reweight", "max_rel"),
    [("gaussian", "inv", None), ("triang", "sqrt_inv", 4.0), ("laplace", "inv", 2.0)],
)
def test_lds_weights_match_reference_and_the_seed_algorithm(poisoned, impl, kernel, reweight, max_rel):
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(5)
    labels = torch.cat([torch.randn(10, generator=g) - 20, torch.randn(100, generator=g) * 2,
                        torch.randn(301, generator=g) * 2 + 12])  # fmt: skip
    got = lds_weights(labels.to(device_for(impl)), 50, None, reweight, kernel, 5, 2.0, max_rel, impl=impl)
    ref = lds_weights_reference(labels, 50, None, reweight, kernel, 5, 2.0, max_rel)
    assert got.shape == labels.shape
    assert max_error(got, ref) <= 1e-5
    lo, hi = float(labels.min()), float(labels.max())
    seed, _ = tsai_style_lds(labels.numpy(), 50, (lo, hi), reweight, kernel, 5, 2.0, max_rel)
    assert np.allclose(ref.numpy(), seed, rtol=1e-5)
    assert abs(float(got.mean()) - 1.0) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_lds_weights_outside_the_range_and_over_many_blocks_match_reference(poisoned, impl):
    # 10,003 labels (several binning blocks, not a multiple of the count rows), a third of them
    # outside an explicit label_range: they count in the edge bins, exactly as the reference's.
    g = torch.Generator().manual_seed(11)
    labels = torch.randn(10_003, generator=g) * 3
    got = lds_weights(labels.to(device_for(impl)), 40, (-2.0, 2.5), "sqrt_inv", "triang", 5, impl=impl)
    ref = lds_weights_reference(labels, 40, (-2.0, 2.5), "sqrt_inv", "triang", 5)
    assert max_error(got, ref) <= 1e-5
    edge = labels <= -2.0
    assert torch.allclose(got.cpu()[edge], got.cpu()[edge][0])  # one bin: one weight


def test_lds_weights_favour_rare_labels_and_default_to_unit_bins():
    labels = torch.cat([torch.zeros(90), torch.full((10,), 5.0)])
    w = lds_weights(labels, kernel="gaussian", kernel_size=1)
    assert torch.allclose(w[:90], torch.full((90,), w[0].item()))
    assert w[95] / w[0] == pytest.approx(9.0, rel=1e-5)
    with pytest.raises(ValueError, match="reweight"):
        lds_weights(labels, reweight="log")


# ---------------------------------------------------------------- tensor_stats


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("shape", "dtype"), [((1,), torch.float32), ((37, 53), torch.float32),
                                              ((9000,), torch.bfloat16), ((3, 5, 7, 11), torch.float16),
                                              ((20001,), torch.float32)])  # fmt: skip
def test_tensor_stats_match_reference(poisoned, impl, shape, dtype):
    g = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(shape, generator=g) * 3 + 100).to(dtype)  # a large mean: variance must not cancel
    flat = x.reshape(-1)
    flat[:: max(1, flat.numel() // 7)] = 0.0
    got = tensor_stats(x.to(device_for(impl)), near_zero=1e-3, impl=impl)
    ref = tensor_stats_reference(x, near_zero=1e-3)
    assert got.dtype == torch.float64 and got.shape == (len(STAT_NAMES),)
    # float32 block sums: relative error ~1e-6 of the magnitudes involved.
    assert torch.allclose(got.cpu(), ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_tensor_stats_skip_non_finite_entries_and_count_them(impl):
    x = torch.tensor([1.0, float("nan"), -3.0, float("inf"), 0.0])
    got = tensor_stats(x.to(device_for(impl)), impl=impl).cpu()
    stats = dict(zip(STAT_NAMES, got.tolist(), strict=True))
    assert stats["mean"] == pytest.approx(-2 / 3)
    assert stats["max_abs"] == 3.0 and stats["l1"] == 4.0
    assert stats["nonfinite"] == pytest.approx(0.4) and stats["near_zero"] == pytest.approx(0.2)


@pytest.mark.parametrize("impl", IMPLS)
def test_tensor_stats_across_blocks_with_non_finite_entries_in_some(impl):
    # Many blocks (every implementation reduces in blocks of 16384 or fewer), the largest |x|
    # in a block that also holds an infinity, NaN in another: each block's careful path.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100_003, generator=g)
    x[40_000], x[40_001], x[70_000] = float("inf"), -50.0, float("nan")
    got = tensor_stats(x.to(device_for(impl)), impl=impl).cpu()
    ref = tensor_stats_reference(x)
    stats = dict(zip(STAT_NAMES, got.tolist(), strict=True))
    assert stats["max_abs"] == 50.0 and stats["nonfinite"] == pytest.approx(2 / 100_003)
    assert torch.allclose(got, ref, rtol=2e-5, atol=1e-6)


def test_numba_combine_of_partials_equals_the_torch_one():
    from probescope.kernels._numba.stats import combine_partials_kernel
    from probescope.kernels.stats import combine_partials

    g = torch.Generator().manual_seed(2)
    partials = torch.rand(9, 8, generator=g, dtype=torch.float64) * 10
    partials[:, 0] = torch.tensor([5.0, 0.0, 7, 1, 3, 9, 0, 2, 4])  # two blocks with nothing finite
    partials[[1, 6], 1:3] = 0.0
    for rows, numel in ((partials, 60), (torch.zeros(3, 8, dtype=torch.float64), 12)):  # and no finite entry
        out = np.empty(7)
        combine_partials_kernel(rows.numpy(), numel, out)
        np.testing.assert_allclose(out, combine_partials(rows, numel).numpy(), rtol=1e-12, equal_nan=True)


# ---------------------------------------------------------------- tensor_histogram


def numpy_histogram(x: torch.Tensor, bins: int) -> tuple[float, float, np.ndarray]:
    """numpy.histogram of the finite entries over their range: the range's ends and counts."""
    values = x.detach().double().reshape(-1).numpy()
    values = values[np.isfinite(values)]
    counts, edges = np.histogram(values, bins)
    return edges[0], edges[-1], counts


# Random entries, a few NaN and infinities; half-precision tensors; 1 entry, a block and many
# blocks (every implementation reduces in blocks of 16384 or fewer) and awkward bin counts.
HISTOGRAM_CASES = [((1,), torch.float32, 40), ((37, 53), torch.float32, 7), ((9000,), torch.bfloat16, 40),
                   ((3, 5, 7, 11), torch.float16, 1), ((100_003,), torch.float32, 100),
                   ((500,), torch.float64, 33)]  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("shape", "dtype", "bins"), HISTOGRAM_CASES)
def test_tensor_histogram_counts_exactly_as_the_reference(poisoned, impl, shape, dtype, bins):
    g = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    flat = x.reshape(-1)
    if flat.numel() > 10:
        flat[3], flat[7], flat[-1] = float("nan"), float("inf"), -float("inf")
    got = tensor_histogram(x.to(device_for(impl)), bins, impl=impl).cpu()
    ref = tensor_histogram_reference(x, bins)
    assert got.dtype == torch.float64 and got.shape == (bins + 3,)
    # Bin indices are computed in float64 by every implementation: the counts agree exactly.
    assert torch.equal(got, ref)
    assert ref[2] == (~torch.isfinite(x)).sum() and ref[3:].sum() == torch.isfinite(x).sum()
    lo, hi, counts = numpy_histogram(x, bins)
    assert (float(ref[0]), float(ref[1])) == (lo, hi)
    # numpy moves an entry within rounding of an edge by comparing it with its own edges:
    # only such entries may be counted in the next bin (bfloat16's few values sit on edges).
    values = x.double().reshape(-1).numpy()
    position = (values[np.isfinite(values)] - lo) * bins / (hi - lo)
    on_edge = int((np.abs(position - np.round(position)) < 1e-9).sum())
    assert np.abs(ref[3:].numpy() - counts).sum() <= 2 * on_edge


@pytest.mark.parametrize("impl", IMPLS)
def test_tensor_histogram_of_one_value_widens_the_range_as_numpy_does(impl):
    x = torch.full((13,), 2.0)
    x[4] = float("nan")
    got = tensor_histogram(x.to(device_for(impl)), 4, impl=impl).cpu()
    lo, hi, counts = numpy_histogram(x, 4)
    assert got.tolist()[:3] == [lo, hi, 1.0] == [1.5, 2.5, 1.0]
    assert got[3:].tolist() == counts.tolist() == [0, 0, 12, 0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 5, 20_000])
def test_tensor_histogram_of_nothing_finite_has_no_range_and_empty_bins(impl, n):
    x = torch.full((n,), float("nan"))
    x[::2] = float("inf")
    got = tensor_histogram(x.to(device_for(impl)), 5, impl=impl).cpu()
    assert dict(zip(HISTOGRAM_HEAD, got[:3].tolist(), strict=True))["nonfinite"] == n
    assert torch.isnan(got[:2]).all() and (got[3:] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_tensor_histogram_puts_the_maximum_in_the_last_bin_and_reads_strided_tensors(impl):
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).T  # not contiguous
    got = tensor_histogram(x.to(device_for(impl)), 4, impl=impl).cpu()
    assert got.tolist() == [0.0, 11.0, 0.0, 3.0, 3.0, 3.0, 3.0]  # bins of width 2.75


def test_tensor_histogram_rejects_bad_arguments():
    with pytest.raises(TypeError, match="floating-point"):
        tensor_histogram(torch.arange(4))
    for bins in (0, 1025, 2.5, True):
        with pytest.raises(ValueError, match="bins must be an int from 1 to 1024"):
            tensor_histogram(torch.zeros(4), bins)


@pytest.mark.parametrize("impl", ["torch", "numba"])
@pytest.mark.parametrize("shape", [(1, 1), (64, 48), (7, 3, 3, 3)])
def test_spectral_norm_by_power_iteration_matches_svd(impl, shape):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g)
    flat = w.reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    s = torch.linspace(2.5, 1.0, s.numel())
    s[0] = 5.0  # a clear spectral gap: the error shrinks by 4x per iteration
    w = (u * s) @ vh
    sigma, v = spectral_norm(w.reshape(shape), iterations=60, impl=impl)
    assert float(sigma) == pytest.approx(spectral_norm_reference(w), rel=1e-5)
    warm, _ = spectral_norm(w.reshape(shape), iterations=2, v=v, impl=impl)
    assert float(warm) == pytest.approx(float(sigma), rel=1e-5)


def test_auto_on_cuda_sends_what_triton_does_slower_to_torch(monkeypatch):
    # The widths measured on an H100 (benchmarks/RESULTS.md): 16-bit up to 256, fp32 up to 64.
    gm = importlib.import_module("probescope.kernels.grid_mlp")  # the module, not the function
    monkeypatch.setattr(gm, "choose_impl", lambda op, device, impl: "triton" if impl == "auto" else impl)
    assert gm.fused_path(make_mlp((2, 64, 64, 3))) == "triton"
    assert gm.fused_path(make_mlp((2, 128, 3))) == "torch"
    assert gm.fused_path(make_mlp((2, 256, 256, 7), dtype=torch.bfloat16)) == "triton"
    assert gm.fused_path(make_mlp((2, 1024, 10), dtype=torch.float16)) == "torch"
    assert gm.fused_path(make_mlp((2, 1024, 10)), impl="triton") == "triton"


@pytest.mark.parametrize("impl", IMPLS)
def test_grid_mlp_follows_weights_changed_in_place_between_frames(poisoned, impl):
    # A shadow model's weights are overwritten in place every frame: nothing may be stale.
    model = make_mlp((2, 24, 24, 24, 5), "relu").to(device_for(impl))
    grid = random_grid(2, 11, 7)
    first = grid_mlp(model, grid, impl=impl).clone()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5).add_(0.1)
    second = grid_mlp(model, grid, impl=impl)
    reference = grid_mlp_reference(FusableMLP.from_module(model), grid)
    assert max_error(second, reference) <= PROB_TOL[torch.float32]
    assert max_error(first, reference) > 0.01  # the change is visible in the map


@pytest.mark.parametrize("wrap", ["torch.compile", "DataParallel", "both"])
def test_an_mlp_behind_compile_or_data_parallel_still_fuses(wrap):
    # Wrappers that change how a model runs, not what it computes: the fused kernel sees through.
    inner = make_mlp((2, 16, 16, 3), "tanh")
    model = {
        "torch.compile": lambda: torch.compile(inner),  # lazy: nothing compiles here
        "DataParallel": lambda: nn.DataParallel(inner),
        "both": lambda: torch.compile(nn.DataParallel(inner)),
    }[wrap]()
    mlp = FusableMLP.from_module(model)
    assert mlp.weights[0] is inner[0].weight and mlp.activations == ("tanh", "tanh", "identity")
    grid = random_grid(2, 7, 5)
    assert max_error(grid_mlp(model, grid), grid_mlp_reference(FusableMLP.from_module(inner), grid)) <= 1e-5


# A model whose last layer already makes probabilities (BCELoss behind a Sigmoid, a Keras-style
# Softmax): "auto" takes them as they are instead of squashing them a second time.
FINAL_LAYERS = {
    "sigmoid, one output": ((2, 12, 1), nn.Sigmoid(), lambda y: torch.cat([1 - y, y], -1)),
    "sigmoid, multi-label": ((2, 12, 3), nn.Sigmoid(), lambda y: y),
    "softmax": ((2, 12, 12, 4), nn.Softmax(dim=-1), lambda y: y),
    "log-softmax": ((2, 12, 4), nn.LogSoftmax(dim=1), torch.exp),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(FINAL_LAYERS))
def test_auto_output_takes_a_models_own_probabilities_as_they_are(poisoned, impl, case):
    widths, last, expected = FINAL_LAYERS[case]
    model = nn.Sequential(*make_mlp(widths, "relu"), last).to(device_for(impl))
    grid = random_grid(2, 9, 7)
    with torch.no_grad():
        module_out = model(grid.points().to(device_for(impl)))
    want = expected(module_out).reshape(7, 9, -1)
    assert max_error(grid_mlp(model, grid, impl=impl), want) <= 1e-5
    assert max_error(grid_mlp(model, grid, "raw", impl=impl), module_out.reshape(7, 9, -1)) <= 1e-5
    # asked for explicitly, a softmax is a softmax of the module's outputs, whatever they are
    assert (
        max_error(
            grid_mlp(model, grid, "softmax", impl=impl), torch.softmax(module_out, -1).reshape(7, 9, -1)
        )
        <= 1e-5
    )


def test_what_a_models_outputs_are_is_read_from_its_last_layer():
    from probescope.kernels import final_output_kind

    assert final_output_kind(make_mlp((2, 8, 3))) == "logits"
    assert (
        final_output_kind(nn.Sequential(nn.Linear(2, 1), nn.Sigmoid(), nn.Dropout(0.2).eval())) == "sigmoid"
    )
    assert (
        final_output_kind(torch.compile(nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Softmax(-1)))))
        == "softmax"
    )
    assert final_output_kind(nn.Sequential(nn.Linear(2, 3), nn.Softmax(dim=0))) == "logits"  # over the batch
    assert (
        final_output_kind(WrappedModule(nn.Sequential(nn.Linear(2, 1), nn.Sigmoid()))) == "logits"
    )  # opaque
    with pytest.raises(NotFusableError, match="follows a softmax"):
        FusableMLP.from_module(nn.Sequential(nn.Linear(2, 3), nn.Softmax(-1), nn.Linear(3, 3)))


def test_prediction_probe_takes_a_sigmoid_models_probabilities_as_they_are():
    from probescope.probes import PredictionProbe

    torch.manual_seed(0)
    x = torch.randn(40, 2)
    y = (x[:, 0] > 0).float()
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    probe = PredictionProbe(x, y)
    probe.attach(model)
    frame = probe.evaluate(model, None)
    with torch.no_grad():
        p = model(x)[:, 0].double()
    assert probe.task == "binary"
    key = next(k for k in frame if k.startswith("prob"))
    assert torch.allclose(torch.as_tensor(frame[key]).double().reshape(-1)[: len(p)], p, atol=1e-6)


def test_a_triton_grid_frame_costs_five_device_ops_besides_its_kernel(monkeypatch):
    # Each op a frame launches is host time on the probe thread (and a lock taken from the
    # training thread): the packed weights are one multi-tensor copy, the plane four ops.
    pytest.importorskip("triton")
    from torch.utils._python_dispatch import TorchDispatchMode

    import probescope.kernels._triton.grid_mlp as tg

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    device = device_for("triton")
    if device.type != "cuda" and not triton_interpreting():
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    monkeypatch.setattr(tg, "_launch", lambda *args: None)
    model = make_mlp((2, 32, 32, 32, 7)).to(device)
    grid = random_grid(2, 8, 8)
    grid_mlp(model, grid, impl="triton")  # buffers allocated, tables copied: once
    with Ops() as ops:
        grid_mlp(model, grid, impl="triton")
    # ops that only make a view or an empty tensor launch nothing on a GPU
    free = {"empty", "view", "alias", "detach", "permute", "select", "t", "transpose", "slice"}
    assert [n for n in ops.names if n not in free] == ["_foreach_copy_", "_to_copy", "mm", "add_", "copy_"]


# ---------------------------------------------------------------- MLPs with a forward of their own


class FunctionalMLP(nn.Module):
    """The common hand-written style: functional activations between Linear attributes."""

    def __init__(self, d=3, hidden=24, classes=5):
        super().__init__()
        self.fc1, self.fc2, self.out = (
            nn.Linear(d, hidden),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, classes),
        )

    def forward(self, x):
        x = F.leaky_relu(self.fc1(x), 0.2)
        x = torch.tanh(self.fc2(x))
        return self.out(x)


class Delegating(nn.Module):
    """A LightningModule's shape: forward calls one nn.Sequential (plus a Dropout, off in eval)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.drop = net, nn.Dropout(0.3)

    def forward(self, x):
        return self.net(self.drop(x))


class MethodsMLP(nn.Module):
    """Tensor methods and keyword arguments, ending in probabilities."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 16), nn.Linear(16, 16)
        self.c, self.d = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = F.gelu(self.a(x), approximate="tanh")
        x = self.b(x).relu()
        x = F.silu(self.c(x), inplace=False)
        return self.d(x).softmax(dim=-1)


class LossAndLogits(nn.Module):
    """As a model trained by Hugging Face's Trainer: keyword labels, a mapping of outputs."""

    def __init__(self):
        super().__init__()
        self.net = make_mlp((2, 12, 12, 3), "relu")

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def custom_forward_models():
    torch.manual_seed(4)
    return {
        "mapping": (LossAndLogits(), ("relu", "relu", "identity"), "logits"),
        "functional": (FunctionalMLP(), ("leaky_relu", "tanh", "identity"), "logits"),
        "delegating": (
            Delegating(make_mlp((3, 20, 20, 5), "gelu")).eval(),
            ("gelu", "gelu", "identity"),
            "logits",
        ),
        "methods": (MethodsMLP(), ("gelu_tanh", "relu", "silu", "identity"), "softmax"),
    }


@pytest.mark.parametrize("name", ["functional", "delegating", "methods", "mapping"])
def test_an_mlp_with_a_forward_of_its_own_fuses_and_draws_the_map_of_its_forward(name):
    """Read by torch.fx: the chain of layers its forward applies; the fused map is the map of
    the module's own forward on the grid's points (fp32: 1e-5 on probabilities)."""
    model, activations, final = custom_forward_models()[name]
    mlp = FusableMLP.from_module(model)
    assert mlp.activations == activations and mlp.final == final
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(w is p for w, p in zip(mlp.weights, linears, strict=True))  # the module's own weights
    grid = random_grid(mlp.in_features, 23, 9)
    assert not fused_path(model).startswith("module forward")
    probs = grid_mlp(model, grid)
    assert max_error(probs, module_forward_on_grid(model, grid)) <= 1e-5
    assert final_output_kind(model) == final


def test_a_traced_chain_ending_in_softmax_takes_its_outputs_as_probabilities():
    torch.manual_seed(5)

    class SoftmaxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 12), nn.Linear(12, 3)

        def forward(self, x):
            return F.softmax(self.b(torch.relu(self.a(x))), dim=1)

    model = SoftmaxHead()
    mlp = FusableMLP.from_module(model)
    assert mlp.activations == ("relu", "identity") and mlp.final == "softmax"
    assert final_output_kind(model) == "softmax"
    grid = random_grid(2, 15, 8)
    assert max_error(grid_mlp(model, grid), module_forward_on_grid(model, grid)) <= 1e-5


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 3)

    def forward(self, x):
        return self.b(x + torch.relu(self.a(x)))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else -self.a(x)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3)

    def forward(self, x, scale):
        return self.a(x) * scale


class WithConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.a = nn.Conv1d(1, 1, 1), nn.Linear(2, 3)

    def forward(self, x):
        return self.a(x)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3)

    def forward(self, x):
        return F.dropout(self.a(x), 0.5, self.training)


@pytest.mark.parametrize(
    "model, reason",
    [
        (Residual(), "not a chain"),
        (Branching(), r"not a chain .*sum"),
        (TwoInputs(), "fails on inputs"),
        (WithConv(), "holds Conv1d"),
        (FunctionalDropout(), r"not a chain .*dropout"),
        (WrappedModule(make_mlp((2, 8, 3))), r"not a chain .*add"),
    ],
    ids=["residual", "data-dependent branch", "two inputs", "a convolution", "functional dropout", "an op"],
)
def test_a_forward_that_is_not_a_chain_of_layers_takes_the_fallback_with_its_reason(model, reason):
    with pytest.raises(NotFusableError, match=reason):
        FusableMLP.from_module(model)
    assert fused_path(model).startswith("module forward")
    if not isinstance(model, TwoInputs):  # the same map through the module's own forward
        model.eval()
        grid = random_grid(2, 6, 5)
        np.testing.assert_allclose(
            grid_mlp(model, grid, output="raw").numpy(),
            model(grid.points()).detach().reshape(5, 6, -1).numpy(),
            atol=1e-6,
        )


def test_a_structure_is_read_once_and_its_answer_kept_for_every_frame(monkeypatch):
    module = importlib.import_module("probescope.kernels.mlp")

    monkeypatch.setattr(module, "_RECIPES", {})
    calls = []
    trace = module._trace_chain
    monkeypatch.setattr(module, "_trace_chain", lambda m: calls.append(m) or trace(m))
    good, bad = FunctionalMLP(), Residual()
    for _ in range(3):
        FusableMLP.from_module(good)
        with pytest.raises(NotFusableError):
            FusableMLP.from_module(bad)
    assert calls == [good, bad]
    layers = module.traced_layers(good)
    assert module.traced_layers(good) is layers  # resolved once per instance, not every frame
    twin = FunctionalMLP()  # the same structure (a snapshot's shadow copy): not run again
    assert FusableMLP.from_module(twin).weights[0] is twin.fc1.weight  # its own weights
    assert calls == [good, bad]
    twin.train(False)  # another mode is another structure: a functional dropout may differ
    FusableMLP.from_module(twin)
    assert calls == [good, bad, twin]


def test_the_chain_is_read_in_the_reading_thread_only(monkeypatch):
    """The reading forward records torch calls through a TorchFunctionMode, which belongs to
    its thread: a training step on another thread at the same moment runs as it would."""
    import threading

    module = importlib.import_module("probescope.kernels.mlp")

    monkeypatch.setattr(module, "_RECIPES", {})
    entered, release = threading.Event(), threading.Event()

    class Slow(FunctionalMLP):
        def forward(self, x):
            entered.set()
            release.wait(10)
            return super().forward(x)

    slow = Slow()
    reader = threading.Thread(target=lambda: FusableMLP.from_module(slow))
    reader.start()
    assert entered.wait(10)
    torch.manual_seed(0)
    trained = FunctionalMLP()  # a step here, while the reader's mode is active in its thread
    loss = trained(torch.randn(8, 3)).square().mean()
    loss.backward()
    assert trained.fc1.weight.grad is not None and torch.isfinite(loss)
    release.set()
    reader.join(10)
    assert not reader.is_alive()
    assert FusableMLP.from_module(slow).activations == ("leaky_relu", "tanh", "identity")


def test_a_model_of_other_layers_is_walked_once_not_at_every_frame(monkeypatch):
    """The fallback path asks at every frame whether the model fuses: a model holding other
    layers (a CNN, a transformer) is not walked module by module each time."""
    module = importlib.import_module("probescope.kernels.mlp")
    walks = []
    odd_layers = module._odd_layers
    monkeypatch.setattr(module, "_odd_layers", lambda m: walks.append(m) or odd_layers(m))
    model = WithConv()
    for _ in range(4):
        assert (
            fused_path(model)
            == "module forward (WithConv has its own forward and holds Conv1d; only MLPs fuse)"
        )
    assert walks == [model]
