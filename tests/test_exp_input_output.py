"""Mechanics of chapter 17's experiment (tiny config) and the calibration helpers."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bnlib.experiments.input_output import (ARMS, IOConfig, best_runs, build_model,
                                            expected_calibration_error, extreme_inputs,
                                            input_gains, input_output, reliability, summary,
                                            train_one)


def test_ece_known_values():
    labels = torch.tensor([0, 0, 0, 0])
    perfect = torch.tensor([[1.0, 0.0]] * 4)
    assert expected_calibration_error(perfect, labels) == pytest.approx(0.0)
    # confidence 0.9 everywhere, half right: |0.5 − 0.9| = 0.4
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    t = reliability(probs, labels, n_bins=10)
    assert t["count"].sum() == 4 and len(t) == 1
    with pytest.raises(ValueError):
        expected_calibration_error(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError):
        expected_calibration_error(perfect, torch.tensor([0, 0]))


def test_build_model_arms():
    x = torch.randn(8, 64)
    for arm in ARMS:
        net = build_model(arm, 64, 10, width=16)
        assert net(x).shape == (8, 10)
    assert isinstance(build_model("input BN", 64, 10)[0], nn.Module)
    assert build_model("output BN (no affine)", 64, 10)[1].weight is None
    assert build_model("output BN (affine)", 64, 10)[1].weight is not None
    with pytest.raises(ValueError):
        build_model("hidden BN", 64, 10)


def test_input_gain_of_a_constant_feature_is_one_over_sqrt_eps():
    net = build_model("input BN", 4, 2, width=8, norm_impl="bnlib")
    bn = net[0]
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.0, 1.0, 4.0, 1e-2]))
    g = input_gains(net, torch.zeros(3, 4))
    assert g["gain"].iloc[0] == pytest.approx(bn.eps ** -0.5, rel=1e-4)
    assert g["gain"].iloc[2] == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ValueError):
        input_gains(build_model("no extra BN", 4, 2))


def test_input_output_tiny():
    cfg = dataclasses.replace(IOConfig(), seeds=(0,), lrs=(0.05, 0.1), steps=5, width=16)
    df = input_output(cfg)
    s = summary(df)
    assert len(s) == len(ARMS) * 2
    assert s["ece"].between(0, 1).all()
    assert s[s["arm"] == "input BN"]["max_gain"].notna().all()
    b = best_runs(df)
    assert sorted(b["arm"]) == sorted(ARMS)
    net, data, hist = train_one(cfg, "input BN", 0.1, 0)
    info = extreme_inputs(net, data.test)
    assert 0 <= info["extreme_frac"] <= 1
    with pytest.raises(ValueError):
        input_output(dataclasses.replace(cfg, arms=("middle BN",)))
