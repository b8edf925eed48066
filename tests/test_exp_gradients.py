"""Mechanics of chapter 9's experiments (bnlib.experiments.gradients), on tiny configs."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlib.experiments import gradients as gr
from bnlib.config import override
from bnlib.models import mlp


def _regression():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randn(64, 1)
    return nn.Linear(5, 1, bias=False), x, y


def test_landscape_probe_is_exact_on_a_quadratic():
    # L(w) = mean((Xw − y)²) has Hessian H = 2XᵀX/n, so ∇L(θ − s·g) − g = −s·H·g for every
    # step s: β_eff = ‖Hg‖/‖g‖ and the gradient drift grows linearly with the multiplier.
    model, x, y = _regression()
    lr, mults = 0.1, (0.5, 1.0, 4.0)
    r = gr.landscape_probe(model, x, y, lr=lr, multipliers=mults, loss=F.mse_loss)
    w = model.weight.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.mse_loss(x @ w.T, y), [w])
    hg = (2 * x.T @ x / len(x)) @ g.flatten()
    assert r["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-5)
    assert r["beta_eff"] == pytest.approx((hg.norm() / g.norm()).item(), rel=1e-4)
    assert r["grad_pred"] == pytest.approx(4.0 * lr * hg.norm().item(), rel=1e-4)
    losses = [F.mse_loss(x @ (w - c * lr * g).T, y).item() for c in mults]
    assert r["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-4, abs=1e-7)


def test_landscape_probe_leaves_model_and_buffers_alone():
    torch.manual_seed(0)
    net = mlp(6, 3, depth=2, width=8, norm="batch").eval()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    r = gr.landscape_probe(net, x, y, lr=0.1)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert not net.training  # mode restored
    assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("loss_range", "grad_pred", "beta_eff"))


def test_landscape_probe_rejects_bad_inputs():
    model, x, y = _regression()
    with pytest.raises(ValueError, match="lr"):
        gr.landscape_probe(model, x, y, lr=0.0, loss=F.mse_loss)
    with pytest.raises(ValueError, match="multipliers"):
        gr.landscape_probe(model, x, y, lr=0.1, multipliers=(-1.0,), loss=F.mse_loss)
    with pytest.raises(ValueError, match="every"):
        gr.LandscapeProbe(0.1, every=0)


def test_landscape_tiny_run_has_all_three_records():
    cfg = override(gr.LandscapeConfig(), {"model.depth": 2, "model.width": 8, "train.steps": 6,
                                          "train.eval_every": 3, "probe_every": 3, "seeds": (0,)})
    df = gr.landscape(cfg)
    assert set(df["record"]) == {"history", "probe", "gradnorm"}
    probes = df[df["record"] == "probe"]
    assert sorted(probes[probes["arm"] == "BN"]["step"]) == [1, 3, 6]
    assert len(df[(df["record"] == "gradnorm") & (df["arm"] == "plain")]) == 6
    fl = gr.gradient_fluctuation(df)
    assert set(fl["arm"]) == {"plain", "BN"} and (fl["jump"] >= 0).all()
    matched = gr.at_matched_loss(df, 0.0, 100.0)
    assert len(matched) == 2 and (matched["n"] > 0).all()
    with pytest.raises(ValueError):
        gr.at_matched_loss(df, 1.0, 0.5)


def test_gradient_fluctuation_on_known_series():
    steps = np.arange(1, 9)
    df = pd.DataFrame({"arm": "a", "seed": 0, "step": steps, "record": "gradnorm",
                       "grad_norm": np.where(steps % 2, 1.0, 2.0)})
    const = df.assign(arm="b", grad_norm=3.0)
    out = gr.gradient_fluctuation(pd.concat([df, const])).set_index("arm")
    assert out.loc["a", "jump"] == pytest.approx(math.log(2))
    assert out.loc["b", "jump"] == 0 and out.loc["b", "cv"] == 0
    with pytest.raises(ValueError, match="no gradient-norm rows"):
        gr.gradient_fluctuation(df, start=100)


def test_growth_rates_recovers_a_geometric_profile():
    layers = np.arange(21)
    df = pd.DataFrame({"arm": "BN", "seed": 0, "layer": layers, "rel_grad": 1.3 ** (20 - layers)})
    out = gr.growth_rates(df, first=2, last=15)
    assert out["rate"].iloc[0] == pytest.approx(1.3)
    assert out["ratio"].iloc[0] == pytest.approx(1.3 ** 19)
    with pytest.raises(ValueError, match="at least 2 layers"):
        gr.growth_rates(df, first=10, last=10)


def test_grad_explosion_tiny_run():
    cfg = gr.ExplosionConfig(depths=(12,), widths=(32,), batch_sizes=(64,), activations=("relu",),
                             arms=("plain", "BN"), seeds=(0,))
    df = gr.grad_explosion(cfg)
    assert len(df) == 2 * 13 and (df["grad_norm"] > 0).all()
    assert np.allclose(df["rel_grad"], df["grad_norm"] / df["weight_norm"])
    rates = gr.growth_rates(df, first=2, last=9).set_index("arm")["rate"]
    assert rates["BN"] > rates["plain"]  # BN's gradients grow towards the input
    assert gr.RELU_BN_RATE == pytest.approx(math.sqrt(math.pi / (math.pi - 1)))
    with pytest.raises(ValueError, match="unknown arms"):
        gr.grad_explosion(dataclasses.replace(cfg, arms=("layer norm",)))


def test_registered_landscape_smoke():
    from bnlib import experiments
    df = experiments.run("landscape", cache_results=False, seeds=(0,), train__steps=4,
                         train__eval_every=2, probe_every=2, model__depth=2, model__width=8)
    assert set(df["arm"]) == {"plain", "BN"} and df.attrs["config"].train.steps == 4
