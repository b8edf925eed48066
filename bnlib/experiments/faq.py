"""Chapter 18 (FAQ): the small measurements the FAQ page makes itself.

``bn_hyperparameters`` (F6, the "extra hyperparameters" half)
    A BN MLP trained briefly with every combination of BN momentum ∈ {0.01, 0.1, 0.5}
    and ε ∈ {1e-5, 1e-3, 1e-1}; evaluated in eval mode with the running statistics the
    momentum produced, and with precise statistics (recomputed with the final weights),
    which separates "the momentum changed the weights" from "the momentum left the
    running statistics behind the weights".

``bn_at_a_glance`` (F5, F9)
    Plain vs BN MLP at three learning rates a decade apart, paired seeds: which rates
    train, how fast each arm reaches a validation target at its best rate, and its test
    accuracy there. A one-screen recap of chapters 4, 5 and 7, not a replacement for them.

:func:`momentum_conventions` shows numerically that PyTorch's ``momentum`` weighs the new
batch and Keras' the old running value, so Keras' default 0.99 is PyTorch's 0.01.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import data as datasets
from .. import nn as bnn
from ..inference import recompute_batchnorm_stats
from ..models import mlp
from ..stats import steps_to_target
from ..train import evaluate, seeded, train
from . import Config, register, sweep
from ._common import tune_lr

__all__ = ["HyperConfig", "GlanceConfig", "bn_hyperparameters", "bn_at_a_glance",
           "KERAS_DEFAULTS", "torch_defaults", "keras_update", "momentum_conventions",
           "half_life", "hyper_table", "glance_table", "plot_hyper_heatmap", "plot_glance"]

#: Keras ``BatchNormalization`` defaults (keras.io documentation): ``momentum`` is the
#: weight of the *old* moving value, ``moving = moving·momentum + batch·(1 − momentum)``.
KERAS_DEFAULTS = {"momentum": 0.99, "epsilon": 1e-3}


def torch_defaults() -> dict:
    """PyTorch's ``BatchNorm1d`` defaults, read from a fresh layer (weight of the *new* batch)."""
    bn = nn.BatchNorm1d(1)
    return {"momentum": bn.momentum, "eps": bn.eps}


