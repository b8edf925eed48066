"""Mechanics of chapter 7's experiment (tiny configs; the real run is the notebook)."""
from __future__ import annotations

import numpy as np
import pytest

from bnlib import analysis
from bnlib.config import override
from bnlib.experiments import get
from bnlib.experiments.learning_rates import (LRConfig, choose, final_accuracy, largest_usable,
                                              lr_sweep, observed, times)

TINY = override(LRConfig(), {"model.depth": 3, "model.width": 16, "train.steps": 20,
                             "train.eval_every": 5, "seeds": (0, 1), "tuning.seeds": (1000,),
                             "tuning.grid": (0.01, 0.3, 30.0), "tuning.target": 0.3,
                             "track_lrs": (0.3,), "track_seeds": (0,)})


@pytest.fixture(scope="module")
def result():
    return lr_sweep(TINY)


def test_registered():
    exp = get("lr_sweep")
    assert exp.config is LRConfig and exp.chapter == "07_learning_rates"
    assert LRConfig.full().train.steps > LRConfig().train.steps


def test_kinds_and_seeds(result):
    assert set(result["kind"]) == {"history", "tuning", "weights"}
    assert set(result.loc[result.kind == "tuning", "seed"]) == {1000}
    assert set(result.loc[result.kind == "history", "seed"]) == {0, 1}
    w = result[result.kind == "weights"]
    assert (w.loc[w.step == 0, "w_ratio"] == 1.0).all()


def test_plain_diverges_at_huge_lr(result):
    f = final_accuracy(result)
    assert f[(f.arm == "plain") & (f.lr == 30.0)]["diverged"].all()
    assert f[f.diverged]["accuracy"].isna().all()   # a diverged run never reports a stale accuracy
    u = largest_usable(result, 0.0)
    assert list(u.index) == [0, 1] and set(u.columns) == {"plain", "BN"}


def test_bn_gradient_orthogonal_to_weight(result):
    w = result[result.kind == "weights"]
    assert w[w.arm == "BN"]["cos_wg"].max() < 1e-3
    assert w[w.arm == "plain"]["cos_wg"].max() > 1e-3


def test_censored_times_are_finite(result):
    t = observed(times(result, 0.3))
    assert np.isfinite(t["steps"]).all() and (t["steps"] <= TINY.train.steps).all()
    assert not t.loc[t.diverged & ~t.reached, "reached"].any()


def test_choose_refuses_the_grid_edge(result):
    with pytest.raises(analysis.GridEdgeError):
        choose(result, override(TINY, {"tuning.target": 0.05}))  # everything arrives at once


def test_bad_input():
    with pytest.raises(ValueError):
        lr_sweep(override(TINY, {"tuning.seeds": (0,)}))


def test_tracker_weight_growth_under_sgd():
    """With plain SGD (no momentum) a scale-invariant weight's norm can only grow."""
    import torch

    from bnlib import data as datasets
    from bnlib.models import mlp
    from bnlib.probes import WeightNormTracker
    from bnlib.train import seeded, train
    net = seeded(0, lambda: mlp(64, 10, depth=2, width=16, norm="batch"))
    tr = WeightNormTracker([b.layer for b in net.blocks], lr=0.5, every=1)
    train(net, datasets.load("digits"), steps=15, lr=0.5, momentum=0.0, eval_every=15,
          callbacks=[tr], show_progress=False)
    for _, g in tr.frame().groupby("layer"):
        assert (g["w_norm"].diff().dropna() >= -1e-5).all()
    s = tr.summary()
    assert s["w_ratio"].iloc[-1] > 1 and s["eff_lr"].iloc[-1] < 0.5
    with pytest.raises(ValueError):
        WeightNormTracker([], lr=0.1)
    with pytest.raises(ValueError):
        WeightNormTracker([torch.nn.Linear(2, 2)], lr=float("nan"))
