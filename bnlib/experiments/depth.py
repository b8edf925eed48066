"""Chapter 11: does batch norm let a network go deeper (claim I10)?

Four kinds of width-``w`` ReLU MLP are trained at several depths on the same data:

* ``plain``: no normalisation, no skip connections (Kaiming init);
* ``plain+BN``: batch norm before every ReLU, no skip connections;
* ``residual+BN``: batch norm before every ReLU and an identity skip around every hidden
  layer after the first (``x + ReLU(BN(W x))``);
* ``residual``: the same skips, no normalisation, the residual branches' initial weights
  multiplied by ``1/√depth`` (the idea behind Fixup, SkipInit and NF-ResNets: keep the
  sum of branches from blowing up the signal at init).

Each arm's learning rate is chosen *per depth* on the validation split from ``cfg.lrs``
using the ``tune_seeds``; every seed of ``cfg.seeds`` is then trained at that learning
rate and its test accuracy reported. :func:`gradient_profile` (an analysis at
initialisation, not training) shows why deep plain BN nets are hard to train: their
gradients grow towards the input layer (Yang et al. 2019).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import data as datasets
from ..models import mlp
from ..probes import gradient_norms
from ..stats import final
from ..train import seeded
from . import Config, register, sweep
from ._common import train_mlp, tune_lr

__all__ = ["ARMS", "DepthConfig", "arm_model", "depth_sweep", "gradient_profile",
           "depth_table", "plot_depth", "growth_per_layer"]

ARMS = ("plain", "plain+BN", "residual+BN", "residual")
COLORS = {"plain": "#7f7f7f", "plain+BN": "#1f77b4", "residual+BN": "#2ca02c",
          "residual": "#ff7f0e"}


def arm_model(arm: str, depth: int, width: int = 64, norm_impl: str = "torch") -> dict:
    """The ``bnlib.models.mlp`` keyword arguments of ``arm`` at ``depth``.

    ``residual`` (no BN) scales its residual branches' initial weights by ``1/√depth``.
    ``norm_impl="torch"`` uses PyTorch's fused batch norm, which computes the same thing
    as bnlib's (chapter 1 checks it) several times faster for these many thin layers.
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    base = dict(depth=depth, width=width, activation="relu", norm_impl=norm_impl)
    if arm == "plain":
        return dict(base, norm="none")
    if arm == "plain+BN":
        return dict(base, norm="batch")
    if arm == "residual+BN":
        return dict(base, norm="batch", residual=True)
    return dict(base, norm="none", residual=True, residual_branch_scale=1 / math.sqrt(depth))


@dataclass(frozen=True)
class DepthConfig(Config):
    """Depths × arms; learning rate tuned per (arm, depth) on the validation split."""

    dataset: str = "digits"
    n_train: int | None = None
    depths: tuple[int, ...] = (4, 12, 32)
    width: int = 64
    arms: tuple[str, ...] = ARMS
    steps: int = 100
    batch_size: int = 64
    momentum: float = 0.9
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03)
    tune_seeds: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (0, 1, 2)
    norm_impl: str = "torch"

    @classmethod
    def full(cls) -> "DepthConfig":
        return cls(dataset="fashion_mnist", depths=(4, 16, 32, 64, 128), width=256, steps=4000,
                   batch_size=128, lrs=(0.001, 0.003, 0.01, 0.03, 0.1), tune_seeds=(0, 1),
                   seeds=(0, 1, 2, 3, 4))


def _check(cfg: DepthConfig) -> None:
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad:
        raise ValueError(f"unknown arms {bad}; choose from {ARMS}")
    if not cfg.depths or any(not isinstance(d, int) or d < 1 for d in cfg.depths):
        raise ValueError(f"depths must be positive ints, got {cfg.depths}")
    if not cfg.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in cfg.lrs):
        raise ValueError(f"lrs must be positive finite numbers, got {cfg.lrs}")
    if not cfg.seeds or not cfg.tune_seeds:
        raise ValueError("seeds and tune_seeds must not be empty")


def _one_run(*, seed: int, kind: str, depth: int, lr: float, cfg: DepthConfig,
             data: datasets.Dataset) -> pd.DataFrame:
    """Train one net; return its training history (val and test at the end)."""
    return train_mlp(seed=seed, data=data, model=arm_model(kind, depth, cfg.width, cfg.norm_impl),
                     steps=cfg.steps, lr=lr, momentum=cfg.momentum, batch_size=cfg.batch_size,
                     eval_every=cfg.steps, eval_splits=("val", "test"), device=cfg.device)


def _summary(history: pd.DataFrame, chance: float) -> dict:
    diverged = bool(history["diverged"].any())
    return {"val_accuracy": final(history, split="val", diverged_value=chance),
            "test_accuracy": final(history, split="test", diverged_value=chance),
            "diverged": diverged}


def _finals(df: pd.DataFrame, chance: float) -> pd.DataFrame:
    keys = ["arm", "depth", "lr", "seed"]
    rows = [dict(zip(keys, k), **_summary(h, chance)) for k, h in df.groupby(keys, sort=False)]
    return pd.DataFrame(rows)


@register("depth", DepthConfig, title="Accuracy against depth: plain, BN, residual",
          chapter="11_depth", plot=lambda df: plot_depth(df))
