"""Mechanics of chapter 18's measurements (tiny configs)."""
from __future__ import annotations

import numpy as np
import pytest

from bnlib import nn as bnn
from bnlib.config import override
from bnlib.experiments.faq import (GlanceConfig, HyperConfig, KERAS_DEFAULTS, RunningStatsProbe,
                                   bn_at_a_glance, bn_hyperparameters, half_life,
                                   hyper_comparisons, keras_update, momentum_conventions,
                                   torch_defaults, usable_rates)
from bnlib.protocol import load_data
from bnlib.train import fit


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


def _tiny_hyper() -> HyperConfig:
    return override(HyperConfig(), {"seeds": (0, 1), "momenta": (0.1, 0.5), "epsilons": (1e-5,),
                                    "train.steps": 5, "train.eval_every": 5, "model.width": 16})


@pytest.mark.parametrize("impl", ["torch", "bnlib"])
def test_probe_keeps_what_a_real_layer_keeps(impl):
    cfg = override(_tiny_hyper(), {"model.norm_impl": impl})
    probe = RunningStatsProbe((0.1, 0.3), eps=1e-3)
    net = fit(cfg.model, cfg.train, load_data(cfg), 0, callbacks=[probe]).attrs["model"]
    probe.close()
    layers = bnn.batchnorm_layers(net)
    assert all(bn.eps == 1e-3 for bn in layers)
    for bn, (mean, var) in zip(layers, probe.stats[0.1]):   # the layer's own momentum is 0.1
        assert np.allclose(bn.running_mean.double(), mean, atol=1e-5)
        assert np.allclose(bn.running_var.double(), var, atol=1e-5)
    assert not np.allclose(probe.stats[0.3][0][0], probe.stats[0.1][0][0])


def test_hyperparameters_tiny():
    cfg = _tiny_hyper()
    df = bn_hyperparameters(cfg)
    assert len(df) == 4 and {"test_acc", "precise_test_acc"} <= set(df.columns)
    # momentum only touches the running statistics: precise statistics are identical
    assert df.groupby("seed")["precise_test_acc"].nunique().eq(1).all()
    family = hyper_comparisons(df, cfg)   # momentum 0.5 against the default 0.1
    assert list(family) == ["momentum 0.5, ε 1e-05"]
    assert family["momentum 0.5, ε 1e-05"].verdict != "equivalent"   # 2 seeds: never "no difference"
    with pytest.raises(ValueError):
        bn_hyperparameters(override(cfg, {"epsilons": (0.0,)}))


def test_glance_tiny():
    cfg = override(GlanceConfig(), {"seeds": (0,), "train.steps": 6, "train.eval_every": 3,
                                    "model.width": 8, "target": 0.3,
                                    "tuning.grid": (0.03, 0.1, 0.3), "tuning.seeds": (1000,),
                                    "tuning.allow_edge": True})
    df = bn_at_a_glance(cfg)
    u = usable_rates(df, cfg.target)
    assert set(u["arm"]) == {"plain", "BN"} and len(u) == 6
    assert set(df["kind"]) == {"tuning", "history"}
    with pytest.raises(ValueError):
        bn_at_a_glance(override(cfg, {"margin": 0.0}))
