"""Mechanics of chapter 6's experiments (bnlib.experiments.covariate_shift), on tiny configs."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlib.config import override
from bnlib.experiments import covariate_shift as cs
from bnlib.models import MLPSpec, mlp
from bnlib.protocol import load_data
from bnlib.nn import ShiftNoise


def test_noisy_spec_builds_paired_nets_with_noise():
    from bnlib import data as datasets
    ds = datasets.load("digits")
    quiet, noisy = cs.NoisySpec(MLPSpec(depth=2, width=8)), cs.NoisySpec(MLPSpec(depth=2, width=8), noise=True)
    a, b = quiet.build(0, ds), noisy.build(0, ds)
    assert torch.equal(a.blocks[0].layer.weight, b.blocks[0].layer.weight)  # same init stream
    assert isinstance(b.blocks[1].norm[1], ShiftNoise) and isinstance(a.blocks[1].norm, nn.Identity)


def test_shift_probe_records_moments_and_bn_guarantee():
    torch.manual_seed(0)
    net = mlp(6, 3, depth=2, width=8, norm="batch")
    block = net.blocks[-1]
    probe = cs.ShiftProbe(torch.randn(40, 6), every=1)
    before = block.norm.running_mean.clone()
    probe.on_train_start(net)
    with torch.no_grad():
        block.layer.weight.mul_(2.0)
    probe.record(1, net)
    rows = probe.frame()
    assert list(rows["step"]) == [0, 1] and pd.isna(rows["d_mean"].iloc[0])
    assert rows["d_mean"].iloc[1] > 0
    assert rows["bn_mean_err"].max() < 1e-5 and rows["bn_var_err"].max() < 1e-2
    assert torch.equal(block.norm.running_mean, before)  # probes never move running stats
    with pytest.raises(ValueError):
        cs.ShiftProbe(torch.randn(4, 6), every=0)


def test_noisy_bn_tiny_run_and_summary():
    cfg = override(cs.NoisyBNConfig(), {"model.net.width": 16, "train.steps": 6, "train.eval_every": 3,
                                        "probe_every": 2, "seeds": (0,), "probe_size": 32})
    cfg = dataclasses.replace(cfg, arms={a: cfg.arms[a] for a in ("BN", "noisy BN")})
    df = cs.noisy_bn(cfg)
    assert set(df["record"]) == {"history", "probe"} and set(df["arm"]) == {"BN", "noisy BN"}
    runs = cs.run_summary(df, early_step=3)
    assert len(runs) == 2 and runs["test_acc"].between(0, 1).all()
    assert runs["val_acc_early"].notna().all() and (runs["d_mean"] > 0).all()


def test_layer_groups_put_each_weight_first():
    groups = cs.layer_groups(mlp(4, 2, depth=2, width=3, norm="batch"))
    assert groups[0][0] == "blocks.0.layer.weight" and "blocks.0.norm.weight" in groups[0]
    assert groups[-1][0] == "head.weight" and len(groups) == 3


def test_ics_measure_matches_a_hand_computation():
    torch.manual_seed(0)
    net = mlp(4, 2, depth=1, width=3, activation="identity")  # layer 0, then the head (layer 1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    params = dict(net.named_parameters())
    lr = 0.3
    (row,) = cs.ics_measure(net, params, x, y, loss=F.cross_entropy, lr=lr, layers=[1])
    assert row["loss"] == pytest.approx(F.cross_entropy(net(x), y).item(), rel=1e-6)
    # by hand: G at θ; G′ after the first layer's weight and bias took their SGD step
    loss = F.cross_entropy(net(x), y)
    g = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    w0 = net.blocks[0].layer.weight - lr * g["blocks.0.layer.weight"]
    b0 = net.blocks[0].layer.bias - lr * g["blocks.0.layer.bias"]
    head_w = net.head.weight.detach().clone().requires_grad_(True)
    out = F.linear(F.linear(x, w0.detach(), b0.detach()), head_w, net.head.bias.detach())
    (g2,) = torch.autograd.grad(F.cross_entropy(out, y), [head_w])
    g1 = g["head.weight"]
    assert row["cosine"] == pytest.approx(F.cosine_similarity(g1.flatten(), g2.flatten(), 0).item(), abs=1e-6)
    assert row["rel_diff"] == pytest.approx(((g1 - g2).norm() / g1.norm()).item(), rel=1e-5)


def test_ics_measure_is_tiny_for_a_tiny_step_and_checks_inputs():
    torch.manual_seed(0)
    net = mlp(4, 2, depth=3, width=5, norm="batch")
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    rows = cs.ics_measure(net, dict(net.named_parameters()), x, y, loss=F.cross_entropy,
                          lr=1e-7, layers=[1, 3])
    assert [r["layer"] for r in rows] == [1, 3]
    assert all(r["cosine"] > 0.9999 and r["rel_diff"] < 1e-4 for r in rows)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())  # not mutated
    with pytest.raises(ValueError, match="layers"):
        cs.ics_measure(net, dict(net.named_parameters()), x, y, loss=F.cross_entropy, lr=0.1, layers=[0])
    with pytest.raises(ValueError, match="lr"):
        cs.ics_measure(net, dict(net.named_parameters()), x, y, loss=F.cross_entropy, lr=-1, layers=[1])


def test_ics_probe_on_fit_and_tiny_run():
    cfg = override(cs.ICSConfig(), {"dln_model.depth": 3, "dln_samples": 64, "dln_train.batch_size": 64,
                                    "dln_train.steps": 3, "dln_at": (1, 3), "dln_layers": (1, 2),
                                    "model.depth": 3, "model.width": 8, "train.steps": 4, "at": (1, 4),
                                    "layers": (1,), "seeds": (0, 1)})
    df = cs.ics_gradient(cfg)
    assert set(df["part"]) == {"dln", "mlp"} and set(df["arm"]) == {"plain", "BN"}
    assert set(df[df["part"] == "dln"]["step"]) == {1, 3} and set(df[df["part"] == "mlp"]["step"]) == {1, 4}
    assert df["cosine"].between(-1 - 1e-6, 1 + 1e-6).all() and (df["loss"] > 0).all()
    summary = cs.ics_summary(df, "dln")
    assert set(summary.columns) >= {"min_cosine", "mean_rel_diff", "final_loss"} and len(summary) == 4
    with pytest.raises(ValueError, match="parts"):
        cs.ics_gradient(dataclasses.replace(cfg, parts=("vgg",)))


def test_dln_data_has_the_declared_samples():
    cfg = dataclasses.replace(cs.ICSConfig(), data="deep_linear", preprocessing="raw")
    ds = load_data(cfg)
    assert len(ds.train) == cfg.dln_samples and ds.num_classes is None and ds.num_features == 10


def test_configs_declare_margin_and_eight_seeds():
    cfg = cs.NoisyBNConfig()
    assert len(cfg.seeds) >= 8 and 0 < cfg.margin < 0.1  # "no difference" needs a TOST on ≥ 8 seeds
    assert len(cs.ICSConfig().seeds) >= 8
    assert cs.NoisyBNConfig.full().margin == cfg.margin
    assert cs.NoisyBNConfig.full().model.net.channels[0] == 64 and cs.ICSConfig.full().dln_samples == 1000
