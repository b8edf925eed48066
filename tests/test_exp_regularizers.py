"""Mechanics of chapter 15's experiments (bnlib/experiments/regularizers.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bnlib import data as datasets
from bnlib import experiments
from bnlib.experiments.regularizers import (GridConfig, ScalingConfig, VarianceShiftConfig,
                                            WeightDecayConfig, WeightNormTracker, dropout_disabled,
                                            dropout_variance_shift, grid_arms,
                                            recompute_stats_without_dropout, regularizer_grid,
                                            variance_ratio, wd_weight_scaling, weight_decay_bn,
                                            weight_scaling_check)
from bnlib.models import mlp


def _net(**kw):
    torch.manual_seed(0)
    return mlp(6, 3, depth=2, width=16, norm="batch", **kw)


def test_dropout_disabled_restores_p():
    net = _net(dropout=0.5)
    x = torch.randn(32, 6)
    net.train()
    with dropout_disabled(net):
        a, b = net(x), net(x)
        torch.testing.assert_close(a, b)  # no random masks: deterministic in train mode
    assert all(m.p == 0.5 for m in net.modules() if isinstance(m, nn.Dropout))


def test_variance_shift_and_its_fix():
    net = _net(dropout=0.5, dropout_at="blocks")
    x = torch.randn(512, 6)
    net.train()
    with torch.no_grad():
        for _ in range(200):  # running statistics collected with dropout on
            net(x[torch.randint(0, 512, (64,))])
    assert variance_ratio(net, x) < 0.9  # dropout inflated the training-time variance
    recompute_stats_without_dropout(net, x, batch_size=512)
    assert not net.training
    # one batch = exact statistics, up to the biased (train) vs unbiased (eval) variance, 1 - 1/512
    assert variance_ratio(net, x) == pytest.approx(1.0, abs=5e-3)
    assert all(m.p == 0.5 for m in net.modules() if isinstance(m, nn.Dropout))
    with pytest.raises(ValueError):
        variance_ratio(net, x, bn=net.head)


def test_weight_scaling_check_exact():
    net = _net()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    w0 = net.blocks[1].layer.weight.detach().clone()
    r = weight_scaling_check(net, x, y, net.blocks[1].layer, factor=10.0)
    assert r["loss_scaled"] == pytest.approx(r["loss"], rel=1e-4)
    assert r["grad_ratio"] == pytest.approx(10.0, rel=1e-3)
    assert abs(r["cos_w_grad"]) < 1e-4
    assert torch.equal(net.blocks[1].layer.weight, w0)  # restored exactly
    head = weight_scaling_check(net, x, y, net.head, factor=10.0)
    assert abs(head["loss_scaled"] - head["loss"]) > 1e-3  # no BN after the classifier
    with pytest.raises(ValueError):
        weight_scaling_check(net, x, y, net.head, factor=0.0)


def test_weight_norm_tracker():
    ds = datasets.load("wine")
    from bnlib.train import train
    net = mlp(ds.num_features, 3, depth=2, width=8, norm="batch")
    tr = WeightNormTracker(every=2)
    train(net, ds, steps=4, lr=0.1, batch_size=16, callbacks=[tr], eval_splits=(), device="cpu")
    f = tr.frame()
    assert sorted(set(f["step"])) == [0, 2, 4] and set(f["layer"]) == {1, 2}
    assert (f["effective_lr"] - 0.1 / f["weight_norm"] ** 2).abs().max() < 1e-12
    with pytest.raises(ValueError):
        WeightNormTracker(every=0)


def test_tiny_experiments():
    vs = dropout_variance_shift(dataclasses.replace(VarianceShiftConfig(), dataset="wine", depth=2,
                                                    width=8, steps=3, batch_size=16, seeds=(0,),
                                                    device="cpu"))
    assert len(vs) == 3 * 3 and set(vs["stats"]) == {"running (as trained)", "recomputed, dropout on",
                                                     "recomputed, dropout off"}
    sc = wd_weight_scaling(dataclasses.replace(ScalingConfig(), dataset="wine", depth=2, width=8,
                                               steps=2, probe_batch=32, seeds=(0,), device="cpu"))
    assert len(sc) == 2
    wd = weight_decay_bn(dataclasses.replace(WeightDecayConfig(), dataset="wine", width=8, steps=4,
                                             every=2, batch_size=16, seeds=(0,), device="cpu"))
    assert set(wd["weight_decay"]) == {0.0, 5e-4, 5e-3} and "test_accuracy" in wd
    cfg = dataclasses.replace(GridConfig(), dataset="wine", n_train=60, lrs=(0.1,), width=8, steps=2,
                              batch_size=16, seeds=(0,), device="cpu")
    g = regularizer_grid(cfg)
    assert set(g["arm"]) == set(grid_arms(cfg)) and len(grid_arms(cfg)) == 8


def test_config_validation():
    with pytest.raises(ValueError):
        dropout_variance_shift(dataclasses.replace(VarianceShiftConfig(), p=0.0))
    with pytest.raises(ValueError):
        weight_decay_bn(dataclasses.replace(WeightDecayConfig(), weight_decays=(-1.0,)))
    with pytest.raises(ValueError):
        regularizer_grid(dataclasses.replace(GridConfig(), dropout=0.0))
    with pytest.raises(ValueError):
        wd_weight_scaling(dataclasses.replace(ScalingConfig(), depth=1))


def test_registered():
    for name in ("dropout_variance_shift", "wd_weight_scaling", "weight_decay_bn", "regularizer_grid"):
        assert experiments.get(name).chapter == "15_regularizers"
    VarianceShiftConfig.full(), ScalingConfig.full(), WeightDecayConfig.full(), GridConfig.full()
