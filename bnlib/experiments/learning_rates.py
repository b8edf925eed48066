"""Chapter 7: does batch norm allow higher learning rates, and does that speed training up?

One experiment, ``lr_sweep``: an MLP with and without BN trained over a wide log-grid of
learning rates (SGD with momentum), paired seeds. Every run also records, through
:class:`WeightNormTracker`, how the norms of the hidden weight matrices evolve, so the
same runs show the *mechanism*: a weight matrix followed by BN is scale invariant
(``L(a·W) = L(W)`` for ``a > 0``), hence its gradient is orthogonal to it
(``⟨W, ∇L⟩ = 0``), hence plain SGD can only make ``‖W‖`` grow
(``‖W − ηg‖² = ‖W‖² + η²‖g‖²``), and the step the network actually feels, the angular
step, is ``η/‖W‖²``: the effective learning rate falls as the weights grow
(Ioffe & Szegedy 2015 §3.3; van Laarhoven 2017; Arora et al. 2019).

Read-outs: :func:`run_summary` (one row per run: final accuracy, divergence, steps to a
target), :func:`usable_range` (the widest LR ratio that reaches a target accuracy) and
:func:`fastest` (each arm's fewest steps to the target over the grid).
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
from ..models import mlp
from ..stats import steps_to_target
from ..train import StepInfo, seeded, train
from ..probes import WeightNormTracker
from . import Config, register, sweep

__all__ = ["LRSweepConfig", "lr_sweep", "WeightNormTracker", "run_summary", "usable_range",
           "fastest", "weight_history", "plot_lr_sweep", "plot_steps_to_target", "plot_weight_growth"]


@dataclass(frozen=True)
class LRSweepConfig(Config):
    """An MLP with and without BN over a log-grid of learning rates (SGD with momentum).

    Quick: 8×128 ReLU MLP on digits, 200 steps of batch 64, 7 learning rates, 3 seeds.
    ``norm_impl="torch"`` uses torch's BatchNorm1d (numerically the same layer as
    bnlib's, chapter 1, and faster on a CPU), which keeps the notebook within its budget.
    """

    data: str = "digits"
    depth: int = 8
    width: int = 128
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    steps: int = 200
    batch_size: int = 64
    momentum: float = 0.9
    eval_every: int = 10
    norm_impl: str = "torch"

    @classmethod
    def full(cls) -> "LRSweepConfig":
        return cls(data="fashion_mnist", width=256, steps=3000, eval_every=50,
                   lrs=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
                   seeds=(0, 1, 2, 3, 4))


def _one_run(*, seed: int, data, model: dict, lr: float, steps: int, batch_size: int,
             momentum: float, eval_every: int, device: str) -> pd.DataFrame:
    """Train one seeded MLP and return its history with the weight-norm columns merged in."""
    net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, **model))
    tracker = WeightNormTracker([b.layer for b in net.blocks], lr=lr, every=eval_every)
    hist = train(net, data, steps=steps, lr=lr, momentum=momentum, batch_size=batch_size,
                 seed=seed, eval_every=eval_every, eval_splits=("val", "test"),
                 callbacks=[tracker], device=device, show_progress=False)
    return hist.merge(tracker.summary(), on="step", how="left")


@register("lr_sweep", LRSweepConfig, title="Accuracy, divergence and weight growth against the learning rate",
          chapter="07_learning_rates", plot=lambda df: plot_lr_sweep(df))
def lr_sweep(cfg: LRSweepConfig) -> pd.DataFrame:
    """Histories of every (arm ∈ {plain, BN}) × learning rate × seed run.

    Columns: ``step, split, loss, accuracy, elapsed, diverged`` (from :func:`bnlib.train.train`),
    ``w_ratio, eff_lr, cos_wg`` (from :class:`WeightNormTracker`, hidden layers only),
    ``arm, seed, lr``.
    """
    if not cfg.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in cfg.lrs):
        raise ValueError(f"lrs must be positive finite numbers, got {cfg.lrs}")
    ds = datasets.load(cfg.data)
    base = dict(depth=cfg.depth, width=cfg.width, norm_impl=cfg.norm_impl)
    arms = {"plain": {"model": {**base, "norm": "none"}},
            "BN": {"model": {**base, "norm": "batch"}}}
    return sweep(_one_run, seeds=cfg.seeds, arms=arms, grid={"lr": list(cfg.lrs)},
                 common=dict(data=ds, steps=cfg.steps, batch_size=cfg.batch_size,
                             momentum=cfg.momentum, eval_every=cfg.eval_every, device=cfg.device),
                 desc="lr_sweep")


def run_summary(df: pd.DataFrame, *, target: float = 0.9, split: str = "val") -> pd.DataFrame:
    """One row per (arm, lr, seed): ``val_acc``/``test_acc`` (final; a diverged run gets 0,
    never a stale number), ``diverged``, ``steps_to_target`` (first evaluated step with
    ``split`` accuracy ≥ ``target``; inf when never) and the final ``w_ratio``/``eff_lr``."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be an accuracy in (0, 1], got {target}")
    missing = {"arm", "lr", "seed", "step", "split", "accuracy", "diverged"} - set(df.columns)
    if missing:
        raise ValueError(f"not an lr_sweep result: missing columns {sorted(missing)}")
    rows = []
    for (arm, lr, seed), run in df.groupby(["arm", "lr", "seed"], sort=False):
        div = bool(run["diverged"].any())
        last = lambda s: run[run["split"] == s]["accuracy"].iloc[-1] if (run["split"] == s).any() else 0.0  # noqa: E731
        tail = run.dropna(subset=["w_ratio"]) if "w_ratio" in run else run.iloc[0:0]
        rows.append({"arm": arm, "lr": lr, "seed": seed, "diverged": div,
                     "val_acc": 0.0 if div else float(last("val")),
                     "test_acc": 0.0 if div else float(last("test")),
                     "steps_to_target": steps_to_target(run, target, split=split),
                     "w_ratio": float(tail["w_ratio"].iloc[-1]) if len(tail) else math.nan,
                     "eff_lr": float(tail["eff_lr"].iloc[-1]) if len(tail) else math.nan})
    return pd.DataFrame(rows)


