"""Mechanics of chapter 10's experiments (tiny configs; the real run is the notebook)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bnlib import data as datasets
from bnlib.experiments import get
from bnlib.config import override
from bnlib.experiments.scale_invariance import (FirstEpsMLPSpec, ScaleTestConfig, ScaleTrainConfig,
                                                final_accuracy, input_scale_test, input_scale_train,
                                                trajectory_gap)
from bnlib.protocol import load_data, rows


def test_registered():
    assert get("input_scale_train").config is ScaleTrainConfig
    assert get("input_scale_test").chapter == "10_scale_invariance"
    assert ScaleTrainConfig.full().train.steps > ScaleTrainConfig.quick().train.steps


def test_train_config_feeds_rescaled_float64_digits():
    ds = datasets.load("digits")
    fed = load_data(override(ScaleTrainConfig(), {"c": 100.0}))  # the config's prepare: float64, × c
    assert fed.train.x.dtype == torch.float64 and torch.allclose(fed.train.x, ds.train.x.double() * 100)


def test_first_eps_spec():
    ds = datasets.load("digits")
    net = FirstEpsMLPSpec(depth=2, width=8, norm="batch", eps_factor=1e4).build(0, ds)
    ref = FirstEpsMLPSpec(depth=2, width=8, norm="batch").build(0, ds)
    assert net.blocks[0].norm.eps == pytest.approx(ref.blocks[0].norm.eps * 1e4)
    assert net.blocks[1].norm.eps == ref.blocks[1].norm.eps
    assert torch.equal(net.blocks[0].layer.weight, ref.blocks[0].layer.weight)
    with pytest.raises(ValueError, match="batch norm"):
        FirstEpsMLPSpec(depth=2, width=8, eps_factor=2.0).build(0, ds)


TINY_TRAIN = override(ScaleTrainConfig(), {"model.depth": 2, "model.width": 16, "train.steps": 10,
                                           "train.eval_every": 10, "seeds": (0,), "exact_seeds": (0,),
                                           "tuning.grid": (0.001, 0.01, 0.1), "tuning.seeds": (1000,)})


def test_trajectory_invariance_and_tuned_plain_rate():
    df = input_scale_train(TINY_TRAIN)
    assert set(df["arm"]) == {"BN", "BN, ε·c²", "plain"} and set(df["kind"]) == {"history", "steps", "tuning"}
    # ε compensated: the same trajectory at every scale, to float rounding
    for c in (0.01, 100.0):
        assert trajectory_gap(df, "BN, ε·c²", c)["max_abs_gap"].max() < 1e-10
    # plain BN: the first step agrees at c = 100, and ε shows at c = 0.01
    steps = rows(df, "steps")
    first = steps[(steps.step == 1) & (steps.arm == "BN")].set_index("c")["loss"]
    assert abs(first[100.0] - first[1.0]) < 1e-4 < abs(first[0.01] - first[1.0])
    with pytest.raises(ValueError):
        trajectory_gap(df, "no such arm", 100.0)
    # the plain rate is tuned per scale on the tuning seeds, reported on the others
    tuning = rows(df, "tuning")
    assert set(tuning["seed"]) == {1000} and set(tuning["lr"]) == {0.001, 0.01, 0.1}
    fin = final_accuracy(df)
    plain = fin[fin["arm"] == "plain"]
    assert set(plain["seed"]) == {0} and len(plain) == 3 and fin["val_acc"].between(0, 1).all()


def test_rescaled_test_inputs():
    cfg = override(ScaleTestConfig(), {"model.depth": 2, "model.width": 16, "scales": (1.0, 10.0),
                                       "train.steps": 30, "train.eval_every": 30, "seeds": (0,)})
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
    with pytest.raises(ValueError, match="dtype"):
        load_data(dataclasses.replace(ScaleTrainConfig(), dtype="int8"))
