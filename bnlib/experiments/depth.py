"""Chapter 11: does batch norm let a network go deeper (claim I10)?

Four width-``w`` ReLU MLPs at several depths: ``plain`` (no normaliser, no skips), ``BN``
(batch norm before every ReLU), ``residual + BN`` (the same with an identity skip around
every hidden layer after the first) and ``residual`` (skips, no normaliser, residual
branches' initial weights scaled by ``1/√depth``, the idea behind Fixup, SkipInit and
NF-ResNets). At every depth each arm's learning rate is tuned on the validation split with
tuning seeds disjoint from the 8 reported seeds (:func:`bnlib.protocol.tuned`).
:func:`gradient_profile` (at initialisation, no training) shows why deep plain BN nets are
hard to train: their gradients grow towards the input (Yang et al. 2019).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import analysis
from ..config import override
from ..models import MLPSpec
from ..probes import gradient_norms
from ..protocol import Protocol, Tuning, arm_config, load_data, rows, tuned
from ..train import TrainSpec
from . import register


@dataclass(frozen=True)
class DepthConfig(Protocol):
    """Depths × four arms, learning rate tuned per (arm, depth); the quick preset."""

    # width 32: small enough for 4 arms × 3 depths × (6 rates × 2 tuning + 8 reported seeds).
    model: MLPSpec = MLPSpec(width=32)
    # SGD + momentum, a short budget; evaluated once, at the end (only final accuracy is read)
    train: TrainSpec = TrainSpec(momentum=0.9, steps=60, batch_size=64, eval_every=60,
                                 eval_splits=("val", "test"))
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "plain": {"model.norm": "none"}, "BN": {"model.norm": "batch"},
        "residual + BN": {"model.norm": "batch", "model.residual": True},
        "residual": {"model.norm": "none", "model.residual": True}})  # branches × 1/√depth
    depths: tuple[int, ...] = (2, 6, 16)  # shallow, moderate, deep for a 32-wide MLP
    margin: float = 0.02  # smallest test-accuracy difference that matters (declared before the run)
    # a grid wide enough that no arm's choice sits at its edge; two tuning seeds
    # (0.1 was the top choice of every arm at depth 2 on a grid ending there, hence up to 1.0)
    tuning: Tuning = Tuning(grid=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), seeds=(1000, 1001))

    FULL = {"data": "fashion_mnist", "depths": (4, 16, 32, 64, 128), "model.width": 256,
            "train.steps": 4000, "train.batch_size": 128}


def _at_depth(cfg: DepthConfig, depth: int) -> DepthConfig:
    """``cfg`` at ``depth``: the unnormalised residual arm's branches start 1/√depth small."""
    arms = {a: dict(o) for a, o in cfg.arms.items()}
    if "residual" in arms:
        arms["residual"]["model.residual_branch_scale"] = 1 / math.sqrt(depth)
    return dataclasses.replace(override(cfg, {"model.depth": depth}), arms=arms)


@register("depth", DepthConfig, title="Accuracy against depth: plain, BN, residual",
          chapter="11_depth", plot=lambda df: plot(df))
def depth_sweep(cfg: DepthConfig) -> pd.DataFrame:
    """At every depth, :func:`bnlib.protocol.tuned`: the tuning runs (``kind="tuning"``) and
    the 8 reported seeds at each arm's chosen rate (``kind="history"``), with a ``depth``
    column. Raises :class:`bnlib.analysis.GridEdgeError` if a choice is at the grid's edge."""
    if not cfg.depths or any(not isinstance(d, int) or d < 1 for d in cfg.depths):
        raise ValueError(f"depths must be positive ints, got {cfg.depths}")
    return pd.concat([tuned(_at_depth(cfg, d)).assign(depth=d) for d in cfg.depths],
                     ignore_index=True)


def finals(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per (depth, arm, seed) of the reported runs: the final accuracy on ``split`` at the
    tuned rate (``lr``); a diverged run scores chance (0.1), never a stale number."""
    return analysis.final(rows(df), split=split, keys=["depth", "arm", "lr", "seed"], diverged_value=0.1)


def plot(df: pd.DataFrame, ax=None):
    """Test accuracy at the tuned rate against depth, mean ± sd over the reported seeds."""
    from .. import plots
    ax = ax or plots.new_axes(width=6.5)[1][0, 0]
    f = finals(df)
    plots.draw_sweep(f, x="depth", y="accuracy", logx=False, diverged=None, ax=ax)
    depths = sorted(f["depth"].unique())
    ax.set_xscale("log", base=2)
    ax.set(xticks=depths, xticklabels=[str(x) for x in depths], xlabel="hidden layers",
           ylabel="test accuracy (tuned rate)")
    ax.axhline(0.1, color="black", lw=0.8, ls=":")
    ax.legend(title="arm", loc="lower left")
    return ax.figure


def gradient_profile(cfg: DepthConfig, depth: int, *, batch_size: int = 128,
                     seeds=(0, 1, 2)) -> pd.DataFrame:
    """‖∂L/∂W_l‖ for every hidden layer ``l`` (1 = input side) of each arm of ``cfg`` at
    ``depth``, at initialisation, on one training batch in train mode (no training).
    Columns ``arm, seed, layer, grad_norm``. In a deep plain net with BN the norm grows
    towards the input (Yang et al. 2019: ≈√(π/(π−1)) per layer for ReLU)."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2, got {batch_size}")
    cfg = _at_depth(cfg, depth)
    data = load_data(cfg)
    out = []
    for seed in seeds:
        idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:batch_size]
        x, y = data.train.x[idx], data.train.y[idx]
        for arm in cfg.arms:
            net = arm_config(cfg, arm).model.build(seed, data)
            norms = gradient_norms(net, x, y)[:-1]  # hidden layers only, head dropped
            out += [dict(arm=arm, seed=seed, layer=i + 1, grad_norm=float(g))
                    for i, g in enumerate(norms)]
    return pd.DataFrame(out)


def growth_per_layer(profile: pd.DataFrame, skip: int = 2) -> pd.DataFrame:
    """Geometric growth of the gradient norm per layer towards the input, per arm and seed:
    ``exp(−slope)`` of a least-squares fit of log‖∂L/∂W_l‖ on ``l``, leaving out ``skip``
    layers at each end. Above 1: the gradient grows towards the input."""
    out = []
    for (arm, seed), g in profile.groupby(["arm", "seed"], sort=False):
        g = g.sort_values("layer")
        if len(g) <= 2 * skip + 1:
            raise ValueError(f"need more than {2 * skip + 1} layers to fit a growth rate")
        g = g.iloc[skip:len(g) - skip]
        slope = np.polyfit(g["layer"], np.log(g["grad_norm"]), 1)[0]
        out.append(dict(arm=arm, seed=seed, growth=float(np.exp(-slope))))
    return pd.DataFrame(out)
