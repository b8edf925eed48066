"""Chapter 17 (M5): batch norm on the input layer and on the output logits.

One experiment, ``input_output``: a BN MLP on *raw* digits (pixels 0–16) with four arms,

* ``no extra BN``: the hidden layers' BN only (the usual network);
* ``input BN``: a ``BatchNorm1d`` on the 64 raw pixels, in front of the first layer;
* ``output BN (affine)``: a ``BatchNorm1d`` on the 10 logits, with learnable γ, β;
* ``output BN (no affine)``: the same without γ, β: every logit is forced to mean 0 and
  variance 1 over the batch,

each at its own learning rate (tuned on the validation *loss*: the question is about
loss and calibration), paired seeds. Every run reports test accuracy, loss and the
expected calibration error (:func:`expected_calibration_error`), and for the input-BN arm
how strongly its running statistics amplify each pixel (:func:`input_gains`).

Why input BN can hurt: a pixel that is (almost) always 0 in training has a running
variance near 0, so at test time BN multiplies it by ``1/√(var + ε)``, up to ``1/√ε ≈
316`` for ``ε = 1e-5``; the few test images that do ink that pixel get a huge input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data as datasets
from .. import nn as bnn
from ..models import mlp
from ..train import seeded, train
from . import Config, register, sweep
from ._common import tune_lr

__all__ = ["IOConfig", "input_output", "ARMS", "build_model", "train_one", "expected_calibration_error",
           "reliability", "input_gains", "extreme_inputs", "summary", "best_runs",
           "plot_input_output"]

ARMS = ("no extra BN", "input BN", "output BN (affine)", "output BN (no affine)")


# --- calibration --------------------------------------------------------------------------

def _check_probs(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    probs, labels = torch.as_tensor(probs).detach().cpu().double(), torch.as_tensor(labels).detach().cpu()
    if probs.dim() != 2 or labels.dim() != 1 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError("probs must be (N, classes) and labels (N,) with N ≥ 1")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative (pass softmax outputs)")
    if not torch.allclose(probs.sum(1), torch.ones(len(probs), dtype=probs.dtype), atol=1e-4):
        raise ValueError("each row of probs must sum to 1 (pass softmax outputs, not logits)")
    return probs, labels


def reliability(probs: Tensor, labels: Tensor, n_bins: int = 15) -> pd.DataFrame:
    """Reliability table: examples binned by confidence (the top probability) into
    ``n_bins`` equal-width bins of [0, 1]; per non-empty bin ``count``, mean
    ``confidence`` and ``accuracy``."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be ≥ 1, got {n_bins}")
    probs, labels = _check_probs(probs, labels)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    # bin b holds confidences in (b/n, (b+1)/n]; confidence 0 cannot occur for a softmax
    bins = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = bins == b
        if m.any():
            rows.append(dict(bin=b, lo=b / n_bins, hi=(b + 1) / n_bins, count=int(m.sum()),
                             confidence=float(conf[m].mean()), accuracy=float(correct[m].mean())))
    return pd.DataFrame(rows)


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE = Σ_bins (n_b / N) · |accuracy_b − confidence_b| over ``n_bins`` equal-width
    confidence bins (Guo et al. 2017's estimator). 0 is perfectly calibrated."""
    t = reliability(probs, labels, n_bins)
    return float((t["count"] / t["count"].sum() * (t["accuracy"] - t["confidence"]).abs()).sum())


# --- models ---------------------------------------------------------------------------------

def build_model(arm: str, in_features: int, num_classes: int, *, depth: int = 2, width: int = 128,
                norm_impl: str = "bnlib") -> nn.Module:
    """The BN MLP of ``arm`` (one of :data:`ARMS`): ``input BN`` puts a ``BatchNorm1d``
    on the raw inputs in front of it, ``output BN …`` one on its logits."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    lib = {"bnlib": bnn, "torch": nn}.get(norm_impl)
    if lib is None:
        raise ValueError(f"norm_impl must be 'bnlib' or 'torch', got {norm_impl!r}")
    net = mlp(in_features, num_classes, depth=depth, width=width, norm="batch", norm_impl=norm_impl)
    if arm == "input BN":
        return nn.Sequential(lib.BatchNorm1d(in_features), net)
    if arm.startswith("output BN"):
        return nn.Sequential(net, lib.BatchNorm1d(num_classes, affine=arm == "output BN (affine)"))
    return net


@torch.no_grad()
def input_gains(model: nn.Module, x_test: Tensor | None = None) -> pd.DataFrame:
    """Per input feature of an ``input BN`` model: the running mean and variance, the
    *gain* ``1/√(running_var + ε)`` that eval mode multiplies the feature by, and, given
    ``x_test``, the largest |normalised value| ``max_abs_z`` a test example produces there."""
    if not (isinstance(model, nn.Sequential) and isinstance(model[0], (bnn.BatchNorm1d, nn.BatchNorm1d))):
        raise ValueError("not an 'input BN' model (build_model('input BN', ...))")
    bn = model[0]
    var, mean = bn.running_var.detach().cpu(), bn.running_mean.detach().cpu()
    out = pd.DataFrame({"feature": np.arange(len(var)), "running_mean": mean.numpy(),
                        "running_var": var.numpy(),
                        "gain": torch.rsqrt(var + bn.eps).numpy()})
    if x_test is not None:
        z = (x_test.detach().cpu() - mean) * torch.rsqrt(var + bn.eps)
        out["max_abs_z"] = z.abs().max(0).values.numpy()
    return out


# --- the experiment -------------------------------------------------------------------------

@dataclass(frozen=True)
class IOConfig(Config):
    """Extra BN on the input or on the logits of a 2×128 BN MLP on raw digits.

    Quick: 300 SGD steps of batch 32, LR ∈ {0.03, 0.1, 0.3} tuned per arm on the
    validation loss, 3 seeds, torch's BatchNorm1d (the same arithmetic as bnlib's,
    chapter 1; faster on a CPU). Full: raw MNIST (pixels 0–255), 5 seeds, longer.
    """

    data: str = "digits"
    preprocessing: str = "raw"
    arms: tuple[str, ...] = ARMS
    lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    steps: int = 300
    batch_size: int = 32
    depth: int = 2
    width: int = 128
    n_bins: int = 15
    norm_impl: str = "torch"

    @classmethod
    def full(cls) -> "IOConfig":
        return cls(data="mnist", width=256, steps=5000, batch_size=64,
                   lrs=(0.003, 0.01, 0.03, 0.1, 0.3), seeds=(0, 1, 2, 3, 4))


def train_one(cfg: IOConfig, arm: str, lr: float, seed: int,
              data: datasets.Dataset | None = None) -> tuple[nn.Module, datasets.Dataset, pd.DataFrame]:
    """Train one run of the experiment (exactly as the sweep does): returns the trained
    model (eval mode), the dataset (on the model's device) and the training history.
    The chapter uses it to look inside one model (gains, reliability diagram)."""
    data = data if data is not None else datasets.load(cfg.data, preprocessing=cfg.preprocessing)
    net = seeded(seed, lambda: build_model(arm, data.num_features, data.num_classes,
                                           depth=cfg.depth, width=cfg.width, norm_impl=cfg.norm_impl))
    hist = train(net, data, steps=cfg.steps, lr=lr, batch_size=cfg.batch_size, seed=seed,
                 eval_every=cfg.steps, eval_splits=("val", "test"), device=cfg.device,
                 show_progress=False)
    return net, data.to(next(net.parameters()).device), hist


@torch.no_grad()
def extreme_inputs(model: nn.Module, split: datasets.Split, threshold: float = 10.0) -> dict:
    """For an ``input BN`` model: the fraction of examples of ``split`` with some
    normalised input beyond ``threshold`` in absolute value (never the case for a
    standardised feature of a typical example), and the share of the split's total
    cross-entropy that those examples carry."""
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    bn = model[0]
    z = (split.x - bn.running_mean) * torch.rsqrt(bn.running_var + bn.eps)
    extreme = z.abs().max(1).values > threshold
    losses = F.cross_entropy(model(split.x), split.y, reduction="none")
    total = float(losses.sum())
    return {"extreme_frac": float(extreme.double().mean()),
            "extreme_loss_share": float(losses[extreme].sum()) / total if total > 0 else math.nan}


def _io_run(*, seed: int, data: datasets.Dataset, arm: str, lr: float, cfg: IOConfig) -> pd.DataFrame:
    net, data, hist = train_one(cfg, arm, lr, seed, data)
    if hist["diverged"].any():
        return hist
    with torch.no_grad():
        probs = F.softmax(net(data.test.x), dim=1)
    conf = probs.max(1).values
    last = hist["step"] == hist["step"].max()
    test = last & (hist["split"] == "test")
    hist.loc[test, "ece"] = expected_calibration_error(probs, data.test.y, cfg.n_bins)
    hist.loc[test, "confidence"] = float(conf.mean())
    if arm == "input BN":
        g = input_gains(net, data.test.x)
        hist.loc[test, "max_gain"] = float(g["gain"].max())
        hist.loc[test, "max_abs_z"] = float(g["max_abs_z"].max())
        for k, v in extreme_inputs(net, data.test).items():
            hist.loc[test, k] = v
    return hist


@register("input_output", IOConfig, title="Batch norm on the input layer and on the logits",
          chapter="17_input_output", plot=lambda df: plot_input_output(df))
def input_output(cfg: IOConfig) -> pd.DataFrame:
    """Histories of every arm × learning rate × seed; the last test row of each run also
    carries ``ece`` and ``confidence`` (mean top probability), and, for ``input BN``,
    ``max_gain`` (largest 1/√(running_var+ε)), ``max_abs_z`` (largest |normalised
    test input|) and :func:`extreme_inputs`' ``extreme_frac``/``extreme_loss_share``."""
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad or not cfg.arms:
        raise ValueError(f"arms must be among {ARMS}, got {cfg.arms}")
    if not cfg.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in cfg.lrs):
        raise ValueError(f"lrs must be positive finite numbers, got {cfg.lrs}")
    ds = datasets.load(cfg.data, preprocessing=cfg.preprocessing)
    return sweep(_io_run, seeds=cfg.seeds, arms={a: {"arm": a} for a in cfg.arms},
                 grid={"lr": list(cfg.lrs)}, common=dict(data=ds, cfg=cfg), desc="input_output")


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, lr, seed): final test ``accuracy``, ``loss``, ``ece``,
    ``confidence``, val ``val_loss``/``val_acc`` (and the input-BN columns when present).
    A diverged run gets accuracy 0 and infinite losses."""
    need = {"arm", "lr", "seed", "step", "split", "loss", "accuracy", "diverged"}
    if not need <= set(df.columns):
        raise ValueError(f"not an input_output result: missing {sorted(need - set(df.columns))}")
    extra = [c for c in ("ece", "confidence", "max_gain", "max_abs_z", "extreme_frac",
                         "extreme_loss_share") if c in df.columns]
    rows = []
    for (arm, lr, seed), run in df.groupby(["arm", "lr", "seed"], sort=False):
        div = bool(run["diverged"].any())
        last = run[run["step"] == run["step"].max()]
        t, v = last[last["split"] == "test"], last[last["split"] == "val"]
        row = dict(arm=arm, lr=lr, seed=seed, diverged=div)
        if div or t.empty:
            row.update(accuracy=0.0, loss=math.inf, val_acc=0.0, val_loss=math.inf)
        else:
            row.update(accuracy=float(t["accuracy"].iloc[0]), loss=float(t["loss"].iloc[0]),
                       val_acc=float(v["accuracy"].iloc[0]), val_loss=float(v["loss"].iloc[0]),
                       **{c: float(t[c].iloc[0]) for c in extra})
        rows.append(row)
    return pd.DataFrame(rows)


def best_runs(df: pd.DataFrame, metric: str = "loss") -> pd.DataFrame:
    """:func:`summary` rows at each arm's learning rate with the best mean validation
    ``metric`` (``"loss"``, minimised, or ``"accuracy"``), never chosen on test."""
    best = tune_lr(df, metric=metric, by=("arm",), lr="lr")[["arm", "lr"]]
    return summary(df).merge(best, on=["arm", "lr"], how="inner")


def plot_input_output(df: pd.DataFrame, axes: Sequence | None = None):
    """Three panels, each arm at its tuned LR (mean ± sd over seeds): test accuracy, test
    loss, expected calibration error."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    b = best_runs(df)
    order = [a for a in ARMS if a in set(b["arm"])]
    for ax, col, title in zip(axes, ("accuracy", "loss", "ece"),
                              ("Test accuracy", "Test loss (cross-entropy)", "Expected calibration error")):
        sns.barplot(data=b, x="arm", y=col, order=order, errorbar=("sd", 1), ax=ax)
        sns.stripplot(data=b, x="arm", y=col, order=order, color="k", size=4, ax=ax)
        ax.set_title(title)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=20)
    axes[0].set_ylim(0.8, 1.0)
    return axes