def usable_range(summary: pd.DataFrame, *, threshold: float = 0.9, metric: str = "val_acc",
                 by: Sequence[str] = ("arm",)) -> pd.DataFrame:
    """Per group: the smallest and largest learning rate whose *mean* ``metric`` over the
    seeds in the group (diverged runs count as 0) reaches ``threshold``, their ratio
    (``width``, 1 when a single LR qualifies, NaN when none does) and ``n_ok``, how many
    grid points qualify. With ``by=("arm", "seed")`` it gives one range per seed."""
    by = list(by)
    mean = summary.groupby(by + ["lr"])[metric].mean().reset_index()
    rows = []
    for key, g in mean.groupby(by):
        ok = g[g[metric] >= threshold]["lr"]
        key = key if isinstance(key, tuple) else (key,)
        lo, hi = (ok.min(), ok.max()) if len(ok) else (math.nan, math.nan)
        rows.append({**dict(zip(by, key)), "lr_min": lo, "lr_max": hi,
                     "width": hi / lo if len(ok) else math.nan, "n_ok": len(ok)})
    return pd.DataFrame(rows)


def fastest(summary: pd.DataFrame) -> pd.DataFrame:
    """Per arm: the learning rate with the fewest mean steps to the target (a run that
    never gets there counts as inf, so an LR qualifies only if every seed gets there),
    and those steps ± the spread over seeds."""
    g = summary.groupby(["arm", "lr"])["steps_to_target"]
    table = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1)}).reset_index()
    pick = table.loc[table.groupby("arm")["mean"].idxmin()]
    return pick.rename(columns={"mean": "steps", "std": "steps_sd"}).reset_index(drop=True)


def plot_lr_sweep(df: pd.DataFrame, ax=None):
    """Final validation accuracy against the learning rate, diverged runs marked ×."""
    from .. import plots
    s = run_summary(df)
    ax = plots.sweep(s, x="lr", y="val_acc", ax=ax, title="Final validation accuracy vs learning rate")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy")
    return ax


def weight_history(df: pd.DataFrame, arm: str = "BN") -> pd.DataFrame:
    """The weight-norm columns of ``arm``'s runs, one row per (lr, seed, recorded step)."""
    if "w_ratio" not in df:
        raise ValueError("not an lr_sweep result: no w_ratio column")
    d = df[(df["arm"] == arm) & (df["split"] == "val")]
    if d.empty:
        raise ValueError(f"no runs of arm {arm!r}; arms are {sorted(df['arm'].unique())}")
    return d[["lr", "seed", "step", "w_ratio", "eff_lr", "cos_wg"]].dropna(subset=["w_ratio"])


def plot_steps_to_target(summary: pd.DataFrame, ax=None, target: float | None = None):
    """Steps to the target accuracy against the learning rate, mean ± sd over seeds.

    A learning rate is drawn only where *every* seed reached the target (an average over
    the lucky seeds would flatter it); the others are listed in the legend's red ×."""
    from .. import plots
    s = summary.copy()
    s["never"] = ~np.isfinite(s["steps_to_target"])
    bad = s.groupby(["arm", "lr"])["never"].transform("any")
    ax = plots.sweep(s[~bad], x="lr", y="steps_to_target", ax=ax, diverged=None,
                     title="Steps to the target accuracy" + (f" ({target:.0%})" if target else ""))
    miss = s[bad].drop_duplicates(["arm", "lr"])
    if len(miss):
        colors = {"plain": plots.ARM_COLORS["plain"], "BN": plots.ARM_COLORS["BN"]}
        for arm, g in miss.groupby("arm"):
            ax.scatter(g["lr"], np.full(len(g), ax.get_ylim()[1]), marker="x", clip_on=False,
                       color=colors.get(arm, "red"), zorder=5, label=f"{arm}: not every seed got there")
        ax.legend(loc="lower right", fontsize=9)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("steps")
    return ax


def plot_weight_growth(df: pd.DataFrame, axes=None, arm: str = "BN"):
    """Two panels for ``arm``: ‖W_t‖/‖W_0‖ and the effective learning rate η‖W_0‖²/‖W_t‖²
    against the step, one line per nominal learning rate (mean ± sd over seeds)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .. import plots
    h = weight_history(df, arm)
    if axes is None:
        _, axes = plots.new_axes(ncols=2, width=5.2)
        axes = axes[0]
    pal = sns.color_palette("viridis", n_colors=h["lr"].nunique())
    for ax, col, title, label in (
            (axes[0], "w_ratio", "Weight norm ‖W_t‖ / ‖W_0‖", "norm relative to init"),
            (axes[1], "eff_lr", "Effective learning rate η ‖W_0‖² / ‖W_t‖²", "effective learning rate")):
        sns.lineplot(data=h, x="step", y=col, hue="lr", palette=pal, errorbar=("sd", 1), ax=ax,
                     legend=ax is axes[1])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(label)
    axes[1].legend(title="nominal LR", fontsize=8, ncol=2)
    return plt.gcf()