def depth_sweep(cfg: DepthConfig) -> pd.DataFrame:
    """One row per (arm, depth, lr, seed): final ``val_accuracy``, ``test_accuracy``,
    ``diverged`` (a diverged run scores chance), and ``best_lr`` (True where ``lr`` is the
    arm's validation-tuned learning rate at that depth). The tuning seeds are run at every
    learning rate; the other seeds only at the tuned one."""
    _check(cfg)
    data = datasets.load(cfg.dataset, n_train=cfg.n_train)
    chance = 1.0 / data.num_classes
    arms = {a: {"kind": a} for a in cfg.arms}
    common = {"cfg": cfg, "data": data}
    tuning = sweep(_one_run, seeds=cfg.tune_seeds, arms=arms,
                   grid={"depth": list(cfg.depths), "lr": list(cfg.lrs)}, common=common,
                   desc="depth: tune lr")
    best = tune_lr(tuning, by=("arm", "depth"), diverged_value=chance)
    frames = [tuning]
    rest = [s for s in cfg.seeds if s not in cfg.tune_seeds]
    if rest:
        for depth in cfg.depths:
            for arm in cfg.arms:
                lr = float(best[(best["arm"] == arm) & (best["depth"] == depth)]["lr"].iloc[0])
                frames.append(sweep(_one_run, seeds=rest, arms={arm: arms[arm]},
                                    grid={"depth": [depth], "lr": [lr]}, common=common,
                                    desc=f"depth: {arm} at {depth}"))
    out = _finals(pd.concat(frames, ignore_index=True), chance)
    out = out.merge(best[["arm", "depth", "lr"]].assign(best_lr=True), on=["arm", "depth", "lr"],
                    how="left")
    out["best_lr"] = out["best_lr"].fillna(False).astype(bool)
    return out.sort_values(["depth", "arm", "lr", "seed"]).reset_index(drop=True)


def depth_table(df: pd.DataFrame, seeds=None) -> pd.DataFrame:
    """Test accuracy at each arm's tuned learning rate: mean, std, min over seeds, and the
    tuned lr, one row per (depth, arm). ``seeds`` restricts to those seeds."""
    d = df[df["best_lr"]]
    if seeds is not None:
        d = d[d["seed"].isin(list(seeds))]
    if d.empty:
        raise ValueError("no runs at a tuned learning rate in this frame")
    g = d.groupby(["depth", "arm"], sort=True)
    return pd.DataFrame({"lr": g["lr"].first(), "n": g["test_accuracy"].size(),
                         "mean": g["test_accuracy"].mean(), "std": g["test_accuracy"].std(ddof=1),
                         "min": g["test_accuracy"].min(),
                         "diverged": g["diverged"].sum()}).reset_index()


def plot_depth(df: pd.DataFrame, ax=None):
    """Test accuracy at the tuned learning rate against depth, mean ± sd over seeds."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    ax = ax or plt.gca()
    d = df[df["best_lr"]]
    sns.lineplot(data=d, x="depth", y="test_accuracy", hue="arm", marker="o", errorbar=("sd", 1),
                 palette={a: COLORS[a] for a in d["arm"].unique()}, ax=ax)
    ax.set_xscale("log", base=2)
    depths = sorted(d["depth"].unique())
    ax.set_xticks(depths, [str(x) for x in depths])
    ax.set_xlabel("hidden layers")
    ax.set_ylabel("test accuracy (tuned lr)")
    ax.axhline(0.1, color="black", lw=0.8, ls=":")
    ax.legend(title="arm", loc="lower left")
    return ax


def gradient_profile(depth: int = 32, *, width: int = 64, arms=ARMS, dataset: str = "digits",
                     batch_size: int = 128, seeds=(0, 1, 2), norm_impl: str = "torch") -> pd.DataFrame:
    """‖∂L/∂W_l‖ for every hidden layer ``l`` (1 = input side) of each arm at initialisation,
    on one training batch in train mode (not training: one forward/backward per net).

    Returns columns ``arm, seed, layer, grad_norm``. In a deep plain net with BN the norm
    grows towards the input (Yang et al. 2019: ≈√(π/(π−1)) per layer for ReLU)."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2, got {batch_size}")
    data = datasets.load(dataset)
    rows = []
    for seed in seeds:
        idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:batch_size]
        x, y = data.train.x[idx], data.train.y[idx]
        for arm in arms:
            net = seeded(seed, lambda: mlp(data.num_features, data.num_classes,
                                           **arm_model(arm, depth, width, norm_impl)))
            norms = gradient_norms(net, x, y)[:-1]  # hidden layers only, head dropped
            rows += [dict(arm=arm, seed=seed, layer=i + 1, grad_norm=float(g))
                     for i, g in enumerate(norms)]
    return pd.DataFrame(rows)


def growth_per_layer(profile: pd.DataFrame, skip: int = 2) -> pd.DataFrame:
    """Geometric growth of the gradient norm per layer towards the input, per arm and seed:
    ``exp(−slope)`` of a least-squares fit of log‖∂L/∂W_l‖ on ``l``, leaving out ``skip``
    layers at each end (boundary effects). Above 1 means the gradient grows towards the input."""
    rows = []
    for (arm, seed), g in profile.groupby(["arm", "seed"], sort=False):
        g = g.sort_values("layer")
        if len(g) <= 2 * skip + 1:
            raise ValueError(f"need more than {2 * skip + 1} layers to fit a growth rate")
        g = g.iloc[skip:len(g) - skip]
        slope = np.polyfit(g["layer"], np.log(g["grad_norm"]), 1)[0]
        rows.append(dict(arm=arm, seed=seed, growth=float(np.exp(-slope))))
    return pd.DataFrame(rows)
