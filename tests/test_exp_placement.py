"""Mechanics of chapter 12's experiments (bnlib/experiments/placement.py)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from bnlib import experiments
from bnlib.config import override
from bnlib.experiments.placement import (PlacementConfig, SaturationConfig, placement,
                                         placement_saturation, placement_verdicts,
                                         saturated_fraction)
from bnlib.models import mlp


def test_saturated_fraction_counts_outputs_near_the_bounds():
    torch.manual_seed(0)
    net = mlp(4, 3, depth=2, width=8, activation="tanh", norm="batch", placement="after")
    x = torch.randn(64, 4)
    assert all(f < 0.5 for f in saturated_fraction(net, x))
    with torch.no_grad():
        net.blocks[0].layer.weight.mul_(1000.0)   # pre-activations in the flat tails
    assert saturated_fraction(net, x)[0] > 0.9
    assert net.training  # mode restored
    with pytest.raises(ValueError):
        saturated_fraction(net, x, margin=0.6)


def test_placement_runs_tuned_per_data_set_and_activation():
    cfg = override(PlacementConfig(), {"datasets": {"wine": {"n_train": None}}, "seeds": (0,),
                                       "activations": ("relu", "tanh"), "train.steps": 3,
                                       "train.eval_every": 3, "tuning.seeds": (1000,), "device": "cpu"})
    df = placement(cfg)
    assert set(df["kind"]) == {"tuning", "history"}
    assert set(df["activation"]) == {"relu", "tanh"} and set(df["arm"]) == {"BN", "BN after"}
    with pytest.raises(ValueError):
        placement(override(cfg, {"activations": ("swish",)}))


def test_placement_verdicts_on_a_known_table():
    cfg = override(PlacementConfig(), {"activations": ("relu", "tanh")})
    rows = []
    for data in cfg.datasets:
        for act, shift in (("relu", 0.0), ("tanh", -0.2)):
            for arm in ("BN", "BN after"):
                for seed in range(8):
                    noise = 0.002 * (-1) ** seed if arm == "BN after" else 0.0
                    acc = 0.9 + 0.003 * seed + (shift + noise if arm == "BN after" else 0.0)
                    rows.append(dict(step=150, split="test", loss=1.0, accuracy=acc, elapsed=0.0,
                                     diverged=False, arm=arm, seed=seed, lr=0.1, data=data,
                                     activation=act, kind="history"))
    v = placement_verdicts(pd.DataFrame(rows), cfg).set_index(["data", "activation"])
    assert (v.xs("relu", level="activation")["verdict"] == "equivalent").all()
    assert (v.xs("tanh", level="activation")["verdict"] == "worse").all()
    assert v["mean"].xs("tanh", level="activation").iloc[0] == pytest.approx(-0.2)


def test_saturation_tiny():
    s = placement_saturation(override(SaturationConfig(), {"data": "wine", "n_train": None, "seeds": (0,),
                                                           "train.steps": 3, "device": "cpu"}))
    assert set(s["arm"]) == {"BN", "BN after"} and set(s["layer"]) == {1, 2, 3}
    assert s["saturated"].between(0, 1).all()
    with pytest.raises(ValueError):
        placement_saturation(override(SaturationConfig(), {"model.activation": "relu"}))


def test_registered():
    for name in ("placement", "placement_saturation"):
        assert experiments.get(name).chapter == "12_placement"
    PlacementConfig.full(), SaturationConfig.full()


def test_stacked_saturation_runs_match_the_sequential_ones():
    """placement_saturation trains its seeds stacked; a short, stable run is the same network."""
    from bnlib import protocol
    cfg = override(SaturationConfig(), {"data": "wine", "n_train": None, "seeds": (0, 1),
                                        "train.steps": 5, "train.lr": 0.05, "device": "cpu"})
    seq = list(protocol.trained(cfg, arms=["BN"]))
    stk = list(protocol.trained(cfg, arms=["BN"], stacked=True))
    x = seq[0][4].test.x
    for (_, s1, _, n1, _), (_, s2, _, n2, _) in zip(seq, stk):
        assert s1 == s2
        torch.testing.assert_close(n1(x), n2(x), rtol=1e-4, atol=1e-5)
