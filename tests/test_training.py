"""tsai's training-procedure callbacks in a plain loop: weights per sample, batch subsampling,
scheduled transform magnitudes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probescope import Callback, Monitor
from probescope.kernels import lds_weights
from probescope.training import (
    BatchSubsampler,
    TransformScheduler,
    WeightedPerSampleLoss,
    combine_scheds,
    lds_figure,
    sched_cos,
    sched_exp,
    sched_lin,
    sched_no,
)
from tests.conftest import train_steps


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 2, 6)])
def test_weighted_loss_is_the_weighted_mean_of_per_sample_losses(shape):
    g = torch.Generator().manual_seed(sum(shape))
    weights = torch.rand(40, generator=g) * 3
    index = torch.randint(0, 40, (shape[0],), generator=g)
    pred = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    got = WeightedPerSampleLoss(F.mse_loss, weights)(pred, target, index)
    per = ((pred - target) ** 2).reshape(shape[0], -1).mean(1)
    w = weights[index].double()
    want = (per * w).sum() / w.sum()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (g_got,) = torch.autograd.grad(got, pred)
    (g_want,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=0)


def test_weighted_loss_uses_a_copy_of_a_loss_module_and_numpy_indices():
    module = nn.CrossEntropyLoss()
    weights = np.array([1.0, 2.0, 0.5, 4.0])
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    index = np.array([3, 0, 2, 1])
    got = WeightedPerSampleLoss(module, weights)(logits, labels, index)
    w = torch.tensor(weights, dtype=torch.float32)[index]
    per = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(got, (per * w).sum() / w.sum())
    assert module.reduction == "mean"  # the caller's module is untouched


def test_lds_weighted_loss_weighs_rare_labels_more():
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(400, generator=g), 8 + 0.5 * torch.randn(20, generator=g)])
    weights = lds_weights(y, bins=30, kernel_size=5, sigma=2.0)
    loss = WeightedPerSampleLoss(F.l1_loss, weights)
    common, rare = torch.arange(0, 20), torch.arange(400, 420)
    ones = torch.ones(20)
    # The same error on every sample: the weighted mean is that error, whatever the weights ...
    assert float(loss(ones, torch.zeros(20), rare)) == pytest.approx(1.0)
    # ... but mixing the two groups, the rare group's error counts for more than its share.
    both = torch.cat([common, rare])
    errors = torch.cat([torch.zeros(20), ones])
    assert float(loss(errors, torch.zeros(40), both)) > 0.8
    assert float(weights[rare].mean()) > 5 * float(weights[common].mean())


def test_weighted_loss_refuses_what_it_cannot_weigh():
    with pytest.raises(TypeError, match="must take reduction='none'"):
        WeightedPerSampleLoss(lambda p, t: (p - t).abs().mean(), torch.ones(3))
    with pytest.raises(ValueError, match="finite, >= 0"):
        WeightedPerSampleLoss(F.mse_loss, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="3 indices for a batch of 2 samples"):
        WeightedPerSampleLoss(F.mse_loss, torch.ones(5))(torch.zeros(2), torch.zeros(2), [0, 1, 2])


def test_subsampler_draws_whole_samples_and_keeps_their_targets_and_indices():
    x = torch.arange(60.0).reshape(20, 3)
    y, index = torch.arange(20) * 10, torch.arange(100, 120)
    xs, ys, idx = BatchSubsampler(sample_pct=0.5, seed=1)(x, y, index)
    assert xs.shape == (10, 3)
    rows = (xs[:, 0] / 3).long()
    assert torch.equal(xs, x[rows]) and torch.equal(ys, y[rows]) and torch.equal(idx, index[rows])
    again = BatchSubsampler(sample_pct=0.5, seed=1)(x, y, index)
    assert all(torch.equal(a, b) for a, b in zip(again, (xs, ys, idx), strict=True))


@pytest.mark.parametrize("same_seq_len", [True, False])
def test_subsampler_draws_sorted_steps_of_the_last_axis(same_seq_len):
    x = torch.arange(2 * 3 * 10.0).reshape(2, 3, 10)
    y = torch.arange(2 * 10).reshape(2, 10)
    xs, ys = BatchSubsampler(step_pct=0.3, same_seq_len=same_seq_len, update_y=True, seed=4)(x, y)
    steps = (xs[0, 0] - x[0, 0, 0]).long()
    assert xs.shape[-1] == (10 if same_seq_len else 3)
    assert torch.equal(steps, steps.sort().values) and len(set(steps.tolist())) <= 3
    assert torch.equal(xs, x[..., steps]) and torch.equal(ys, y[..., steps])


def test_subsampler_draws_its_share_from_a_range_and_refuses_bad_shares():
    sub = BatchSubsampler(sample_pct=(0.2, 0.6), seed=0)
    sizes = {sub(torch.zeros(100, 2))[0].shape[0] for _ in range(50)}
    assert min(sizes) >= 20 and max(sizes) <= 60 and len(sizes) > 10
    with pytest.raises(ValueError, match="sample_pct"):
        BatchSubsampler(sample_pct=0)
    with pytest.raises(ValueError, match="give sample_pct, step_pct or both"):
        BatchSubsampler()


def test_annealers_follow_fastais_formulas():
    for pos in (0.0, 0.25, 0.5, 1.0):
        assert sched_lin(2, 4)(pos) == pytest.approx(2 + 2 * pos)
        assert sched_cos(2, 4)(pos) == pytest.approx(2 + (1 - math.cos(math.pi * pos)))
        assert sched_exp(1, 100)(pos) == pytest.approx(100**pos)
        assert sched_no(3)(pos) == 3
    f = combine_scheds([0.25, 0.75], [sched_lin(0, 1), sched_cos(1, 0)])
    assert f(0) == 0 and f(0.125) == pytest.approx(0.5) and f(0.25) == pytest.approx(1)
    assert f(0.625) == pytest.approx(0.5) and f(1.0) == pytest.approx(0)
    with pytest.raises(ValueError, match="sum to 1"):
        combine_scheds([0.5, 0.6], [sched_no(1), sched_no(2)])


class Jitter:
    def __init__(self, magnitude):
        self.magnitude = magnitude


def test_transform_scheduler_scales_magnitudes_per_step_and_restores_them(mlp, blobs):
    a, b, plain = Jitter(2.0), Jitter(0.5), object()
    scheduler = TransformScheduler(sched_lin(1.0, 0.0), [a, b, plain], total_steps=5)
    seen = []

    class Watch(Callback):  # what the next batch sees, after each step
        def after_step(self, monitor, **kwargs):
            seen.append(a.magnitude)

    with Monitor(mlp, [], callbacks=[scheduler, Watch()]) as monitor:
        assert a.magnitude == 2.0  # progress 0: multiplier 1
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 5)
    assert seen == pytest.approx([1.5, 1.0, 0.5, 0.0, 0.0])
    assert scheduler.multipliers == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert (a.magnitude, b.magnitude) == (2.0, 0.5)  # restored at close
    (line,) = scheduler.figure().axes[0].lines
    assert list(line.get_ydata()) == scheduler.multipliers
    with pytest.raises(ValueError, match="has a 'magnitude'"):
        TransformScheduler(sched_no(1), [plain], total_steps=3)


def test_lds_figure_draws_the_label_histogram_and_the_weight_per_bin():
    y = torch.cat([torch.zeros(90), torch.ones(10)])
    weights = lds_weights(y, bins=2, kernel_size=1)
    fig = lds_figure(y, weights, bins=2)
    left, right = fig.axes
    assert [p.get_height() for p in left.patches] == [90, 10]
    line = right.lines[0].get_ydata()
    assert line[1] / line[0] == pytest.approx(9.0, rel=1e-5)  # inverse frequency
    with pytest.raises(ValueError, match="100 labels but 3 weights"):
        lds_figure(y, torch.ones(3))
