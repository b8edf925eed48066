"""Mechanics of chapter 5's experiments (bnlib/experiments/generalization.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlib import experiments
from bnlib.config import override
from bnlib.nn import GhostBatchNorm, GhostBatchNorm1d, use_ghost_batchnorm
from bnlib.experiments.generalization import (ControlsConfig, GeneralizationConfig,
                                              final_wide, generalization,
                                              generalization_controls, matched_gap)
from bnlib.models import MLPSpec, mlp
from bnlib.nn import BatchNorm1d

TINY = {"datasets": ("wine",), "train.steps": 4, "train.eval_every": 2, "model.width": 8,
        "model.depth": 1, "seeds": (0, 1), "tuning.seeds": (10,), "tuning.allow_edge": True,
        "tuning.grid": (0.05, 0.2)}


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
    assert int(ghost.num_batches_tracked) == 4
    assert ghost(torch.randn(30, 4)).shape == (30, 4)  # ragged: 3 chunks of 10
    out.sum().backward()
    assert ghost.weight.grad is not None


def test_ghost_bn_errors_and_spec():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm1d(4, virtual_batch_size=1)
    with pytest.raises(ValueError, match="at least 2"):
        GhostBatchNorm1d(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="no bnlib BatchNorm1d"):
        use_ghost_batchnorm(nn.Linear(3, 3))
    from bnlib import data
    ds = data.load("wine")
    ghost = MLPSpec(depth=2, width=8, norm="ghost", ghost_size=4).build(0, ds)  # the ghost arm
    plain = MLPSpec(depth=2, width=8, norm="batch").build(0, ds)
    assert all(isinstance(b.norm, GhostBatchNorm) and b.norm.virtual_batch_size == 4
               and b.norm.running_stats == "each" for b in ghost.blocks)
    torch.testing.assert_close(ghost.blocks[0].layer.weight, plain.blocks[0].layer.weight)
    net = mlp(6, 3, depth=2, width=8, norm="batch")
    use_ghost_batchnorm(net, 4)
    assert net(torch.randn(16, 6)).shape == (16, 3)


def test_generalization_tiny_final_wide_and_matched_gap():
    df = generalization(override(GeneralizationConfig(), TINY))
    assert set(df.loc[df["kind"] == "tuning", "split"]) == {"batch", "val"}
    assert set(df.loc[df["kind"] == "tuning", "step"]) == {0, 4}  # val at the end only
    table = final_wide(df)
    assert len(table) == 2 * 2  # arms x reported seeds
    assert {"accuracy_test", "loss_train", "gap", "lr"} <= set(table.columns)
    m = matched_gap(df, 0.0)
    assert m["reached"].all() and (m["step"] == 0).all()
    assert matched_gap(df, 1.01)["accuracy_test"].isna().all()  # never reached: NaN, not a number
    with pytest.raises(ValueError):
        generalization(override(GeneralizationConfig(), {**TINY, "datasets": ()}))


def test_controls_tiny():
    cfg = override(ControlsConfig(), {**TINY, "n_train": 60, "train.batch_size": 16,
                                      "ghost_batch": 4, "dropout_grid": (0.1, 0.5)})
    df = generalization_controls(cfg)
    table = final_wide(df)
    assert set(table["arm"]) == {"plain", "dropout", "BN", "BN + dropout", "BN, full batch", "ghost BN"}
    assert table.groupby("arm")["seed"].nunique().eq(2).all()
    lr = table.groupby("arm")["lr"].first()
    assert lr["ghost BN"] == lr["BN"] == lr["BN + dropout"] and lr["dropout"] == lr["plain"]
    assert table[table["arm"].str.contains("dropout")]["dropout"].isin([0.1, 0.5]).all()
    with pytest.raises(ValueError, match="ghost_batch"):
        generalization_controls(override(cfg, {"ghost_batch": 16}))


def test_registered():
    assert {"generalization", "generalization_controls"} <= set(experiments.names())
    assert experiments.get("generalization").chapter == "05_generalization"
    assert experiments.get("generalization_controls").chapter == "05b_dropout_and_noise"
    GeneralizationConfig.full(), ControlsConfig.full()
