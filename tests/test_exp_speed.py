"""Mechanics of chapter 4's experiments on tiny configs (the analysis is bnlib.analysis's)."""
from __future__ import annotations

import pytest

from bnlib import analysis
from bnlib.config import override
from bnlib.experiments import get
from bnlib.experiments.speed import IoffeConfig, SpeedConfig, ioffe_mnist, speed, step_timing
from bnlib.protocol import rows


def _tiny_speed() -> SpeedConfig:
    return override(SpeedConfig(), {"model.depth": 2, "model.width": 16, "train.steps": 20,
                                    "train.eval_every": 5, "seeds": (0, 1),
                                    "tuning.grid": (0.01, 0.1, 1.0), "tuning.seeds": (1000,),
                                    "tuning.target": 0.3, "tuning.allow_edge": True,
                                    "timing_repeats": 2, "timing_number": 1, "device": "cpu"})


def test_speed_tiny_run_has_every_kind():
    cfg = _tiny_speed()
    df = speed(cfg)
    assert set(df["kind"]) == {"tuning", "history", "equal_rate", "timing"}
    tuning, hist, equal = rows(df, "tuning"), rows(df, "history"), rows(df, "equal_rate")
    assert set(tuning["seed"]) == {1000} and set(hist["seed"]) == {0, 1}  # disjoint seeds
    assert set(tuning["lr"]) == {0.01, 0.1, 1.0}
    assert set(tuning["split"]) == {"batch", "val"} and set(hist["split"]) == {"batch", "test"}
    rate = hist.groupby("arm")["lr"].first()
    assert set(equal["arm"]) == {"BN"} and set(equal["lr"]) == {rate["plain"]}
    per_step = rows(df, "timing").groupby("arm")["seconds"].median()
    assert set(per_step.index) == {"plain", "BN"} and (per_step > 0).all()
    ttt = analysis.time_to_target(hist, 0.2, split="test", keys=["arm", "seed"])
    assert len(ttt) == 4 and ttt["budget"].max() == 20
    assert get("speed").config is SpeedConfig


def test_speed_needs_both_arms():
    with pytest.raises(ValueError):
        speed(override(_tiny_speed(), {"arms": {"BN": {"model.norm": "batch"}}}))


def test_step_timing_rows():
    tm = step_timing(_tiny_speed(), repeats=2, number=1)
    assert len(tm) == 4 and set(tm["arm"]) == {"plain", "BN"} and (tm["seconds"] > 0).all()


def test_ioffe_tiny_run_records_percentiles():
    cfg = override(IoffeConfig(), {"data": "digits", "seeds": (0,), "train.steps": 20,
                                   "train.eval_every": 10, "probe_every": 10, "probe_size": 32,
                                   "init_stds": (0.1,), "tuning.grid": (0.5, 1.0, 2.0),
                                   "tuning.seeds": (1000,), "tuning.target": 0.2,
                                   "tuning.allow_edge": True, "device": "cpu"})
    df = ioffe_mnist(cfg)
    pct = rows(df, "percentile")
    assert set(pct["arm"]) == {"plain", "BN"}
    assert sorted(pct["step"].unique()) == [0, 10, 20]
    assert (pct["p15"] <= pct["p50"]).all() and (pct["p50"] <= pct["p85"]).all()
    hist = rows(df, "history")
    assert "test" in set(hist["split"]) and "val" not in set(hist["split"])
    assert set(hist["init_std"]) == {0.1} and "test" not in set(rows(df, "tuning")["split"])
    assert set(rows(df, "tuning")["seed"]) == {1000}
    with pytest.raises(ValueError):
        ioffe_mnist(override(cfg, {"init_stds": (0.0,)}))
