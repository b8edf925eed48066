"""Mechanics of chapter 19's experiments (bnlib/experiments/normalisers.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bnlib import experiments
from bnlib.experiments.normalisers import (ARMS, NormalisersConfig, StepTimeConfig, load_mnist1d,
                                           mode_accuracies, norm_cnn, normaliser_step_time,
                                           normalisers_batch_size, plot)
from bnlib.nn import BatchNorm1d, BatchNorm2d
from bnlib.norms import BatchRenorm2d, GhostBatchNorm, GroupNorm, SkipInit, WSConv2d


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("dims,shape", [(1, (3, 1, 40)), (2, (3, 1, 28, 28))])
def test_norm_cnn_builds_every_arm(arm, dims, shape):
    torch.manual_seed(0)
    net = norm_cnn(arm, 1, 10, dims=dims, width=8, depth=2, groups=4, ghost_size=2)
    assert net.train()(torch.randn(*shape)).shape == (3, 10)
    kinds = {type(m) for m in net.modules()}
    expect = {"batch": BatchNorm1d if dims == 1 else BatchNorm2d, "ghost": GhostBatchNorm,
              "group": GroupNorm, "layer": GroupNorm, "ws+group": GroupNorm, "skipinit": SkipInit}
    if arm in expect:
        assert expect[arm] in kinds
    if arm == "renorm" and dims == 2:
        assert BatchRenorm2d in kinds
    if arm == "ws+group" and dims == 2:
        assert WSConv2d in kinds
    if arm == "layer":
        assert all(m.num_groups == 1 for m in net.modules() if isinstance(m, GroupNorm))


def test_norm_cnn_errors():
    with pytest.raises(ValueError, match="unknown arm"):
        norm_cnn("instance", 1, 10)
    with pytest.raises(ValueError, match="dims"):
        norm_cnn("batch", 1, 10, dims=3)


def test_skipinit_net_body_is_the_identity_at_init():
    net = norm_cnn("skipinit", 1, 10, dims=1, width=8, depth=3)
    blocks = [m for m in net if isinstance(m, SkipInit)]
    x = torch.randn(2, 8, 10)
    for b in blocks:
        torch.testing.assert_close(b(x), x)


def test_mode_accuracies_equal_for_groupnorm_and_keep_running_stats():
    torch.manual_seed(0)
    from bnlib.data import Split
    split = Split(torch.randn(10, 1, 40), torch.randint(0, 10, (10,)))
    gn = norm_cnn("group", 1, 10, dims=1, width=8, depth=1)
    a, b = mode_accuracies(gn, split, 4)
    assert a == b
    bn = norm_cnn("batch", 1, 10, dims=1, width=8, depth=1)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    mode_accuracies(bn, split, 4)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_mnist1d_loader_is_offline_and_standardised_with_training_stats():
    ds = load_mnist1d(num_samples=200)
    assert ds.input_shape == (1, 40) and ds.num_classes == 10
    assert ds.train.x.shape[1:] == (1, 40) and len(ds.test) == 40
    assert abs(float(ds.train.x.mean())) < 1e-5 and abs(float(ds.train.x.std(unbiased=False)) - 1) < 1e-4


def test_normalisers_batch_size_tiny_and_plot():
    cfg = dataclasses.replace(NormalisersConfig(), datasets=("mnist1d",), arms=("batch", "group"),
                              batch_sizes=(4, 16), num_samples=200, seeds=(0,), gap_examples=32,
                              device="cpu")
    df = normalisers_batch_size(cfg)
    assert len(df) == 4 and set(df["arm"]) == {"batch", "group"}
    assert (df.loc[df["batch_size"] == 4, "steps"] > df.loc[df["batch_size"] == 16, "steps"].max()).all()
    assert df["lr"].tolist() == pytest.approx([cfg.base_lr * b / 32 for b in df["batch_size"]])
    g = df[df["arm"] == "group"]
    assert (g["gap_acc_eval_mode"] == g["gap_acc_train_mode"]).all()   # GN has no batch statistics
    fig = plot(df)
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="arms"):
        normalisers_batch_size(dataclasses.replace(cfg, arms=("bogus",)))


def test_step_time_and_registration():
    df = normaliser_step_time(dataclasses.replace(StepTimeConfig(), arms=("none", "batch"), repeats=2,
                                                  width=4, depth=1, size=8))
    assert len(df) == 4 and (df["seconds"] >= 0).all()
    assert experiments.get("normalisers_batch_size").chapter == "19_normalisers"
    assert experiments.get("normaliser_step_time").config is StepTimeConfig
    full = NormalisersConfig.full()
    assert full.batch_sizes == (2, 4, 8, 16, 32, 64, 128) and len(full.seeds) >= 8
