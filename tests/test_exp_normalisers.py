"""Mechanics of chapter 19's experiments (bnlib/experiments/normalisers.py)."""
from __future__ import annotations

import pytest
import torch

from bnlib import experiments
from bnlib.analysis import GridEdgeError
from bnlib.config import override
from bnlib.data import Split, load
from bnlib.experiments.normalisers import (ARMS, NormalisersConfig, NormCNNSpec, StepTimeConfig,
                                           finals, lr_grid, mode_accuracies,
                                           normaliser_step_time, normalisers_batch_size, plot)
from bnlib.nn import BatchNorm1d, GhostBatchNorm
from bnlib.norms import BatchRenorm1d, GroupNorm, SkipInit, WSConv1d

DATA = load("mnist1d", preprocessing="standardized").images()


@pytest.mark.parametrize("arm", ARMS)
def test_spec_builds_every_arm_with_paired_init(arm):
    net = NormCNNSpec(channels=(8, 8), norm=arm, ghost_size=2, renorm_steps=(3, 4)).build(0, DATA)
    assert net.train()(DATA.train.x[:4]).shape == (4, 10)
    kinds = {type(m) for m in net.modules()}
    expect = {"batch": BatchNorm1d, "ghost": GhostBatchNorm, "renorm": BatchRenorm1d,
              "group": GroupNorm, "layer": GroupNorm, "ws+group": WSConv1d, "skipinit": SkipInit}
    if arm in expect:
        assert expect[arm] in kinds
    if arm == "ghost":
        assert net.blocks[0].norm.virtual_batch_size == 2
    if arm == "renorm":
        assert (net.blocks[0].norm.warmup_steps, net.blocks[0].norm.ramp_steps) == (3, 4)
    if arm == "layer":
        assert all(m.num_groups == 1 for m in net.modules() if isinstance(m, GroupNorm))
    plain = NormCNNSpec(channels=(8, 8), norm="group").build(0, DATA)
    if arm == "ws+group":  # the same initial weights as the GroupNorm arm
        torch.testing.assert_close(net.blocks[0].layer.weight, plain.blocks[0].layer.weight)
    if arm == "skipinit":  # every block after the first is the identity at init
        x = torch.randn(2, 8, 40)
        torch.testing.assert_close(net.blocks[1](x), x)
    with pytest.raises(ValueError, match="unknown normaliser"):
        NormCNNSpec(norm="instance").build(0, DATA)


def test_mode_accuracies_equal_for_groupnorm_and_keep_running_stats():
    torch.manual_seed(0)
    split = Split(torch.randn(10, 1, 40), torch.randint(0, 10, (10,)))
    gn = NormCNNSpec(channels=(8,), norm="group").build(0, DATA)
    a, b = mode_accuracies(gn, split, 4)
    assert a == b
    bn = NormCNNSpec(channels=(8,), norm="batch").build(0, DATA)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    mode_accuracies(bn, split, 4)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_tiny_run_tunes_per_arm_and_plots():
    cfg = override(NormalisersConfig(), {"norms": ("batch", "group"), "batch_sizes": (4, 8),
                                         "every_batch": ("batch",), "model.channels": (4,),
                                         "train.steps": 2, "train.eval_every": 2, "seeds": (0, 1),
                                         "n_train": 64, "gap_examples": 16, "device": "cpu",
                                         "tuning.allow_edge": True, "grids": {"group @4": (0.01, 0.02)}})
    df = normalisers_batch_size(cfg)
    f = finals(df)
    assert set(f["arm"]) == {"batch @4", "group @4", "batch @8"} and len(f) == 6
    tuning = df[df["kind"] == "tuning"]
    assert set(tuning["seed"]) == set(cfg.tuning.seeds) and not set(f["seed"]) & set(cfg.tuning.seeds)
    assert set(tuning.loc[tuning["arm"] == "group @4", "lr"]) == {0.01, 0.02} == set(lr_grid(cfg, "group @4"))
    g = f[f["arm"] == "group @4"]
    assert (g["gap_acc_eval_mode"] == g["gap_acc_train_mode"]).all()   # GN has no batch statistics
    assert len(plot(df).axes) == 1
    with pytest.raises(GridEdgeError):
        normalisers_batch_size(override(cfg, {"tuning.allow_edge": False}))
    with pytest.raises(ValueError, match="norms"):
        normalisers_batch_size(override(cfg, {"norms": ("bogus",)}))


def test_step_time_and_registration():
    df = normaliser_step_time(override(StepTimeConfig(), {"norms": ("none", "batch"), "repeats": 2,
                                                          "model.channels": (4,)}))
    assert len(df) == 4 and (df["seconds"] >= 0).all()
    assert experiments.get("normalisers_batch_size").chapter == "19_normalisers"
    assert experiments.get("normaliser_step_time").config is StepTimeConfig
    full = NormalisersConfig.full()
    assert full.batch_sizes == (2, 4, 8, 16, 32, 64, 128) and len(full.seeds) >= 8
    assert not set(full.seeds) & set(full.tuning.seeds)
