"""Chapter 15: does batch norm replace dropout and weight decay, or combine with them (M3, F10)?

* ``dropout_variance_shift`` — dropout before the BNs vs after the last one: the variance
  shift (Li et al. 2019) as the ratio of the inference-time variance of the last BN's input
  to its running variance, with the running statistics, statistics recomputed in training
  mode (dropout on, like ``torch.optim.swa_utils.update_bn``) and bnlib's eval-mode recompute.
* ``wd_weight_scaling`` — exact, no training question: scale a weight that feeds a BN and
  the loss stays, the gradient shrinks by the factor and is orthogonal to the weight.
* ``weight_decay_bn`` — BN nets trained at weight-decay doses whose *dose*
  ``λ·η·steps/(1−μ)`` (the log-shrink pure decay would apply) is 0, about 0.3 and about 3;
  :class:`bnlib.probes.WeightNormTracker` records ‖W‖ and the effective learning rate.
* ``regularizer_grid`` — BN vs BN + dropout vs BN + weight decay, learning rate tuned per
  arm on validation with tuning seeds, 8 paired reported seeds, on digits and MNIST-1D.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import analysis, protocol
from ..config import override
from ..inference import evaluate, recompute_batchnorm_stats, recompute_in_train_mode
from ..models import MLPSpec, Net
from ..probes import capture, dropout_disabled, frozen_batchnorm_buffers
from ..protocol import Protocol, Tuning
from ..train import TrainSpec, fit
from . import register

# --- measurements ---------------------------------------------------------------------

@torch.no_grad()
def variance_ratio(model: Net, x: Tensor, bn: nn.Module | None = None) -> float:
    """Median over units of ``Var_eval(input of bn) / bn.running_var`` on ``x`` in eval mode
    (dropout off, BNs on running statistics). 1: no shift; below 1 the layer's outputs are
    shrunk at inference. ``bn`` defaults to the last block's norm."""
    bn = bn if bn is not None else model.blocks[-1].norm
    if getattr(bn, "running_var", None) is None:
        raise ValueError("bn must be a batch-norm layer with running statistics")
    if len(x) < 2:
        raise ValueError("need at least 2 examples to measure a variance")
    was = model.training
    model.eval()
    with capture({"bn": bn}) as seen:
        model(x)
    model.train(was)
    return float((seen["bn"].float().var(0, unbiased=True) / bn.running_var).median())


def weight_scaling_check(model: Net, x: Tensor, y: Tensor, layer: nn.Module,
                         factor: float = 10.0) -> dict:
    """Loss and gradient of ``layer.weight`` before and after multiplying it by ``factor``,
    in training mode (BN buffers and the weight restored). Returns ``loss, loss_scaled,
    grad_norm, grad_norm_scaled, grad_ratio`` and ``cos_w_grad`` (before scaling)."""
    if not (factor > 0 and np.isfinite(factor)):
        raise ValueError(f"factor must be a positive finite number, got {factor}")
    w = layer.weight
    original = w.detach().clone()
    was = model.training
    model.train()
    out = {}
    try:
        with frozen_batchnorm_buffers(model), dropout_disabled(model):
            for tag, scale in (("", 1.0), ("_scaled", factor)):
                with torch.no_grad():
                    w.copy_(original * scale)
                loss = F.cross_entropy(model(x), y)
                (g,) = torch.autograd.grad(loss, [w])
                out["loss" + tag] = loss.item()
                out["grad_norm" + tag] = g.norm().item()
                if not tag:
                    out["cos_w_grad"] = float(F.cosine_similarity(original.flatten(), g.flatten(), dim=0))
    finally:
        with torch.no_grad():
            w.copy_(original)
        model.train(was)
    out["grad_ratio"] = out["grad_norm"] / out["grad_norm_scaled"]
    return out


