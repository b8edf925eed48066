"""Mechanics of chapter 8's experiments (tiny configs; the real run is the notebook)."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from bnlib.experiments import get
from bnlib.experiments.initialization import (InitScaleConfig, InitSchemesConfig, init_scale,
                                              init_schemes, run_summary, working_range)

TINY = InitScaleConfig(depth=4, width=16, scales=(0.01, 1.0, 100.0), lrs=(0.05,), steps=15,
                       eval_every=5, seeds=(0,))


def test_registered():
    assert get("init_scale").config is InitScaleConfig
    assert get("init_schemes").chapter == "08_initialization"
    assert InitScaleConfig.full().steps > InitScaleConfig.quick().steps
    assert InitSchemesConfig.full().seeds != InitSchemesConfig.quick().seeds


def test_init_scale_sweep():
    df = init_scale(TINY)
    assert {"arm", "init_scale", "lr", "seed"} <= set(df.columns)
    s = run_summary(df)
    assert len(s) == 2 * 3                       # arms × scales × lrs × seeds
    # a 100× Kaiming init blows up the plain 4-layer net (100⁴ = 1e8 on the logits) but not BN
    assert s[(s.arm == "plain") & (s.init_scale == 100.0)]["diverged"].all()
    assert not s[(s.arm == "BN")]["diverged"].any()
    assert (s[s.diverged]["val_acc"] == 0).all()
    w = working_range(s, threshold=0.0)
    assert set(w["arm"]) == {"plain", "BN"} and (w["width"] >= 1).all()


def test_init_schemes_sweep():
    cfg = InitSchemesConfig(depth=2, width=8, schemes=("xavier", "normal(0.01)"), lrs=(0.05,),
                            steps=5, eval_every=5, seeds=(0,))
    s = run_summary(init_schemes(cfg), by=("arm", "scheme", "lr", "seed"))
    assert set(s["scheme"]) == {"xavier", "normal(0.01)"} and len(s) == 4
    w = working_range(s, threshold=0.0, x="scheme")
    assert (w["n_ok"] == 2).all()
    per_arm = init_schemes(dataclasses.replace(cfg, schemes=("xavier",), arm_lrs=(("plain", 0.01), ("BN", 0.1))))
    assert per_arm.groupby("arm")["lr"].unique().map(list).to_dict() == {"BN": [0.1], "plain": [0.01]}


def test_bad_input():
    with pytest.raises(ValueError):
        init_scale(dataclasses.replace(TINY, scales=(0.0,)))
    with pytest.raises(ValueError):
        init_scale(dataclasses.replace(TINY, lrs=()))
    with pytest.raises(ValueError):
        init_schemes(InitSchemesConfig(schemes=("orthogonal",)))
    with pytest.raises(ValueError):
        init_schemes(InitSchemesConfig(arm_lrs=(("BN", 0.1),)))
    with pytest.raises(ValueError):
        run_summary(pd.DataFrame({"arm": ["BN"]}))
