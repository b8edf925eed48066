"""Chapter 20: batch norm when the test data shift.

A small 1-D CNN with batch norm (:class:`bnlib.models.CNN1d`) is trained on MNIST-1D
(Greydanus 2020), then tested on shifted copies of the test split (:func:`bnlib.data.shifted`:
Gaussian noise, contrast, an additive offset; three severities each) with four ways of
setting BN's statistics at test time:

* ``"running"``: the running statistics from training (ordinary eval mode);
* ``"recomputed"``: the source statistics recomputed exactly on the training split ("precise
  BN", :func:`bnlib.inference.recompute_batchnorm_stats`): separates the lag of the moving
  average from the shift;
* ``"adapted"``: statistics re-estimated on the whole *unlabelled* shifted test split
  (Schneider et al. 2020), :func:`bnlib.inference.adapt_batchnorm_stats`;
* ``"batch"``: every test batch of ``batch_size`` examples is normalised with its own
  statistics (prediction-time BN, Nado et al. 2020), optionally mixed with the running
  ones by Schneider et al.'s prior ``N``: ``μ = N/(N+n)·μ_source + n/(N+n)·μ_batch`` and
  the same for the variance, ``n`` the batch size. ``N = 0`` is pure prediction-time BN,
  ``N = ∞`` the running statistics. :func:`bnlib.inference.grouped_accuracy` evaluates all
  batches of a split in one forward pass.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import pandas as pd
from torch import nn

from .. import cache
from .. import data as datasets
from ..data import SHIFT_KINDS, shifted
from ..inference import adapt_batchnorm_stats, grouped_accuracy, recompute_batchnorm_stats
from ..models import CNN1d
from ..train import resolve_device, seeded, train
from . import Config, register



@dataclass(frozen=True)
class ShiftConfig(Config):
    """Train a BN 1-D CNN on MNIST-1D per seed; test it under shifts with running, recomputed,
    adapted and per-batch statistics. Every condition gets the batch sizes
    ``severity_batch_sizes`` with ``N = 0``; ``sweep_conditions`` get every test batch size ×
    prior ``N``."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n: int = 5000                      # MNIST-1D examples (5,000 is the standard set)
    steps: int = 300
    lr: float = 0.1
    batch_size: int = 64
    momentum: float = 0.9
    channels: int = 16
    noise: tuple[float, ...] = (0.25, 0.5, 1.0)
    contrast: tuple[float, ...] = (0.5, 2.0, 4.0)
    offset: tuple[float, ...] = (0.5, 1.0, 2.0)
    severity_batch_sizes: tuple[int, ...] = (2, 128)
    sweep_conditions: tuple[tuple[str, float], ...] = (("none", 0.0), ("noise", 0.5), ("offset", 1.0))
    test_batch_sizes: tuple[int, ...] = (1, 2, 8, 32, 128)
    priors: tuple[float, ...] = (0.0, 16.0, 128.0)
    adapt_prior: float = 0.0           # N of the whole-test-set adaptation

    FULL = {"seeds": tuple(range(10)), "n": 50000, "steps": 3000, "channels": 64,
            "test_batch_sizes": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            "priors": (0.0, 4.0, 16.0, 64.0, 256.0)}

    def conditions(self) -> list[tuple[str, float]]:
        """(shift kind, level) pairs, the unshifted test split first."""
        return [("none", 0.0)] + [(k, v) for k in SHIFT_KINDS for v in getattr(self, k)]

    def batch_grid(self, kind: str, level: float) -> list[tuple[int, float]]:
        """The (test batch size, prior N) pairs evaluated under one condition."""
        grid = {(b, 0.0) for b in self.severity_batch_sizes}
        if (kind, level) in self.sweep_conditions:
            grid |= {(b, p) for b in self.test_batch_sizes for p in self.priors}
        return sorted(grid)


@functools.lru_cache(maxsize=4)
def _data(n: int) -> datasets.Dataset:
    return datasets.load("mnist1d", preprocessing="standardized", n=n).images()


def fit(cfg: ShiftConfig, seed: int) -> nn.Module:
    """One :class:`~bnlib.models.CNN1d` trained on MNIST-1D with SGD + momentum (eval mode, on
    ``cfg.device``)."""
    ds = _data(cfg.n)
    net = seeded(seed, lambda: CNN1d(*ds.input_shape, ds.num_classes, channels=cfg.channels))
    train(net, ds, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
          seed=seed, eval_every=cfg.steps, eval_splits=(), device=cfg.device)
    return net


@register("bn_under_shift", ShiftConfig, title="BN statistics under test-time input shifts",
          chapter="20_shift", plot=lambda df: plot_severity(df))