def dose(weight_decay: float, train: TrainSpec) -> float:
    """``λ·η·steps/(1−μ)``: the log of the factor by which weight decay alone would shrink a
    weight over the run (SGD with momentum μ; ‖W‖ × exp(−dose)). Of order one or more, the
    decay can act; ≪ 1, it cannot."""
    return weight_decay * train.lr * train.steps / (1.0 - train.momentum)


# --- variance shift -------------------------------------------------------------------

@dataclass(frozen=True)
class VarianceShiftConfig(Protocol):
    """A BN MLP with dropout nowhere, before every BN'd layer, or only after the last BN."""

    model: MLPSpec = MLPSpec(depth=3, width=64, norm="batch", dropout=0.5)  # p = 0.5: the shift is 1/(1-p)-sized
    train: TrainSpec = TrainSpec(lr=0.1, momentum=0.9, steps=150, eval_every=150,
                                 eval_splits=("test",))  # long enough for the running stats to settle
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "BN": {"model.dropout": 0.0}, "dropout before BN": {"model.dropout_at": "blocks"},
        "dropout after last BN": {"model.dropout_at": "head"}})
    seeds: tuple[int, ...] = (0, 1)  # a mechanism: the asserts hold for every seed

    FULL = {"data": "fashion_mnist", "model.depth": 6, "model.width": 512, "train.steps": 5000,
            "train.eval_every": 5000}


@register("dropout_variance_shift", VarianceShiftConfig, title="Dropout before BN: the variance shift",
          chapter="15_regularizers")
def dropout_variance_shift(cfg: VarianceShiftConfig) -> pd.DataFrame:
    """One row per arm × seed × statistics: ``variance_ratio, test_accuracy``."""
    if not 0.0 < cfg.model.dropout < 1.0:
        raise ValueError(f"dropout p must be in (0, 1), got {cfg.model.dropout}")
    if cfg.model.depth < 2:
        raise ValueError("dropout before a BN needs depth ≥ 2 (the first layer gets no dropout)")
    rows = []
    for arm, seed, _, net, data in protocol.trained(cfg):
        x = data.train.x.to(next(net.parameters()).device)
        torch.manual_seed(seed)  # the dropout masks of the train-mode recomputation
        naive = recompute_in_train_mode(copy.deepcopy(net), x)
        exact = recompute_batchnorm_stats(copy.deepcopy(net), x)
        for stats, m in (("running (as trained)", net), ("recomputed in train mode", naive),
                         ("recomputed in eval mode", exact)):
            rows.append(dict(arm=arm, seed=seed, stats=stats, variance_ratio=variance_ratio(m, x),
                             test_accuracy=evaluate(m, data.test)[1]))
    return pd.DataFrame(rows)


# --- weight decay: the exact part -------------------------------------------------------

@dataclass(frozen=True)
class ScalingConfig(Protocol):
    """Briefly train a BN MLP, then scale one hidden weight (BN follows) and the classifier."""

    model: MLPSpec = MLPSpec(depth=3, width=64, norm="batch")  # the middle layer feeds a BN
    train: TrainSpec = TrainSpec(lr=0.1, momentum=0.9, steps=50, eval_every=50,
                                 eval_splits=("val",))  # away from the init; exactness needs no more
    seeds: tuple[int, ...] = (0, 1, 2)  # an identity: every seed must pass
    factor: float = 10.0  # the scale applied to the weight
    probe_batch: int = 256  # examples in the one forward/backward pass

    FULL = {"model.depth": 6, "model.width": 512, "factor": 100.0}


@register("wd_weight_scaling", ScalingConfig, title="Scaling a BN'd weight: same loss, smaller gradient",
          chapter="15_regularizers")
