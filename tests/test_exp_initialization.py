"""Mechanics of chapter 8's experiment (tiny configs; the real run is the notebook)."""
from __future__ import annotations

import numpy as np
import pytest

from bnlib import data as datasets
from bnlib.config import override
from bnlib.experiments import get
from bnlib.experiments.initialization import (InitConfig, activation_scale, init, scale_times,
                                              scheme_finals, scheme_std_ratio)

TINY = override(InitConfig(), {"model.depth": 3, "model.width": 16, "train.steps": 20,
                               "train.eval_every": 5, "seeds": (0, 1), "tuning.seeds": (1000,),
                               "tuning.grid": (0.01, 0.1), "scales": (0.3, 1.0)})


@pytest.fixture(scope="module")
def result():
    return init(TINY)


def test_kinds_and_rates(result):
    assert set(result["kind"]) == {"tuning", "history", "scale"}
    assert set(result.loc[result.kind == "tuning", "seed"]) == {1000}
    s = scheme_finals(result)
    assert set(s["scheme"]) == set(TINY.schemes) and set(s["seed"]) == {0, 1}
    assert s.groupby(["scheme", "arm"])["lr"].nunique().max() == 1
    sc = result[result.kind == "scale"]
    k = s[s.scheme == "kaiming"].groupby("arm")["lr"].first()
    assert (sc.groupby("arm")["lr"].first() == k).all()   # the scale sweep runs at Kaiming's rate
    assert set(sc["init_scale"]) == {0.3, 1.0}


def test_censored_times_finite(result):
    t = scale_times(result, 0.5)
    assert np.isfinite(t["steps"]).all() and (t["steps"] <= TINY.train.steps).all()


def test_no_training_probes():
    x = datasets.load("digits").train.x[:64]
    a = activation_scale(TINY, x, scales=(0.3, 3.0))
    hidden = a[(a.arm == "BN") & (a.layer <= 3)].pivot(index="layer", columns="init_scale", values="std")
    assert np.allclose(hidden[0.3], hidden[3.0], rtol=1e-3)     # BN divides the scale out
    plain = a[(a.arm == "plain") & (a.layer == 3)].set_index("init_scale")["std"]
    assert plain[3.0] > 100 * plain[0.3]                          # s^L without it
    r = scheme_std_ratio(TINY).set_index("scheme")["vs_kaiming"]
    assert r["kaiming"] == 1 and r["xavier"] < 1


def test_registered_and_bad_input():
    exp = get("init")
    assert exp.config is InitConfig and exp.chapter == "08_initialization"
    assert InitConfig.full().train.steps > InitConfig().train.steps
    with pytest.raises(ValueError):
        init(override(TINY, {"schemes": ("xavier",)}))
