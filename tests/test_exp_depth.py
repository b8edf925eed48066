"""Mechanics of chapter 11's experiment (tiny configs; the real run is the notebook)."""
from __future__ import annotations

import math

import pytest

from bnlib.config import override
from bnlib.experiments import get
from bnlib.experiments.depth import (DepthConfig, _at_depth, depth_sweep, finals,
                                     gradient_profile, growth_per_layer)

TINY = override(DepthConfig(), {"depths": (2,), "model.width": 8, "train.steps": 10,
                                "train.eval_every": 10, "seeds": (0, 1),
                                "tuning.seeds": (1000,), "tuning.allow_edge": True,
                                "tuning.grid": (0.01, 0.1)})


def test_registered():
    exp = get("depth")
    assert exp.config is DepthConfig and exp.chapter == "11_depth"
    assert max(DepthConfig.full().depths) > max(DepthConfig().depths)


def test_residual_branch_scale_follows_depth():
    cfg = _at_depth(DepthConfig(), 16)
    assert cfg.model.depth == 16
    assert math.isclose(cfg.arms["residual"]["model.residual_branch_scale"], 0.25)
    assert "model.residual_branch_scale" not in DepthConfig().arms["residual"]


def test_sweep_reports_disjoint_seeds():
    df = depth_sweep(override(TINY, {"arms": {"plain": {"model.norm": "none"},
                                              "BN": {"model.norm": "batch"}}}))
    assert set(df.loc[df.kind == "tuning", "seed"]) == {1000}
    f = finals(df)
    assert set(f["seed"]) == {0, 1} and set(f["arm"]) == {"plain", "BN"}
    assert f.groupby("arm")["lr"].nunique().max() == 1   # one tuned rate per arm and depth
    assert f["accuracy"].between(0, 1).all()


def test_gradient_profile_plain_bn_grows():
    p = gradient_profile(DepthConfig(), 16, seeds=(0,))
    g = growth_per_layer(p).set_index("arm")["growth"]
    assert g["BN"] > 1.15 > g["plain"]


def test_bad_input():
    with pytest.raises(ValueError):
        depth_sweep(override(TINY, {"depths": (0,)}))
    with pytest.raises(ValueError):
        gradient_profile(DepthConfig(), 4, batch_size=1)
