"""Mechanics of chapter 14's experiment (bnlib/experiments/shallow.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bnlib import experiments
from bnlib.experiments.shallow import (SHALLOW_ARMS, LogisticRegression, ShallowConfig, fit_shallow,
                                       shallow_nets, table_at)
from bnlib.nn import BatchNorm1d


def test_logistic_regression():
    plain = LogisticRegression(5, 3)
    with_bn = LogisticRegression(5, 3, input_norm=True)
    assert isinstance(with_bn.norm, BatchNorm1d) and not isinstance(plain.norm, BatchNorm1d)
    x = torch.randn(8, 5)
    assert plain(x).shape == with_bn(x).shape == (8, 3)
    # input BN in training mode: the classifier sees standardised features
    with_bn.train()
    out = with_bn.norm(x * 100 + 7)
    torch.testing.assert_close(out.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        LogisticRegression(5, 1)


def test_fit_shallow_kinds():
    for arm in ("logreg + input BN", "1 hidden, standardized"):
        df = fit_shallow(seed=0, dataset="wine", lr=0.1, steps=4, eval_every=2, width=8,
                         batch_size=16, device="cpu", **SHALLOW_ARMS[arm])
        assert sorted(set(df["step"])) == [0, 2, 4]
    with pytest.raises(ValueError, match="kind"):
        fit_shallow(seed=0, dataset="wine", kind="deep", norm=False, preprocessing="scaled",
                    lr=0.1, steps=2)


def test_shallow_nets_tiny_and_table_at():
    cfg = dataclasses.replace(ShallowConfig(), datasets=("wine",), arms=("logreg", "1 hidden + BN"),
                              lrs=(0.05, 0.2), steps=4, early_step=2, eval_every=2, width=8,
                              batch_size=16, seeds=(0, 1), device="cpu")
    df = shallow_nets(cfg)
    early, final = table_at(df, 2), table_at(df, 4)
    assert len(early) == len(final) == 2 * 2  # arms x seeds at the tuned LR
    assert {"accuracy_val", "accuracy_test", "lr"} <= set(final.columns)
    with pytest.raises(ValueError, match="not evaluated"):
        table_at(df, 3)
    with pytest.raises(ValueError, match="unknown arms"):
        shallow_nets(dataclasses.replace(cfg, arms=("deep",)))
    with pytest.raises(ValueError, match="multiples"):
        shallow_nets(dataclasses.replace(cfg, early_step=3))


def test_registered():
    assert experiments.get("shallow_nets").chapter == "14_shallow"
    ShallowConfig.full()
