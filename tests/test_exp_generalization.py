"""Mechanics of chapter 5's experiments (bnlib/experiments/generalization.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bnlib import data as datasets
from bnlib import experiments
from bnlib.experiments.generalization import (ControlsConfig, GeneralizationConfig, GhostBatchNorm1d,
                                              final_table, fit_mlp, generalization,
                                              generalization_controls, use_ghost_batchnorm)
from bnlib.models import mlp
from bnlib.nn import BatchNorm1d


def test_ghost_bn_with_one_virtual_batch_is_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(32, 5) * 3 + 1
    ghost, bn = GhostBatchNorm1d(5, virtual_batch_size=32), BatchNorm1d(5)
    torch.testing.assert_close(ghost(x), bn(x))
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    ghost.eval(), bn.eval()
    torch.testing.assert_close(ghost(x), bn(x))


def test_ghost_bn_normalises_each_virtual_batch_on_its_own():
    torch.manual_seed(1)
    x = torch.randn(32, 4) * 2 + 5
    ghost = GhostBatchNorm1d(4, virtual_batch_size=8)
    out = ghost(x)
    for i in range(4):
        chunk = out[8 * i:8 * (i + 1)]
        torch.testing.assert_close(chunk.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(chunk.var(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    assert int(ghost.num_batches_tracked) == 4  # every virtual batch updates the running stats
    # a ragged batch: 30 examples -> 3 chunks of 10, none of size 1
    assert ghost(torch.randn(30, 4)).shape == (30, 4)
    out.sum().backward()  # gradients flow
    assert ghost.weight.grad is not None


def test_ghost_bn_errors():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm1d(4, virtual_batch_size=1)
    with pytest.raises(ValueError, match="at least 2"):
        GhostBatchNorm1d(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="no bnlib BatchNorm1d"):
        use_ghost_batchnorm(nn.Linear(3, 3))


def test_use_ghost_batchnorm_swaps_every_bn():
    net = mlp(6, 3, depth=2, width=8, norm="batch")
    use_ghost_batchnorm(net, 4)
    norms = [b.norm for b in net.blocks]
    assert all(isinstance(n, GhostBatchNorm1d) and n.virtual_batch_size == 4 for n in norms)
    assert net(torch.randn(16, 6)).shape == (16, 3)


def test_fit_mlp_ghost_and_full_batch():
    ds = datasets.load("wine")
    df = fit_mlp(seed=0, data=ds, lr=0.1, steps=3, depth=1, width=8, norm="batch", ghost=4,
                 batch_size=16, device="cpu")
    assert set(df["split"]) == {"batch", "train", "val", "test"}
    df = fit_mlp(seed=0, data=ds, lr=0.1, steps=2, depth=1, width=8, full_batch=True, device="cpu")
    assert df["step"].max() == 2
    with pytest.raises(ValueError, match="ghost"):
        fit_mlp(seed=0, data=ds, lr=0.1, steps=2, norm="none", ghost=4)


def test_generalization_tiny_and_final_table():
    cfg = dataclasses.replace(GeneralizationConfig(), datasets=("wine",), lrs=(0.05, 0.1), steps=3,
                              depth=1, width=8, seeds=(0, 1), device="cpu")
    df = generalization(cfg)
    assert {"arm", "seed", "lr", "dataset"} <= set(df.columns)
    table = final_table(df)
    assert len(table) == 2 * 2  # arms x seeds, one LR each
    assert {"accuracy_test", "loss_train", "gap"} <= set(table.columns)
    with pytest.raises(ValueError):
        generalization(dataclasses.replace(cfg, lrs=()))


def test_controls_tiny_and_validation():
    cfg = dataclasses.replace(ControlsConfig(), n_train=60, lrs=(0.1,), steps=2, depth=1, width=8,
                              batch_size=16, ghost_batch=4, seeds=(0,), device="cpu")
    df = generalization_controls(cfg)
    assert set(df["arm"]) == {"plain", "plain + dropout", "BN", "BN, full batch", "ghost BN (4)"}
    with pytest.raises(ValueError, match="ghost_batch"):
        generalization_controls(dataclasses.replace(cfg, ghost_batch=16))
    with pytest.raises(ValueError, match="unknown control arms"):
        generalization_controls(dataclasses.replace(cfg, arms=("nope",)))


def test_registered():
    names = experiments.names()
    assert {"generalization", "generalization_controls"} <= set(names)
    assert experiments.get("generalization").chapter == "05_generalization"
    GeneralizationConfig.full(), ControlsConfig.full()