def wd_weight_scaling(cfg: ScalingConfig) -> pd.DataFrame:
    """One row per seed × layer: loss before/after scaling, gradient norms and their ratio,
    cosine(weight, gradient)."""
    if cfg.model.depth < 2:
        raise ValueError("need depth ≥ 2 so that a hidden layer is followed by a BN")
    data = cfg.model.inputs(protocol.load_data(cfg))
    rows = []
    for seed in cfg.seeds:
        net = fit(cfg.model, protocol.train_spec(cfg), data, seed).attrs["model"]
        dev = next(net.parameters()).device
        x, y = data.train.x[:cfg.probe_batch].to(dev), data.train.y[:cfg.probe_batch].to(dev)
        mid = len(net.blocks) // 2
        for name, layer in ((f"hidden layer {mid + 1} (BN follows)", net.blocks[mid].layer),
                            ("classifier (no BN follows)", net.head)):
            rows.append(dict(seed=seed, layer=name, factor=cfg.factor,
                             **weight_scaling_check(net, x, y, layer, cfg.factor)))
    return pd.DataFrame(rows)


# --- weight decay: the effective learning rate -------------------------------------------

@dataclass(frozen=True)
class WeightDecayConfig(Protocol):
    """A BN MLP trained at several weight-decay doses; hidden weight norms tracked."""

    model: MLPSpec = MLPSpec(depth=2, width=64, norm="batch")  # both hidden weights feed a BN
    train: TrainSpec = TrainSpec(lr=0.1, momentum=0.9, steps=300, eval_every=300)
    # λ·η·steps/(1−μ) = 0, 0.3, 3: from "cannot act" to "would shrink ‖W‖ 20× on its own"
    weight_decays: tuple[float, ...] = (0.0, 1e-3, 1e-2)
    seeds: tuple[int, ...] = (0, 1)  # a mechanism: the asserts hold for every seed
    every: int = 25  # steps between norm records

    FULL = {"data": "fashion_mnist", "model.depth": 4, "model.width": 512, "train.steps": 10000,
            "train.eval_every": 1000, "weight_decays": (0.0, 3e-5, 3e-4), "every": 250}


@register("weight_decay_bn", WeightDecayConfig, title="Weight decay on BN'd weights: the effective LR",
          chapter="15_regularizers")
def weight_decay_bn(cfg: WeightDecayConfig) -> pd.DataFrame:
    """Per weight decay × seed × recorded step × hidden layer: the tracker's ``w_norm,
    w_ratio, eff_lr, lr_over_w2, cos_wg``, with ``weight_decay``, ``dose`` and the run's
    final ``val_accuracy``."""
    if any(wd < 0 for wd in cfg.weight_decays):
        raise ValueError(f"weight decays must be ≥ 0, got {cfg.weight_decays}")
    data = protocol.load_data(cfg)
    frames = []
    for wd in cfg.weight_decays:
        spec = override(protocol.train_spec(cfg), {"weight_decay": wd})
        for seed in cfg.seeds:
            probe = protocol.HiddenWeightNorms(spec.lr, cfg.every)
            h = fit(cfg.model, spec, data, seed, callbacks=[probe])
            val = analysis.final(h.assign(run=0), split="val", keys=["run"])["accuracy"].iloc[0]
            frames.append(probe.tracker.frame().assign(weight_decay=wd, dose=dose(wd, spec), seed=seed,
                                               val_accuracy=val))
    return pd.concat(frames, ignore_index=True)


def plot_weight_decay(df: pd.DataFrame):
    """‖W‖/‖W₀‖ and η/‖W‖² of the last hidden layer along training, one line per dose."""
    from .. import plots
    d = df[df["layer"] == df["layer"].max()].assign(
        dose=lambda t: [f"λ={w:g} (dose {x:.2g})" for w, x in zip(t["weight_decay"], t["dose"])])
    fig, axes = plots.new_axes(2, width=5.5)
    for ax, y, label in zip(axes[0], ("w_ratio", "lr_over_w2"),
                            ("‖W‖ / ‖W₀‖ (last hidden layer)", "effective LR  η / ‖W‖²")):
        plots.draw_curves(d, y=y, hue="dose", split=None, logy=y == "lr_over_w2", ax=ax)
        ax.set_ylabel(label)
    return fig