def bn_under_shift(cfg: ShiftConfig) -> pd.DataFrame:
    """Test accuracy of every seed's model under every shift condition and statistics
    method: columns ``seed, shift, level, method, batch_size, prior, accuracy``
    (``batch_size``/``prior`` NaN where they do not apply)."""
    dev = resolve_device(cfg.device)
    ds = _data(cfg.n)
    test = ds.test.to(dev)

    def one(seed: int) -> list[dict]:
        rows = []
        net = fit(cfg, seed)
        precise = recompute_batchnorm_stats(copy.deepcopy(net), ds.train.x.to(dev))
        for kind, level in cfg.conditions():
            x = shifted(test.x, kind, level, seed=1000 + int(10 * level))
            base = dict(seed=seed, shift=kind, level=level)
            whole = dict(batch_size=len(x), prior=math.inf)
            adapted = adapt_batchnorm_stats(copy.deepcopy(net), x, prior=cfg.adapt_prior)
            for method, model in (("running", net), ("recomputed", precise), ("adapted", adapted)):
                rows.append(dict(base, method=method, batch_size=math.nan,
                                 prior=cfg.adapt_prior if method == "adapted" else math.inf,
                                 accuracy=grouped_accuracy(model, x, test.y, **whole)))
            for b, n_prior in cfg.batch_grid(kind, level):
                rows.append(dict(base, method="batch", batch_size=b, prior=n_prior,
                                 accuracy=grouped_accuracy(net, x, test.y, batch_size=b,
                                                           prior=n_prior)))
        return rows

    return pd.DataFrame([r for seed in cfg.seeds
                         for r in cache.cell({"shift": cfg, "seed": seed}, lambda: one(seed))])


def _label(method: str, b: float, prior: float) -> str:
    if method != "batch":
        return {"running": "running statistics", "recomputed": "recomputed on training data",
                "adapted": "adapted to the test set"}[method]
    return f"test batch {int(b)}" + (f", N = {prior:g}" if prior else "")


def plot_severity(df: pd.DataFrame, batch_sizes: tuple[int, ...] = (128, 2)):
    """Accuracy (mean over seeds, bars: min–max) against each shift's level, one panel per
    shift kind: running, adapted and prediction-time statistics (``N = 0``) at ``batch_sizes``."""
    from ..plots import new_axes
    keep = (df["method"] != "batch") | (df["batch_size"].isin(batch_sizes) & (df["prior"] == 0))
    d = df[keep].assign(how=lambda t: [_label(*r) for r in zip(t["method"], t["batch_size"], t["prior"])])
    clean = d[d["shift"] == "none"]
    fig, axes = new_axes(len(SHIFT_KINDS), width=4.3, height=3.4)
    for ax, kind in zip(axes[0], SHIFT_KINDS):
        part = pd.concat([d[d["shift"] == kind],
                          clean.assign(level=1.0 if kind == "contrast" else 0.0)])
        for how, g in part.groupby("how", sort=False):
            s = g.groupby("level")["accuracy"].agg(["mean", "min", "max"])
            ax.errorbar(s.index, s["mean"], yerr=[s["mean"] - s["min"], s["max"] - s["mean"]],
                        marker="o", capsize=2, label=how)
        if kind == "contrast":
            ax.set_xscale("log", base=2)
        ax.set(title=kind, xlabel={"noise": "noise std", "contrast": "factor",
                                   "offset": "offset"}[kind], ylabel="test accuracy")
    axes[0][0].legend(fontsize=8)
    return fig


def plot_batch_size(df: pd.DataFrame, conditions: tuple[tuple[str, float], ...]):
    """Accuracy against the test batch size for each prior ``N``, one panel per (shift, level);
    running and adapted statistics as horizontal lines (means over seeds)."""
    from ..plots import new_axes
    fig, axes = new_axes(len(conditions), width=4.6, height=3.4)
    for ax, (kind, level) in zip(axes[0], conditions):
        d = df[(df["shift"] == kind) & (df["level"] == level)]
        batch = d[d["method"] == "batch"].groupby(["prior", "batch_size"])["accuracy"].mean()
        for prior, s in batch.groupby(level=0):
            ax.plot(s.index.get_level_values(1), s.to_numpy(), marker="o",
                    label=f"batch stats, N = {prior:g}")
        for method, style in (("running", ":"), ("recomputed", "-."), ("adapted", "--")):
            ax.axhline(d[d["method"] == method]["accuracy"].mean(), color="k", ls=style,
                       label=_label(method, math.nan, 0))
        ax.set_xscale("log", base=2)
        ax.set(title="no shift" if kind == "none" else f"{kind} {level:g}",
               xlabel="test batch size", ylabel="test accuracy")
    axes[0][0].legend(fontsize=8)
    return fig
