"""Mechanics of chapter 17's experiment (tiny config)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlib import data as datasets
from bnlib.config import override
from bnlib.experiments.input_output import (ARMS, IOConfig, IOSpec, extreme_inputs, final_table,
                                            input_gains, input_output, rerun_with_layer, train_one)
from bnlib.models import MLPSpec

DIGITS = datasets.load("digits", preprocessing="raw")


def build_model(arm, width=16, norm_impl="torch"):
    return IOSpec(net=MLPSpec(depth=2, width=width, norm="batch", norm_impl=norm_impl),
                  extra=arm).build(0, DIGITS)


def test_build_model_arms():
    x = torch.randn(8, 64)
    for arm in ARMS:
        net = build_model(arm)
        assert net(x).shape == (8, 10)
    assert isinstance(build_model("input BN")[0], nn.Module)
    assert build_model("output BN (no affine)")[1].weight is None
    assert build_model("output BN (affine)")[1].weight is not None
    with pytest.raises(ValueError):
        build_model("hidden BN")


def test_input_gain_of_a_constant_feature_is_one_over_sqrt_eps():
    net = build_model("input BN", width=8, norm_impl="bnlib")
    bn = net[0]
    with torch.no_grad():
        bn.running_var.copy_(torch.linspace(0, 4, 64))
    g = input_gains(net, torch.zeros(3, 64))
    assert g["gain"].iloc[0] == pytest.approx(bn.eps ** -0.5, rel=1e-4)
    assert g["gain"].iloc[-1] == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ValueError):
        input_gains(build_model("no extra BN"))


def test_input_output_tiny():
    cfg = override(IOConfig(), {"seeds": (0, 1), "train.steps": 5, "train.eval_every": 5,
                                "model.net.width": 16, "tuning.seeds": (1000,),
                                "tuning.grid": (0.05, 0.1, 0.2), "tuning.allow_edge": True})
    df = input_output(cfg)
    f = df[df["kind"] == "final"]
    assert len(f) == len(ARMS) * 2 and f["ece"].between(0, 1).all()
    assert f[f["arm"] == "input BN"]["max_gain"].notna().all()
    assert list(final_table(df, "ece").columns) == list(ARMS)
    net, data, hist = train_one(cfg, "input BN", 0.1, 0)
    info = extreme_inputs(net, data.test)
    assert 0 <= info["extreme_frac"] <= 1
    with pytest.raises(ValueError):
        input_output(override(cfg, {"arms": {"middle BN": {}}}))
    # the rounding check: the same layer reproduces the reported runs exactly; bnlib's layer
    # computes the same function, so the runs agree closely
    f = f.set_index(["arm", "seed"])
    same = rerun_with_layer(cfg, df, "input BN", impl="torch").set_index("seed")
    assert list(same.index) == [0, 1] and (same["lr"] == f.loc["input BN", "lr"]).all()
    assert same["accuracy"].tolist() == f.loc["input BN", "accuracy"].tolist()
    other = rerun_with_layer(cfg, df, "input BN", impl="bnlib").set_index("seed")
    assert other["loss"].to_numpy() == pytest.approx(same["loss"].to_numpy(), rel=1e-3)
    with pytest.raises(ValueError, match="no arm"):
        rerun_with_layer(cfg, df, "middle BN")