# --- the accuracy comparison -----------------------------------------------------------

def _grid_arms() -> dict[str, dict[str, Any]]:
    return {"BN": {},
            "BN + dropout": {"model.dropout": 0.3, "model.dropout_at": "head"},  # after the last BN
            "BN + WD": {"train.weight_decay": 2e-2}}  # dose 0.4–4 over the lr grid


@dataclass(frozen=True)
class GridConfig(Protocol):
    """BN alone vs BN + dropout vs BN + weight decay; lr tuned per arm; two data sets."""

    # small training sets: something to regularize; MNIST-1D is far from its ceiling
    datasets: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"digits": {"n_train": 300}, "mnist1d": {"n_train": 1000}})
    model: MLPSpec = MLPSpec(depth=2, width=64, norm="batch")  # small enough for 8 seeds × 2 data sets
    train: TrainSpec = TrainSpec(lr=0.03, momentum=0.9, steps=200, eval_every=200,
                                 eval_splits=("val", "test"))
    arms: dict[str, dict[str, Any]] = field(default_factory=_grid_arms)
    # three points to fit the time budget; edge choices allowed and flagged (see chapter text)
    tuning: Tuning = Tuning(grid=(0.01, 0.03, 0.1), seeds=(1000, 1001), allow_edge=True)
    margin: float = 0.01  # smallest test-accuracy difference that matters (1 point), declared before the run

    FULL = {"datasets": {"fashion_mnist": {"n_train": 5000}, "mnist1d": {"n_train": None}},
            "model.depth": 4, "model.width": 512, "train.steps": 5000, "train.eval_every": 5000,
            "tuning.grid": (0.003, 0.01, 0.03, 0.1, 0.3),
            "arms": {**_grid_arms(), "BN + WD": {"train.weight_decay": 1e-3}}}


@register("regularizer_grid", GridConfig, title="BN alone vs BN + dropout vs BN + weight decay",
          chapter="15_regularizers")
def regularizer_grid(cfg: GridConfig) -> pd.DataFrame:
    """:func:`bnlib.protocol.tuned` per data set (column ``data``): tuning rows and the
    reported runs at each arm's chosen ``lr``."""
    frames = []
    for name, extra in cfg.datasets.items():
        dcfg = override(cfg, {"data": name, **extra})
        frames.append(protocol.tuned(dcfg).assign(data=name))
    return pd.concat(frames, ignore_index=True)


def grid_verdicts(df: pd.DataFrame, cfg: GridConfig) -> pd.DataFrame:
    """BN + X against BN on test accuracy, per data set: :func:`bnlib.analysis.compare_family`
    over every (data set, addition) with the config's margin (Holm over the family).
    Columns ``comparison, data, verdict, mean, ci_low, ci_high, p, p_tost, lr_x, lr_bn, dose``."""
    rep = protocol.rows(df)
    fin = analysis.final(rep, split="test", keys=["data", "arm", "seed"])
    family, lrs = {}, rep.groupby(["data", "arm"])["lr"].first()
    for data in cfg.datasets:
        f = fin[fin["data"] == data]
        for arm in cfg.arms:
            if arm != "BN":
                family[f"{data}: {arm} − BN"] = analysis.pairs(f, "accuracy", arm, "BN")
    out = analysis.compare_family(family, margin=cfg.margin)
    rows = []
    for k, c in out.items():
        data, arm = k.split(": ")[0], k.split(": ")[1].split(" − ")[0]
        wd = override(cfg, cfg.arms[arm]).train.weight_decay
        rows.append(dict(comparison=k, data=data, arm=arm, **c.row(),
                         lr_x=lrs[(data, arm)], lr_bn=lrs[(data, "BN")],
                         dose=dose(wd, override(cfg.train, {"lr": lrs[(data, arm)]}))))
    return pd.DataFrame(rows)
