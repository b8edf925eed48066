"""Mechanics of chapter 10's experiments (tiny configs; the real run is the notebook)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bnlib import data as datasets
from bnlib.experiments import get
from bnlib.experiments.scale_invariance import (ScaleTestConfig, ScaleTrainConfig, input_scale_test,
                                                input_scale_train, rescaled, trajectory_gap)


def test_registered():
    assert get("input_scale_train").config is ScaleTrainConfig
    assert get("input_scale_test").chapter == "10_scale_invariance"
    assert ScaleTrainConfig.full().steps > ScaleTrainConfig.quick().steps


def test_rescaled_and_raw_digits():
    ds = datasets.load("digits")
    r = rescaled(ds, 16.0)
    raw = datasets.load("digits", preprocessing="raw")
    assert torch.allclose(r.train.x, raw.train.x) and torch.equal(r.test.y, ds.test.y)
    only_test = rescaled(ds, 2.0, splits=("test",))
    assert torch.equal(only_test.train.x, ds.train.x)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError):
            rescaled(ds, bad)


def test_trajectory_invariance():
    cfg = ScaleTrainConfig(depth=2, width=16, scales=(0.01, 1.0, 100.0), plain_lrs=(0.01,),
                           steps=10, eval_every=10, seeds=(0,), tuning_seeds=(1000,))
    df = input_scale_train(cfg)
    assert set(df["arm"]) == {"BN", "BN, ε·c²", "plain"}
    # ε compensated: the same trajectory at every scale, to float rounding
    for c in (0.01, 100.0):
        assert trajectory_gap(df, "BN, ε·c²", c)["max_abs_gap"].max() < 1e-4
    # plain BN: the first step agrees at c = 100, and ε shows at c = 0.01
    first = df[(df.split == "step") & (df.step == 1) & (df.arm == "BN")].set_index("c")["loss"]
    assert abs(first[100.0] - first[1.0]) < 1e-4 < abs(first[0.01] - first[1.0])
    with pytest.raises(ValueError):
        trajectory_gap(df, "no such arm", 100.0)


def test_rescaled_test_inputs():
    cfg = ScaleTestConfig(depth=2, width=16, scales=(1.0, 10.0), steps=30, seeds=(0,))
    df = input_scale_test(cfg)
    bn = df[df.arm == "BN"].set_index(["c", "mode"])["accuracy"]
    # batch statistics and recomputed statistics do not care about the scale
    assert bn[(10.0, "test-batch statistics")] == pytest.approx(bn[(1.0, "test-batch statistics")], abs=0.02)
    assert bn[(10.0, "recomputed on c·x_train")] == pytest.approx(bn[(1.0, "recomputed on c·x_train")], abs=0.02)
    assert set(df[df.arm == "plain"]["mode"]) == {"eval mode (no BN)"}


def test_bad_config():
    with pytest.raises(ValueError):
        input_scale_train(dataclasses.replace(ScaleTrainConfig(), scales=(-1.0,)))
    with pytest.raises(ValueError):
        input_scale_test(dataclasses.replace(ScaleTestConfig(), scales=()))


def test_plain_rate_is_tuned_on_other_seeds():
    cfg = ScaleTrainConfig(depth=1, width=8, scales=(1.0,), plain_lrs=(0.001, 0.1), steps=4,
                           eval_every=4, seeds=(0,), tuning_seeds=(1000,))
    df = input_scale_train(cfg)
    tuning = df[df["kind"] == "tuning"]
    assert set(tuning["seed"]) == {1000} and set(tuning["lr"]) == {0.001, 0.1}
    reported = df[(df["kind"] == "history") & (df["arm"] == "plain")]
    assert set(reported["seed"]) == {0} and reported["lr"].nunique() == 1
