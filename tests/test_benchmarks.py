"""The kernels suite's baselines compute what the ops compute: a speed-up over a baseline that
does less (or something else) would be a false figure."""

import numpy as np
import pytest
import torch

from benchmarks import kernels as suite
from probescope.kernels import (
    GridSpec,
    default_palette,
    ema_frames_reference,
    lds_weights_reference,
    probs_to_rgba_reference,
    smooth_1d_reference,
    tensor_stats_reference,
)
from probescope.kernels.grid_mlp import FusableMLP, grid_mlp_reference


@pytest.fixture
def g():
    return torch.Generator().manual_seed(3)


def test_naive_grid_baselines_give_the_reference_map():
    model = suite.build_mlp((2, 16, 16, 5), torch.float32, "cpu")
    grid = GridSpec.rectangle((-3.0, 3.0, -2.0, 2.0), 13, 7)
    ref = grid_mlp_reference(FusableMLP.from_module(model), grid).reshape(-1, 5).numpy()
    torch_way = suite.naive_torch(model, grid, torch.float32, "cpu")()
    np.testing.assert_allclose(torch_way.numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(suite.numpy_mlp(model, grid)(), ref, atol=1e-5)


def test_numpy_region_colours_like_the_reference_with_non_finite_pixels(g):
    probs = torch.softmax(3 * torch.randn(19, 11, 7, generator=g), -1)
    probs[2, 3, 1], probs[5, 0, 6] = float("nan"), float("inf")
    palette = default_palette(7)
    expected = probs_to_rgba_reference(probs, "region", palette).numpy()
    got = suite.numpy_region(probs.numpy(), palette.numpy())
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # float32 against float32
    np.testing.assert_array_equal(got[2, 3], [255, 0, 255, 255])


def test_numpy_frame_and_vector_baselines_match_the_references(g):
    frames = torch.rand(4, 9, 5, 7, generator=g)
    np.testing.assert_allclose(
        suite.numpy_ema(frames.numpy(), 0.3), ema_frames_reference(frames, 0.3), atol=1e-6
    )
    x = torch.randn(50_001, generator=g)
    np.testing.assert_allclose(suite.numpy_stats(x.numpy()), tensor_stats_reference(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(suite.numpy_lds(x.numpy(), 100), lds_weights_reference(x, bins=100), rtol=1e-5)
    window = suite.smoothing_window(31, "gaussian").numpy().astype(np.float32)
    np.testing.assert_allclose(
        np.convolve(x.numpy(), window, mode="same"), smooth_1d_reference(x, 31, "gaussian"), atol=1e-5
    )
