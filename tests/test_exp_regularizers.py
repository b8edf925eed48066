"""Mechanics of chapter 15's experiments (bnlib/experiments/regularizers.py)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from bnlib import experiments
from bnlib.config import override
from bnlib.experiments.regularizers import (GridConfig, ScalingConfig, VarianceShiftConfig,
                                            WeightDecayConfig, dose, dropout_variance_shift,
                                            grid_verdicts, regularizer_grid,
                                            variance_ratio, wd_weight_scaling, weight_decay_bn,
                                            weight_scaling_check)
from bnlib.inference import recompute_batchnorm_stats, recompute_in_train_mode
from bnlib.models import mlp
from bnlib.train import TrainSpec


def _net(**kw):
    torch.manual_seed(0)
    return mlp(6, 3, depth=2, width=16, norm="batch", **kw)


def test_variance_shift_train_mode_recompute_keeps_it_eval_mode_removes_it():
    net = _net(dropout=0.5, dropout_at="blocks")
    x = torch.randn(512, 6)
    net.train()
    with torch.no_grad():
        for _ in range(200):  # running statistics collected with dropout on
            net(x[torch.randint(0, 512, (64,))])
    assert variance_ratio(net, x) < 0.9
    recompute_in_train_mode(net, x, batch_size=128)
    assert not net.training and variance_ratio(net, x) < 0.9  # dropout was on: shift kept
    assert all(bn.momentum == 0.1 for bn in (b.norm for b in net.blocks))
    recompute_batchnorm_stats(net, x, batch_size=512)
    assert variance_ratio(net, x) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError):
        variance_ratio(net, x, bn=net.head)


def test_weight_scaling_check_exact():
    net = _net()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    w0 = net.blocks[1].layer.weight.detach().clone()
    r = weight_scaling_check(net, x, y, net.blocks[1].layer, factor=10.0)
    assert r["loss_scaled"] == pytest.approx(r["loss"], rel=1e-4)
    assert r["grad_ratio"] == pytest.approx(10.0, rel=1e-3)
    assert abs(r["cos_w_grad"]) < 1e-4
    assert torch.equal(net.blocks[1].layer.weight, w0)
    head = weight_scaling_check(net, x, y, net.head, factor=10.0)
    assert abs(head["loss_scaled"] - head["loss"]) > 1e-3  # no BN after the classifier
    with pytest.raises(ValueError):
        weight_scaling_check(net, x, y, net.head, factor=0.0)


def test_dose():
    assert dose(1e-2, TrainSpec(lr=0.1, momentum=0.9, steps=300)) == pytest.approx(3.0)
    assert dose(0.0, TrainSpec()) == 0.0


def _tiny(cfg, **kw):
    return override(cfg, {"data": "wine", "n_train": None, "seeds": (0,), "train.steps": 4,
                          "train.eval_every": 4, "device": "cpu", **kw})


def test_tiny_experiments():
    vs = dropout_variance_shift(_tiny(VarianceShiftConfig(), **{"model.width": 8}))
    assert len(vs) == 3 * 3 and set(vs["stats"]) == {"running (as trained)", "recomputed in train mode",
                                                     "recomputed in eval mode"}
    assert len(wd_weight_scaling(_tiny(ScalingConfig(), probe_batch=32))) == 2
    wd = weight_decay_bn(_tiny(WeightDecayConfig(), every=2))
    assert set(wd["weight_decay"]) == {0.0, 1e-3, 1e-2} and {"w_ratio", "lr_over_w2", "dose"} <= set(wd)
    assert sorted(set(wd["step"])) == [0, 2, 4]


def test_grid_runs_tuned_per_data_set():
    cfg = override(GridConfig(), {"datasets": {"wine": {"n_train": None}}, "seeds": (0,),
                                  "train.steps": 3, "train.eval_every": 3, "tuning.seeds": (1000,),
                                  "device": "cpu"})
    g = regularizer_grid(cfg)
    assert set(g["kind"]) == {"tuning", "history"} and set(g["arm"]) == set(cfg.arms)
    assert set(g["data"]) == {"wine"}


def test_grid_verdicts_on_a_known_table():
    cfg = GridConfig()
    rows = []
    for data in cfg.datasets:
        for arm, shift in (("BN", 0.0), ("BN + dropout", 0.05), ("BN + WD", 0.0)):
            for seed in range(8):
                acc = 0.8 + shift + 0.002 * seed + (0.001 * (-1) ** seed if arm != "BN" else 0.0)
                rows.append(dict(step=300, split="test", loss=1.0, accuracy=acc, elapsed=0.0,
                                 diverged=False, arm=arm, seed=seed, lr=0.03, data=data,
                                 kind="history"))
    v = grid_verdicts(pd.DataFrame(rows), cfg).set_index("arm")
    assert (v.loc["BN + dropout", "verdict"] == "better").all()
    assert (v.loc["BN + WD", "verdict"] == "equivalent").all()
    assert v.loc["BN + WD", "dose"].iloc[0] == pytest.approx(dose(cfg.arms["BN + WD"]["train.weight_decay"], TrainSpec(lr=0.03, momentum=0.9, steps=cfg.train.steps)))


def test_config_validation():
    with pytest.raises(ValueError):
        dropout_variance_shift(override(VarianceShiftConfig(), {"model.dropout": 0.0}))
    with pytest.raises(ValueError):
        weight_decay_bn(override(WeightDecayConfig(), {"weight_decays": (-1.0,)}))
    with pytest.raises(ValueError):
        wd_weight_scaling(override(ScalingConfig(), {"model.depth": 1}))


def test_registered():
    for name in ("dropout_variance_shift", "wd_weight_scaling", "weight_decay_bn", "regularizer_grid"):
        assert experiments.get(name).chapter == "15_regularizers"
    for c in (VarianceShiftConfig, ScalingConfig, WeightDecayConfig, GridConfig):
        c.full()