def keras_update(moving: np.ndarray, batch_value: np.ndarray, momentum: float) -> np.ndarray:
    """One Keras moving-statistic update: ``moving·momentum + batch·(1 − momentum)``."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return moving * momentum + batch_value * (1.0 - momentum)


def half_life(weight_on_new: float) -> float:
    """Batches until a running statistic has forgotten half of its past:
    ``ln ½ / ln(1 − w)`` for weight ``w`` on the new batch (PyTorch's momentum)."""
    if not 0.0 < weight_on_new < 1.0:
        raise ValueError(f"the weight on the new batch must be in (0, 1), got {weight_on_new}")
    return math.log(0.5) / math.log(1.0 - weight_on_new)


@torch.no_grad()
def momentum_conventions(steps: int = 50, *, batch_size: int = 16, seed: int = 0) -> pd.DataFrame:
    """Feed the same batches (mean drifting from 0 to 2) to bnlib's and torch's
    ``BatchNorm1d(momentum=0.1)`` and apply Keras' rule with ``momentum=0.9`` and, the
    classic porting mistake, ``momentum=0.1``; plus PyTorch 0.01 vs Keras' default 0.99.

    Returns one row per step with each running mean: ``bnlib 0.1``, ``torch 0.1``,
    ``keras 0.9``, ``keras 0.1``, ``torch 0.01``, ``keras 0.99`` and the ``batch`` mean.
    """
    if steps < 1 or batch_size < 2:
        raise ValueError("steps must be ≥ 1 and batch_size ≥ 2")
    g = torch.Generator().manual_seed(seed)
    layers = {"bnlib 0.1": bnn.BatchNorm1d(1, momentum=0.1), "torch 0.1": nn.BatchNorm1d(1, momentum=0.1),
              "torch 0.01": nn.BatchNorm1d(1, momentum=0.01)}
    keras = {"keras 0.9": 0.9, "keras 0.1": 0.1, "keras 0.99": 0.99}
    moving = {k: np.zeros(1) for k in keras}   # Keras' moving_mean also starts at 0
    for layer in layers.values():
        layer.train()
    rows = []
    for t in range(1, steps + 1):
        x = torch.randn(batch_size, 1, generator=g) + 2.0 * t / steps
        row = {"step": t, "batch": float(x.mean())}
        for name, layer in layers.items():
            layer(x)
            row[name] = float(layer.running_mean[0])
        for name, m in keras.items():
            moving[name] = keras_update(moving[name], x.mean(0).double().numpy(), m)
            row[name] = float(moving[name][0])
        rows.append(row)
    return pd.DataFrame(rows)


# --- F6: momentum × ε -----------------------------------------------------------------------

@dataclass(frozen=True)
class HyperConfig(Config):
    """BN momentum × ε on a 3×128 BN MLP, digits, batch 32, a short run (200 steps,
    LR 0.1, plain SGD), 3 seeds; torch's BatchNorm1d (bnlib's arithmetic, faster on CPU)."""

    data: str = "digits"
    momenta: tuple[float, ...] = (0.01, 0.1, 0.5)
    epsilons: tuple[float, ...] = (1e-5, 1e-3, 1e-1)
    steps: int = 200
    batch_size: int = 32
    lr: float = 0.1
    depth: int = 3
    width: int = 128
    norm_impl: str = "torch"

    @classmethod
    def full(cls) -> "HyperConfig":
        return cls(data="fashion_mnist", width=256, steps=2000, batch_size=64,
                   momenta=(0.001, 0.01, 0.1, 0.5, 0.9), epsilons=(1e-5, 1e-3, 1e-1, 1.0),
                   seeds=(0, 1, 2, 3, 4))


def _hyper_run(*, seed: int, data: datasets.Dataset, momentum: float, eps: float,
               cfg: HyperConfig) -> pd.DataFrame:
    def build():
        net = mlp(data.num_features, data.num_classes, depth=cfg.depth, width=cfg.width,
                  norm="batch", norm_impl=cfg.norm_impl)
        for bn in bnn.batchnorm_layers(net):
            bn.momentum, bn.eps = momentum, eps
        return net

    net = seeded(seed, build)
    hist = train(net, data, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                 eval_every=cfg.steps, eval_splits=("val", "test"), device=cfg.device,
                 show_progress=False)
    last = hist[(hist["step"] == hist["step"].max()) & (hist["split"] == "test")]
    row = {"diverged": bool(hist["diverged"].any()),
           "val_acc": float(hist[(hist["step"] == hist["step"].max()) & (hist["split"] == "val")]["accuracy"].iloc[0])
           if not hist["diverged"].any() else 0.0,
           "test_acc": float(last["accuracy"].iloc[0]) if len(last) and not hist["diverged"].any() else 0.0}
    if not row["diverged"]:
        data = data.to(next(net.parameters()).device)   # train() moved the model (e.g. to CUDA)
        recompute_batchnorm_stats(net, data.train.x)
        row["precise_test_acc"] = evaluate(net, data.test)[1]
    else:
        row["precise_test_acc"] = 0.0
    return pd.DataFrame([row])


@register("bn_hyperparameters", HyperConfig, title="BN momentum × ε after a short run",
          chapter="18_faq", plot=lambda df: plot_hyper_heatmap(df))
def bn_hyperparameters(cfg: HyperConfig) -> pd.DataFrame:
    """One row per momentum × ε × seed: ``val_acc``, ``test_acc`` (eval mode, running
    statistics), ``precise_test_acc`` (eval mode, precise statistics), ``diverged``."""
    for name, vals in (("momenta", cfg.momenta), ("epsilons", cfg.epsilons)):
        if not vals:
            raise ValueError(f"{name} must not be empty")
    if any(not 0 < m <= 1 for m in cfg.momenta):
        raise ValueError(f"momenta must be in (0, 1], got {cfg.momenta}")
    if any(not e > 0 for e in cfg.epsilons):
        raise ValueError(f"epsilons must be positive, got {cfg.epsilons}")
    ds = datasets.load(cfg.data)
    return sweep(_hyper_run, seeds=cfg.seeds, grid={"momentum": list(cfg.momenta), "eps": list(cfg.epsilons)},
                 common=dict(data=ds, cfg=cfg), desc="bn_hyperparameters")


def hyper_table(df: pd.DataFrame, value: str = "test_acc") -> pd.DataFrame:
    """Mean of ``value`` over seeds as a momentum (rows) × ε (columns) table."""
    if not {"momentum", "eps", value} <= set(df.columns):
        raise ValueError(f"not a bn_hyperparameters result with column {value!r}")
    return df.pivot_table(index="momentum", columns="eps", values=value, aggfunc="mean")


def plot_hyper_heatmap(df: pd.DataFrame, value: str = "test_acc", ax=None, title: str | None = None):
    """Heatmap of the mean ``value`` over seeds, annotated with mean and ± sd."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    ax = ax or plt.gca()
    mean = hyper_table(df, value)
    sd = df.pivot_table(index="momentum", columns="eps", values=value, aggfunc="std")
    labels = mean.map(lambda v: f"{v:.3f}") + "\n± " + sd.map(lambda v: f"{v:.3f}")
    sns.heatmap(mean, annot=labels, fmt="", cmap="viridis", vmin=float(np.nanmin(mean.values)) - 0.01,
                vmax=1.0, cbar_kws={"label": value}, ax=ax)
    ax.set_xticklabels([f"{e:g}" for e in mean.columns])
    ax.set_xlabel("ε")
    ax.set_ylabel("momentum (PyTorch convention)")
    ax.set_title(title or value)
    return ax


# --- F5, F9: plain vs BN at a glance -------------------------------------------------------

@dataclass(frozen=True)
class GlanceConfig(Config):
    """Plain vs BN 4×128 MLP on digits, batch 32, LR ∈ {0.01, 0.1, 1.0} (plain SGD),
    200 steps evaluated every 10, 3 seeds."""

    data: str = "digits"
    lrs: tuple[float, ...] = (0.01, 0.1, 1.0)
    steps: int = 200
    eval_every: int = 10
    batch_size: int = 32
    depth: int = 4
    width: int = 128
    target: float = 0.9
    norm_impl: str = "torch"

    @classmethod
    def full(cls) -> "GlanceConfig":
        return cls(data="fashion_mnist", width=256, steps=3000, eval_every=50, target=0.85,
                   lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0), seeds=(0, 1, 2, 3, 4))


def _glance_run(*, seed: int, data: datasets.Dataset, norm: str, lr: float, cfg: GlanceConfig) -> pd.DataFrame:
    net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, depth=cfg.depth,
                                   width=cfg.width, norm=norm, norm_impl=cfg.norm_impl))
    return train(net, data, steps=cfg.steps, lr=lr, batch_size=cfg.batch_size, seed=seed,
                 eval_every=cfg.eval_every, eval_splits=("val", "test"), device=cfg.device,
                 show_progress=False)


@register("bn_at_a_glance", GlanceConfig, title="Plain vs BN at three learning rates",
          chapter="18_faq", plot=lambda df: plot_glance(df))
def bn_at_a_glance(cfg: GlanceConfig) -> pd.DataFrame:
    """Training histories of plain and BN MLPs × learning rate × seed (arms ``plain``, ``BN``)."""
    if not cfg.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in cfg.lrs):
        raise ValueError(f"lrs must be positive finite numbers, got {cfg.lrs}")
    if not 0 < cfg.target <= 1:
        raise ValueError(f"target must be an accuracy in (0, 1], got {cfg.target}")
    ds = datasets.load(cfg.data)
    return sweep(_glance_run, seeds=cfg.seeds, arms={"plain": {"norm": "none"}, "BN": {"norm": "batch"}},
                 grid={"lr": list(cfg.lrs)}, common=dict(data=ds, cfg=cfg), desc="bn_at_a_glance")


def glance_table(df: pd.DataFrame, target: float = 0.9) -> pd.DataFrame:
    """One row per (arm, lr, seed): ``diverged``, final ``val_acc``/``test_acc`` (0 when
    diverged), ``steps_to_target`` (first evaluation with val accuracy ≥ ``target``;
    inf when never), and ``best`` (whether this lr is the arm's best on mean val accuracy)."""
    need = {"arm", "lr", "seed", "step", "split", "accuracy", "diverged"}
    if not need <= set(df.columns):
        raise ValueError(f"not a bn_at_a_glance result: missing {sorted(need - set(df.columns))}")
    rows = []
    for (arm, lr, seed), run in df.groupby(["arm", "lr", "seed"], sort=False):
        div = bool(run["diverged"].any())
        fin = lambda s: 0.0 if div or not (run["split"] == s).any() else float(  # noqa: E731
            run[run["split"] == s]["accuracy"].iloc[-1])
        rows.append(dict(arm=arm, lr=lr, seed=seed, diverged=div, val_acc=fin("val"),
                         test_acc=fin("test"),
                         steps_to_target=math.inf if div else steps_to_target(run, target)))
    out = pd.DataFrame(rows)
    best = tune_lr(df, by=("arm",), lr="lr")[["arm", "lr"]].assign(best=True)
    out = out.merge(best, on=["arm", "lr"], how="left")
    out["best"] = out["best"].eq(True)
    return out


def plot_glance(df: pd.DataFrame, ax=None):
    """Validation accuracy against step for each arm at its best learning rate (mean ± sd)."""
    import matplotlib.pyplot as plt
    from .. import plots
    from ._common import at_best_lr
    ax = ax or plt.gca()
    best = at_best_lr(df, by=("arm",), lr="lr")
    best = best.assign(arm=best["arm"] + " (lr " + best["lr"].map(lambda v: f"{v:g}") + ")")
    plots.learning_curves(best, split="val", ax=ax, title="Validation accuracy at each arm's best LR")
    ax.set_ylim(0, 1)
    return ax
