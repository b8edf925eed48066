"""Mechanics of chapter 11's depth experiment (tiny configs, a few seconds)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bnlib import experiments
from bnlib.experiments.depth import (ARMS, DepthConfig, arm_model, depth_sweep, depth_table,
                                     gradient_profile, growth_per_layer)
from bnlib.models import mlp

TINY = DepthConfig(depths=(2, 3), width=8, steps=3, lrs=(0.01, 0.1), tune_seeds=(0,), seeds=(0, 1),
                   n_train=100, device="cpu")


def test_arm_models():
    assert arm_model("plain", 5)["norm"] == "none"
    assert arm_model("plain+BN", 5)["norm"] == "batch" and not arm_model("plain+BN", 5).get("residual")
    assert arm_model("residual+BN", 5)["residual"] and arm_model("residual+BN", 5)["norm"] == "batch"
    res = arm_model("residual", 16)
    assert res["residual"] and res["norm"] == "none" and res["residual_branch_scale"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="arm must be"):
        arm_model("resnet", 4)
    with pytest.raises(ValueError, match="depth"):
        arm_model("plain", 0)


def test_residual_branches_start_small():
    torch.manual_seed(0)
    plain = mlp(64, 10, **arm_model("plain", 16, width=256))
    torch.manual_seed(0)
    res = mlp(64, 10, **arm_model("residual", 16, width=256))
    ratio = res.blocks[3].layer.weight.std() / plain.blocks[3].layer.weight.std()
    assert ratio.item() == pytest.approx(0.25, rel=1e-4)
    assert torch.equal(res.blocks[0].layer.weight, plain.blocks[0].layer.weight)  # first layer unscaled


def test_sweep_tunes_per_arm_and_depth():
    df = depth_sweep(TINY)
    assert set(df.columns) >= {"arm", "depth", "lr", "seed", "val_accuracy", "test_accuracy",
                               "diverged", "best_lr"}
    # tuning seed at every lr, the other seed only at the tuned one
    assert len(df) == len(ARMS) * len(TINY.depths) * (len(TINY.lrs) + 1)
    best = df[df["best_lr"]]
    assert (best.groupby(["arm", "depth"])["lr"].nunique() == 1).all()
    assert set(best["seed"]) == {0, 1}
    assert df[df["seed"] == 1]["best_lr"].all()
    assert df["test_accuracy"].between(0, 1).all()
    table = depth_table(df)
    assert len(table) == len(ARMS) * len(TINY.depths) and (table["n"] == 2).all()


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="unknown arms"):
        depth_sweep(dataclasses.replace(TINY, arms=("plain", "dense")))
    with pytest.raises(ValueError, match="lrs"):
        depth_sweep(dataclasses.replace(TINY, lrs=()))
    with pytest.raises(ValueError, match="depths"):
        depth_sweep(dataclasses.replace(TINY, depths=(0,)))


def test_gradient_explodes_in_plain_bn_only():
    prof = gradient_profile(16, width=64, seeds=(0,))
    assert set(prof["arm"]) == set(ARMS) and (prof["grad_norm"] > 0).all()
    assert prof["layer"].max() == 16
    growth = growth_per_layer(prof).set_index("arm")["growth"]
    assert growth["plain+BN"] > 1.1 > growth["plain"]
    assert growth["plain+BN"] > growth["residual+BN"]
    with pytest.raises(ValueError):
        growth_per_layer(prof[prof["layer"] <= 3])


def test_registered_with_presets():
    exp = experiments.get("depth")
    assert exp.config is DepthConfig and exp.chapter == "11_depth"
    full = DepthConfig.full()
    assert max(full.depths) > max(DepthConfig.quick().depths) and len(full.seeds) >= 3
    assert math.isclose(min(DepthConfig.quick().lrs), 0.003)


def test_plot_depth_draws_one_line_per_arm():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from bnlib.experiments.depth import plot_depth
    rows = [dict(arm=a, depth=d, lr=0.01, seed=s, test_accuracy=0.9, val_accuracy=0.9, diverged=False,
                 best_lr=True) for a in ARMS for d in (2, 8) for s in (0, 1)]
    ax = plot_depth(pd.DataFrame(rows), ax=plt.figure().gca())
    assert len(ax.get_legend().get_texts()) == len(ARMS)
    plt.close("all")
