"""Mechanics of chapter 18's measurements (tiny configs)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bnlib.experiments.faq import (GlanceConfig, HyperConfig, KERAS_DEFAULTS, bn_at_a_glance,
                                   bn_hyperparameters, glance_table, half_life, hyper_table,
                                   keras_update, momentum_conventions, torch_defaults)


def test_momentum_conventions_are_opposite():
    df = momentum_conventions(steps=20)
    assert np.allclose(df["torch 0.1"], df["keras 0.9"], atol=1e-6)
    assert np.allclose(df["bnlib 0.1"], df["torch 0.1"], atol=1e-6)
    assert np.allclose(df["torch 0.01"], df["keras 0.99"], atol=1e-6)
    assert not np.allclose(df["torch 0.1"], df["keras 0.1"], atol=1e-3)
    assert torch_defaults() == {"momentum": 0.1, "eps": 1e-5}
    assert KERAS_DEFAULTS["momentum"] == 0.99
    assert half_life(0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        half_life(0.0)
    with pytest.raises(ValueError):
        keras_update(np.zeros(1), np.ones(1), 1.5)


def test_hyperparameters_tiny():
    cfg = dataclasses.replace(HyperConfig(), seeds=(0,), momenta=(0.1, 0.5), epsilons=(1e-5,),
                              steps=5, width=16)
    df = bn_hyperparameters(cfg)
    assert len(df) == 2 and {"test_acc", "precise_test_acc"} <= set(df.columns)
    # momentum only touches the running statistics: precise statistics are identical
    assert df["precise_test_acc"].nunique() == 1
    assert hyper_table(df).shape == (2, 1)
    with pytest.raises(ValueError):
        bn_hyperparameters(dataclasses.replace(cfg, epsilons=(0.0,)))


def test_glance_tiny():
    cfg = dataclasses.replace(GlanceConfig(), seeds=(0,), lrs=(0.1,), steps=6, eval_every=3, width=16)
    t = glance_table(bn_at_a_glance(cfg), target=0.5)
    assert set(t["arm"]) == {"plain", "BN"} and t["best"].all()
    with pytest.raises(ValueError):
        bn_at_a_glance(dataclasses.replace(cfg, lrs=(-1.0,)))
