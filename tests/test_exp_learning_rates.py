"""Mechanics of chapter 7's experiment (tiny configs; the real run is the notebook)."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from bnlib import data as datasets
from bnlib.experiments import get
from bnlib.experiments.learning_rates import (LRSweepConfig, WeightNormTracker, fastest, lr_sweep,
                                              run_summary, usable_range)
from bnlib.models import mlp
from bnlib.train import seeded, train

TINY = LRSweepConfig(depth=3, width=16, lrs=(0.01, 30.0), steps=20, eval_every=5, seeds=(0, 1))


@pytest.fixture(scope="module")
def result():
    return lr_sweep(TINY)


def test_registered():
    exp = get("lr_sweep")
    assert exp.config is LRSweepConfig and exp.chapter == "07_learning_rates"
    assert LRSweepConfig.full().steps > LRSweepConfig.quick().steps


def test_sweep_shape_and_weight_columns(result):
    assert set(result["arm"]) == {"plain", "BN"} and set(result["lr"]) == {0.01, 30.0}
    assert {"w_ratio", "eff_lr", "cos_wg", "diverged"} <= set(result.columns)
    first = result[result["step"] == 0]
    assert (first["w_ratio"] == 1.0).all()
    assert (first["eff_lr"] == first["lr"]).all()


def test_plain_diverges_at_huge_lr_and_bn_does_not(result):
    s = run_summary(result)
    assert s[(s.arm == "plain") & (s.lr == 30.0)]["diverged"].all()
    assert not s[(s.arm == "BN") & (s.lr == 0.01)]["diverged"].any()
    assert (s[s.diverged]["val_acc"] == 0).all()   # a diverged run never reports a stale accuracy


def test_bn_gradient_orthogonal_to_weight(result):
    bn = result[(result.arm == "BN") & (result.lr == 0.01)]
    plain = result[(result.arm == "plain") & (result.lr == 0.01)]
    assert bn["cos_wg"].max() < 1e-3
    assert plain["cos_wg"].max() > 1e-3


def test_tracker_weight_growth_under_sgd():
    """With plain SGD (no momentum) a scale-invariant weight's norm can only grow."""
    ds = datasets.load("digits")
    net = seeded(0, lambda: mlp(64, 10, depth=2, width=16, norm="batch"))
    tr = WeightNormTracker([b.layer for b in net.blocks], lr=0.5, every=1)
    train(net, ds, steps=15, lr=0.5, momentum=0.0, eval_every=15, callbacks=[tr], show_progress=False)
    f = tr.frame()
    for _, g in f.groupby("layer"):
        assert (g["w_norm"].diff().dropna() >= -1e-5).all()
    summ = tr.summary()
    assert summ["w_ratio"].iloc[-1] > 1 and summ["eff_lr"].iloc[-1] < 0.5


def test_readouts():
    s = run_summary(lr_sweep(dataclasses.replace(TINY, lrs=(0.03,), seeds=(0,))), target=0.2)
    r = usable_range(s, threshold=0.0)
    assert set(r["arm"]) == {"plain", "BN"} and (r["width"] == 1).all()
    assert usable_range(s, threshold=1.01)["width"].isna().all()
    f = fastest(s)
    assert set(f.columns) >= {"arm", "lr", "steps", "steps_sd"}


def test_bad_input():
    with pytest.raises(ValueError):
        lr_sweep(dataclasses.replace(TINY, lrs=(0.1, -1.0)))
    with pytest.raises(ValueError):
        WeightNormTracker([], lr=0.1)
    with pytest.raises(ValueError):
        WeightNormTracker([torch.nn.Linear(2, 2)], lr=float("nan"))
    with pytest.raises(ValueError):
        run_summary(pd.DataFrame({"x": [1]}))
