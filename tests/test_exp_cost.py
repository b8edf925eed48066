"""Mechanics of chapter 13's cost experiments and the analytic FLOP/byte count."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bnlib.experiments.cost import (COST_ARMS, CostConfig, FoldConfig, cost_devices,
                                    fold_speedup, intensity_table, overheads, step_cost)


def test_intensity_table_shows_bn_is_memory_bound():
    t = intensity_table(batch=32, features=128, channels=16, hw=8)
    layer = t[t["layer"].isin(["Linear forward", "Conv forward"])]
    bn = t[t["layer"] == "BN forward (training)"]
    assert (bn["flops_per_byte"] < 1).all() and (layer["flops_per_byte"] > 1).all()
    # BN's share of the bytes is far larger than its share of the FLOPs
    assert (bn["byte_share"] > 10 * bn["flop_share"]).all()
    folded = t[t["layer"] == "BN folded into the layer"]
    assert (folded[["flops", "bytes"]] == 0).all().all()
    # counts scale as documented: Linear forward FLOPs = 2·N·C²
    lin = t[t["layer"] == "Linear forward"]
    assert lin["flops"].item() == 2 * 32 * 128 * 128
    with pytest.raises(ValueError):
        intensity_table(batch=0)


def test_cost_devices():
    assert cost_devices("cpu") == [torch.device("cpu")]
    assert cost_devices("auto")[0] == torch.device("cpu")


def test_step_cost_tiny():
    cfg = dataclasses.replace(CostConfig.quick(), mlp_in=8, mlp_depth=2, mlp_width=8,
                              mlp_batch=8, cnn_shape=(1, 6, 6), cnn_channels=(2, 4),
                              cnn_batch=4, repeats=2, number=1, device="cpu")
    df = step_cost(cfg)
    assert len(df) == 2 * len(COST_ARMS) * 3 * 2  # models × arms × phases × repeats
    assert set(df["phase"]) == {"forward", "backward", "step"}
    assert (df["seconds"] > 0).all()
    ov = overheads(df)
    assert len(ov) == 2 * 3 * (len(COST_ARMS) - 1) and (ov["ratio"] > 0).all()
    with pytest.raises(ValueError):
        step_cost(dataclasses.replace(cfg, arms=("BN (jax)",)))
    assert set(ov["arm"]) == {"BN", "BN (bnlib)"}  # ratios against "plain"


def test_fold_speedup_tiny_is_exact():
    cfg = dataclasses.replace(FoldConfig.quick(), mlp_in=8, mlp_depth=2, mlp_width=8,
                              cnn_shape=(1, 6, 6), cnn_channels=(2, 4), batch=8, repeats=2,
                              number=1, device="cpu")
    df = fold_speedup(cfg)
    assert set(df["arm"]) == {"BN", "folded"} and set(df["model"]) == {"mlp", "cnn"}
    assert (df["max_abs_diff"] < 1e-4 * df["max_abs_out"].clip(lower=1)).all()
