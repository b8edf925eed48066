"""Chapter 17 (M5): batch norm on the input layer and on the output logits.

One experiment, ``input_output``: a BN MLP on *raw* digits (pixels 0–16) with four arms,

* ``no extra BN``: the hidden layers' BN only (the usual network);
* ``input BN``: a ``BatchNorm1d`` on the 64 raw pixels, in front of the first layer;
* ``output BN (affine)``: a ``BatchNorm1d`` on the 10 logits, with learnable γ, β;
* ``output BN (no affine)``: the same without γ, β: every logit is forced to mean 0 and
  variance 1 over the batch,

each at its own learning rate (tuned on the validation *loss* with tuning seeds that are never
reported: the question is about loss and calibration), then 8 paired reported seeds. Every run reports test accuracy, loss and the
expected calibration error (:func:`bnlib.analysis.expected_calibration_error`), and for the
input-BN arm how strongly its running statistics amplify each pixel (:func:`input_gains`).

Why input BN can hurt: a pixel that is (almost) always 0 in training has a running
variance near 0, so at test time BN multiplies it by ``1/√(var + ε)``, up to ``1/√ε ≈
316`` for ``ε = 1e-5``; the few test images that do ink that pixel get a huge input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import cache
from .. import data as datasets
from .. import nn as bnn
from ..analysis import expected_calibration_error
from ..config import override
from ..models import MLPSpec
from ..protocol import Protocol, Tuning, arm_config, choose, load_data
from ..train import TrainSpec, fit
from . import register

ARMS = ("no extra BN", "input BN", "output BN (affine)", "output BN (no affine)")


# --- models ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class IOSpec:
    """A BN MLP (``net``) with an optional extra BN: ``extra`` is one of :data:`ARMS`.
    ``input BN`` puts a ``BatchNorm1d`` on the raw inputs in front of it, ``output BN …``
    one on its logits (with or without γ, β). ``build(seed, data)`` like the other specs."""

    kind: ClassVar[str] = "io-mlp"
    # torch's BN layer, for the time budget: these runs go one by one (not stacked), and with
    # bnlib's layer the experiment took 32-38 s of CPU instead of 20-22 (the chapter then ran
    # 53 s in CI); rerun_with_layer repeats one arm with bnlib's layer, as a rounding check
    net: MLPSpec = MLPSpec(depth=2, width=128, norm="batch", norm_impl="torch")
    extra: str = "no extra BN"

    def inputs(self, data: datasets.Dataset) -> datasets.Dataset:
        return data

    def build(self, seed: int, data: datasets.Dataset) -> nn.Module:
        if self.extra not in ARMS:
            raise ValueError(f"extra must be one of {ARMS}, got {self.extra!r}")
        lib = {"bnlib": bnn, "torch": nn}[self.net.norm_impl]
        net = self.net.build(seed, data)
        if self.extra == "input BN":
            return nn.Sequential(lib.BatchNorm1d(data.num_features), net)
        if self.extra.startswith("output BN"):
            return nn.Sequential(net, lib.BatchNorm1d(data.num_classes, affine=self.extra == "output BN (affine)"))
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
class IOConfig(Protocol):
    """Extra BN on the input or on the logits of a 2×128 BN MLP on raw digits."""

    preprocessing: str = "raw"                         # pixels 0–16: input BN sees the raw scale
    model: IOSpec = IOSpec()                           # a 2×128 BN MLP (torch's BN: same arithmetic, faster)
    train: TrainSpec = TrainSpec(steps=200, batch_size=32, eval_every=200)  # one evaluation, at the end
    arms: dict = field(default_factory=lambda: {a: {"model.extra": a} for a in ARMS})
    tuning: Tuning = Tuning(grid=(0.03, 0.1, 0.3, 1.0, 3.0, 10.0), seeds=(1000, 1001), metric="loss")  # val loss
    n_bins: int = 15                                   # ECE bins (Guo et al.'s 15)
    margin: float = 0.03                               # smallest test-accuracy difference that matters

    FULL = {"data": "mnist", "model.net.width": 256, "train.steps": 5000, "train.batch_size": 64,
            "train.eval_every": 5000, "tuning.grid": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)}


def train_one(cfg: IOConfig, arm: str, lr: float, seed: int) -> tuple[nn.Module, datasets.Dataset, pd.DataFrame]:
    """Train one run exactly as the experiment does: returns the trained model (eval mode),
    the data set (on the model's device) and the history. The chapter uses it to look inside
    one model (gains, reliability diagram)."""
    acfg = override(arm_config(cfg, arm), {"train.lr": lr})
    data = load_data(acfg)
    hist = fit(acfg.model, acfg.train, data, seed)
    net = hist.attrs["model"]
    return net, data.to(next(net.parameters()).device), hist


def rerun_with_layer(cfg: IOConfig, df: pd.DataFrame, arm: str, impl: str = "bnlib") -> pd.DataFrame:
    """The reported runs of ``arm`` again, at its chosen learning rate and on the same seeds,
    with the BN layer ``impl`` (``"bnlib"`` or ``"torch"``): the same function computed with
    different float rounding, so any change is the result's sensitivity to rounding. One row
    per seed: ``seed``, ``lr`` and the test ``accuracy``, ``loss``, ``ece``, ``confidence``."""
    if arm not in cfg.arms:
        raise ValueError(f"no arm {arm!r}; arms: {list(cfg.arms)}")
    chosen = df[(df["kind"] == "choice") & (df["arm"] == arm)]["lr"]
    if chosen.empty:
        raise ValueError(f"{arm!r} has no tuning choice in this result")
    lr = float(chosen.iloc[0])
    again = override(cfg, {"model.net.norm_impl": impl})
    return pd.DataFrame([{"seed": seed, **_final(again, arm, lr, seed)} for seed in cfg.seeds])


def _final(cfg: IOConfig, arm: str, lr: float, seed: int) -> dict:
    """One reported run's measures (kept for a resumed computation)."""
    def one() -> dict:
        net, data, hist = train_one(cfg, arm, lr, seed)
        div = bool(hist["diverged"].any())
        return dict(lr=lr, diverged=div, **({} if div else _measures(net, data, arm, cfg.n_bins)))
    return cache.cell({"input_output": cfg, "arm": arm, "lr": lr, "seed": seed}, one)


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


def _measures(net: nn.Module, data: datasets.Dataset, arm: str, n_bins: int) -> dict:
    with torch.no_grad():
        logits = net(data.test.x)
        probs = F.softmax(logits, dim=1)
    out = dict(accuracy=float((probs.argmax(1) == data.test.y).double().mean()),
               loss=float(F.cross_entropy(logits, data.test.y)),
               ece=expected_calibration_error(probs, data.test.y, n_bins),
               confidence=float(probs.max(1).values.mean()))
    if arm == "input BN":
        g = input_gains(net, data.test.x)
        out.update(max_gain=float(g["gain"].max()), max_abs_z=float(g["max_abs_z"].max()),
                   **extreme_inputs(net, data.test))
    return out


@register("input_output", IOConfig, title="Batch norm on the input layer and on the logits",
          chapter="17_input_output", plot=lambda df: plot_input_output(df))
def input_output(cfg: IOConfig) -> pd.DataFrame:
    """Tuning choices (``kind="choice"``) and one row per arm × reported seed
    (``kind="final"``): ``lr``, test ``accuracy``, ``loss``, ``ece``, ``confidence`` and,
    for ``input BN``, ``max_gain``, ``max_abs_z``, ``extreme_frac``, ``extreme_loss_share``."""
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad or not cfg.arms:
        raise ValueError(f"arms must be among {ARMS}, got {list(cfg.arms)}")
    choice = choose(cfg)[1]
    out = [dict(arm=arm, seed=seed, **_final(cfg, arm, float(lr), seed))
           for arm, lr in zip(choice["arm"], choice["lr"]) for seed in cfg.seeds]
    return pd.concat([pd.DataFrame(out).assign(kind="final"), choice.assign(kind="choice")],
                     ignore_index=True)


def final_table(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """``value`` of the reported runs, seeds as rows and arms as columns."""
    f = df[df["kind"] == "final"]
    return f.pivot_table(index="seed", columns="arm", values=value)[[a for a in ARMS if a in set(f["arm"])]]


def plot_input_output(df: pd.DataFrame, axes: Sequence | None = None):
    """Three panels, each arm at its tuned LR (mean ± sd over seeds): test accuracy, test
    loss, expected calibration error."""
    import seaborn as sns

    from .. import plots
    axes = plots.new_axes(3, width=5.0, height=4.0)[1][0] if axes is None else axes
    b = df[df["kind"] == "final"]
    order = [a for a in ARMS if a in set(b["arm"])]
    for ax, col, title in zip(axes, ("accuracy", "loss", "ece"),
                              ("Test accuracy", "Test loss (cross-entropy)", "Expected calibration error")):
        sns.barplot(data=b, x="arm", y=col, order=order, errorbar=("sd", 1), ax=ax)
        sns.stripplot(data=b, x="arm", y=col, order=order, color="k", size=4, ax=ax)
        ax.set(title=title, xlabel="")
        ax.tick_params(axis="x", rotation=20)
    axes[0].set_ylim(0.8, 1.0)
    return axes[0].figure
