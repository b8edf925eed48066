"""Mechanics of chapter 20's experiment (bnlib/experiments/shift.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from bnlib import experiments
from bnlib.experiments.shift import (ShiftConfig, _mixed_hook, adapt_batchnorm_stats,
                                     bn_under_shift, grouped_accuracy)
from bnlib.inference import batch_statistics, recompute_batchnorm_stats
from bnlib.models import CNN1d
from bnlib.nn import BatchNorm1d, batchnorm_layers


def _trained_net(seed: int = 0) -> CNN1d:
    """A CNN1d whose running statistics differ from the batch statistics of new data."""
    torch.manual_seed(seed)
    net = CNN1d(channels=4, layers=2)
    net.train()
    for _ in range(5):
        net(torch.randn(16, 1, 40) * 2 + 1)
    return net.eval()


def _outputs_with_hooks(net, x, group, w):
    handles = [bn.register_forward_hook(_mixed_hook(group, w)) for bn in batchnorm_layers(net)]
    try:
        return net(x)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def test_grouped_batch_statistics_equal_a_loop_over_batches():
    net = _trained_net()
    x = torch.randn(24, 1, 40) * 1.5 + 0.3
    for b in (1, 2, 8):
        with batch_statistics(net):
            ref = torch.cat([net(x[i:i + b]) for i in range(0, len(x), b)])
        torch.testing.assert_close(_outputs_with_hooks(net, x, b, 0.0), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_outputs_with_hooks(net, x, 8, 1.0), net(x), atol=1e-5, rtol=1e-5)
    # accuracies, including a ragged last batch (24 = 2·10 + 4), and the running statistics
    y = torch.randint(0, 10, (24,))
    with batch_statistics(net):
        ref = sum((net(x[i:i + 10]).argmax(1) == y[i:i + 10]).sum().item() for i in (0, 10, 20))
    assert grouped_accuracy(net, x, y, batch_size=10) == ref / 24
    assert grouped_accuracy(net, x, y, batch_size=5, prior=math.inf) == (net(x).argmax(1) == y).float().mean().item()
    assert not net.training
    with pytest.raises(ValueError):
        grouped_accuracy(net, x, y, batch_size=0)
    with pytest.raises(ValueError, match="prior"):
        grouped_accuracy(net, x, y, batch_size=2, prior=-1.0)


@torch.no_grad()
def test_prior_mixes_source_and_batch_statistics():
    bn = BatchNorm1d(3).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(8, 3, 5) * 3 + 2
    w = 16 / (16 + 8)                                   # N = 16, n = 8
    mean = w * bn.running_mean + (1 - w) * x.mean(dim=(0, 2))
    var = w * bn.running_var + (1 - w) * x.var(dim=(0, 2), unbiased=False)
    want = (x - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn.eps)
    torch.testing.assert_close(_outputs_with_hooks(bn, x, 8, w), want)


@torch.no_grad()
def test_adapt_batchnorm_stats_mixes_with_the_recomputed_statistics():
    net = _trained_net()
    x = torch.randn(64, 1, 40) + 0.7
    target = recompute_batchnorm_stats(copy.deepcopy(net), x)
    adapted = adapt_batchnorm_stats(copy.deepcopy(net), x, prior=0.0)
    for a, t in zip(batchnorm_layers(adapted), batchnorm_layers(target)):
        torch.testing.assert_close(a.running_mean, t.running_mean)
        torch.testing.assert_close(a.running_var, t.running_var)
    kept = adapt_batchnorm_stats(copy.deepcopy(net), x, prior=math.inf)
    for a, s in zip(batchnorm_layers(kept), batchnorm_layers(net)):
        torch.testing.assert_close(a.running_mean, s.running_mean)
    mixed = adapt_batchnorm_stats(copy.deepcopy(net), x, prior=64.0)   # N = n: half and half
    for a, s, t in zip(batchnorm_layers(mixed), batchnorm_layers(net), batchnorm_layers(target)):
        torch.testing.assert_close(a.running_var, (s.running_var + t.running_var) / 2)
    assert not mixed.training


def test_bn_under_shift_tiny_run():
    assert experiments.get("bn_under_shift").chapter == "20_shift"
    cfg = ShiftConfig(seeds=(0,), steps=3, channels=4, noise=(0.5,), contrast=(2.0,), offset=(1.0,),
                      severity_batch_sizes=(2,), sweep_conditions=(("offset", 1.0),),
                      test_batch_sizes=(1, 64), priors=(0.0, 16.0), device="cpu")
    df = bn_under_shift(cfg)
    assert set(df.columns) == {"seed", "shift", "level", "method", "batch_size", "prior", "accuracy"}
    assert set(df["method"]) == {"running", "recomputed", "adapted", "batch"}
    # 4 conditions × 3 whole-set methods + 4 × B=2 + offset's extra (1, 0), (1, 16), (64, 0), (64, 16)
    assert len(df) == 4 * 3 + 4 + 4
    assert df["accuracy"].between(0, 1).all()
    # contrast: with bias-free convolutions, batch statistics make it invisible
    b2 = df[(df["method"] == "batch") & (df["batch_size"] == 2)].set_index("shift")["accuracy"]
    assert b2["contrast"] == pytest.approx(b2["none"])
