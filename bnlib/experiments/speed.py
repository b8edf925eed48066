"""Chapter 4: does batch norm make training faster? Steps *and* seconds to a target.

Two experiments and the timing harness that chapter 13 shares:

* ``speed`` — an MLP with and without BN trained at every learning rate of a grid,
  paired seeds; each arm's learning rate is chosen on the *validation* split (the one that
  reaches the target accuracy soonest), and steps and seconds to the target are reported
  on the *test* split. Its result also holds an interleaved measurement of what one
  training step of each arm costs (``kind == "timing"`` rows), so that
  "time to target = steps to target × median seconds per step" does not rest on the
  noisy wall-clock of single runs.
* ``ioffe_mnist`` — the BN paper's MNIST experiment (Figure 1): three sigmoid layers of
  100 units, mini-batches of 60, small Gaussian initial weights, plain SGD; test accuracy
  over training and the 15th/50th/85th percentiles of one last-hidden-layer sigmoid input,
  at two initial weight scales (the speedup depends on how badly the baseline starts).

Timing harness: :func:`time_interleaved` calls several functions in a fresh random order
in every repeat and keeps one row per (function, repeat), so drifts of a shared machine hit
every arm alike; :func:`step_phases` gives the forward, backward and full-step callables of a
model; :func:`timing_summary` and :func:`paired_ratio` reduce the rows to medians.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .. import data as datasets
from ..models import cnn, mlp
from ..probes import PercentileTracker
from ..stats import steps_to_target
from ..timing import paired_ratio, step_phases, time_interleaved, timing_summary  # noqa: F401
from ..train import resolve_device, seeded, train
from . import Config, register, sweep
from ._common import tune_lr

__all__ = ["SpeedConfig", "IoffeConfig", "speed", "ioffe_mnist", "time_interleaved",
           "step_phases", "timing_summary", "paired_ratio", "run_summary", "best_lr",
           "time_to_target", "histories", "timings", "build_model", "mean_sd", "target_table"]

ARMS = {"no BN": {"norm": "none"}, "BN": {"norm": "batch"}}


# --- steps and seconds to a target ------------------------------------------------------

@dataclass(frozen=True)
class SpeedConfig(Config):
    """Quick preset: an 8×128 ReLU MLP on the digits, SGD with momentum, 5 learning rates."""

    data: str = "digits"
    arch: str = "mlp"                 # "mlp" or "cnn"
    depth: int = 8
    width: int = 128
    channels: tuple[int, ...] = (16, 32, 64)   # for arch="cnn"
    norm_impl: str = "torch"          # time the fused kernel people actually use
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)
    momentum: float = 0.9
    batch_size: int = 64
    steps: int = 150
    eval_every: int = 10
    target: float = 0.95              # test accuracy to reach
    loss_target: float = 0.25         # test loss to reach (chapter 4's "loss falls faster")
    timing_repeats: int = 15
    timing_number: int = 6

    @classmethod
    def full(cls) -> "SpeedConfig":
        return cls(data="mnist", depth=8, width=512, lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                   steps=5000, eval_every=50, target=0.97, loss_target=0.15, batch_size=128,
                   seeds=(0, 1, 2, 3, 4), timing_repeats=50, timing_number=10)


def build_model(cfg: SpeedConfig, data: datasets.Dataset, norm: str) -> nn.Module:
    """The config's network for ``data`` with normalisation ``norm`` ("none" or "batch")."""
    if cfg.arch == "mlp":
        return mlp(data.num_features, data.num_classes, depth=cfg.depth, width=cfg.width,
                   norm=norm, norm_impl=cfg.norm_impl)
    if cfg.arch == "cnn":
        return cnn(data.input_shape[0], data.num_classes, channels=cfg.channels, norm=norm,
                   norm_impl=cfg.norm_impl)
    raise ValueError(f"arch must be 'mlp' or 'cnn', got {cfg.arch!r}")


def _load(cfg: SpeedConfig) -> datasets.Dataset:
    ds = datasets.load(cfg.data)
    return ds.images() if cfg.arch == "cnn" else ds


def _speed_run(*, seed: int, cfg: SpeedConfig, ds: datasets.Dataset, norm: str,
               lr: float) -> pd.DataFrame:
    net = seeded(seed, lambda: build_model(cfg, ds, norm))
    return train(net, ds, steps=cfg.steps, lr=lr, momentum=cfg.momentum,
                 batch_size=cfg.batch_size, seed=seed, device=cfg.device,
                 eval_every=cfg.eval_every, eval_splits=("val", "test"))


def _step_timing(cfg: SpeedConfig, ds: datasets.Dataset) -> pd.DataFrame:
    """Interleaved per-step cost of the two arms on one training batch (seed 0's models)."""
    dev = resolve_device(cfg.device)
    x, y = ds.train.x[:cfg.batch_size], ds.train.y[:cfg.batch_size]
    fns = {}
    for arm, kw in ARMS.items():
        net = seeded(0, lambda: build_model(cfg, ds, kw["norm"]))
        fns[arm] = step_phases(net, x, y, lr=min(cfg.lrs), momentum=cfg.momentum,
                               device=dev)["step"]
    df = time_interleaved(fns, repeats=cfg.timing_repeats, number=cfg.timing_number, device=dev)
    return df.rename(columns={"name": "arm"}).assign(phase="step", device=dev.type,
                                                     threads=torch.get_num_threads())


def histories(df: pd.DataFrame) -> pd.DataFrame:
    """The training-history rows of a ``speed`` or ``ioffe_mnist`` result."""
    return df[df["kind"] == "history"].dropna(axis=1, how="all").reset_index(drop=True)


def timings(df: pd.DataFrame) -> pd.DataFrame:
    """The per-step timing rows of a ``speed`` result (``arm, repeat, seconds, ...``)."""
    return df[df["kind"] == "timing"].dropna(axis=1, how="all").reset_index(drop=True)


def run_summary(hist: pd.DataFrame, target: float, *, by: Sequence[str] = ("arm", "lr"),
                tune_split: str = "val", report_split: str = "test",
                loss_target: float | None = None) -> pd.DataFrame:
    """One row per run (``by`` + ``seed``): steps to ``target`` accuracy on the tuning
    (``steps_val``) and the reporting split (``steps``), the training seconds the run had
    clocked by then (``seconds_in_run``), its final accuracy on the reporting split, whether
    it diverged, and ``speed = 1 / steps_val`` (0 when it never got there), the quantity
    learning rates are tuned on. With ``loss_target``, ``steps_loss`` is the first step at
    which the reporting split's loss is at or below it. ``inf`` means never reached."""
    if not 0 < target <= 1:
        raise ValueError(f"target accuracy must be in (0, 1], got {target}")
    if loss_target is not None and not loss_target > 0:
        raise ValueError(f"loss_target must be positive, got {loss_target}")
    rows = []
    for key, h in hist.groupby(list(by) + ["seed"], sort=False):
        s_tune = steps_to_target(h, target, split=tune_split)
        s_rep = steps_to_target(h, target, split=report_split)
        sec = steps_to_target(h, target, split=report_split, column="elapsed")
        rep = h[h["split"] == report_split]
        rows.append({**dict(zip(list(by) + ["seed"], key)), "steps_val": s_tune,
                     "steps": s_rep, "seconds_in_run": sec,
                     "final_accuracy": float(rep["accuracy"].iloc[-1]) if len(rep) else math.nan,
                     "diverged": bool(h["diverged"].any()),
                     "speed": 0.0 if math.isinf(s_tune) else 1.0 / s_tune})
        if loss_target is not None:
            rows[-1]["steps_loss"] = steps_to_target(h, loss_target, split=report_split,
                                                     metric="loss")
    return pd.DataFrame(rows)


def best_lr(summary: pd.DataFrame, *, by: Sequence[str] = ("arm",)) -> pd.DataFrame:
    """Each arm's learning rate, chosen on the tuning split: the highest mean ``speed``
    (1 / steps to target on validation; a run that never gets there or diverges counts 0).
    Built on :func:`bnlib.experiments._common.tune_lr`."""
    frame = summary.assign(split="val", step=0)
    return tune_lr(frame, metric="speed", by=by)


def time_to_target(summary: pd.DataFrame, timing: pd.DataFrame, best: pd.DataFrame, *,
                   by: Sequence[str] = ("arm",)) -> pd.DataFrame:
    """The runs at each arm's best learning rate, with seconds to target estimated as
    ``steps × median seconds per step`` (``sec_per_step``) from the interleaved ``timing``
    rows (and ``seconds_loss`` likewise when ``summary`` has ``steps_loss``)."""
    by = list(by)
    per_step = timing.groupby("arm")["seconds"].median().rename("sec_per_step").reset_index()
    runs = summary.merge(best[by + ["lr"]], on=by + ["lr"], how="inner")
    runs = runs.merge(per_step, on="arm", how="left")
    runs["seconds"] = runs["steps"] * runs["sec_per_step"]
    if "steps_loss" in runs:
        runs["seconds_loss"] = runs["steps_loss"] * runs["sec_per_step"]
    return runs


def mean_sd(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    """``"mean ± sd"`` over seeds; ``"not reached (k of n)"`` when some run never got there."""
    v = np.asarray(values, dtype=float)
    if np.isinf(v).any():
        return f"not reached ({int(np.isinf(v).sum())} of {len(v)})"
    sd = v.std(ddof=1) if len(v) > 1 else math.nan
    return f"{fmt.format(v.mean())} ± {fmt.format(sd)}"


def target_table(runs: pd.DataFrame, columns: Mapping[str, str] | None = None,
                 by: Sequence[str] = ("arm",)) -> pd.DataFrame:
    """The article-style table: one row per arm, ``mean ± sd`` over seeds of each column
    (default: steps, estimated seconds and in-run seconds to the target)."""
    columns = dict(columns or {"steps": "steps to target",
                               "seconds": "seconds to target (steps × median step)",
                               "seconds_in_run": "seconds to target (clocked in the run)"})
    rows = []
    for key, g in runs.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        if "lr" in g:
            row["best lr"] = g["lr"].iloc[0]
        row.update({label: mean_sd(g[col]) for col, label in columns.items() if col in g})
        rows.append(row)
    return pd.DataFrame(rows)


@register("speed", SpeedConfig, title="Steps and seconds to a target accuracy, LR tuned per arm",
          chapter="04_speed", plot=lambda df: _plot_speed(df))
def speed(cfg: SpeedConfig) -> pd.DataFrame:
    """Train both arms at every learning rate and seed; add interleaved per-step timings.

    Rows with ``kind == "history"`` are the training histories (columns of
    :func:`bnlib.train.train` plus ``arm, lr, seed``; evaluated on val and test every
    ``eval_every`` steps); rows with ``kind == "timing"`` hold ``arm, repeat, seconds``
    for one full training step of each arm (see :func:`time_interleaved`).
    """
    if not cfg.lrs or cfg.steps < cfg.eval_every:
        raise ValueError("need at least one learning rate and steps ≥ eval_every")
    ds = _load(cfg)
    hist = sweep(_speed_run, seeds=cfg.seeds, arms=ARMS, grid={"lr": cfg.lrs},
                 common={"cfg": cfg, "ds": ds}, desc="speed")
    timing = _step_timing(cfg, ds)
    return pd.concat([hist.assign(kind="history"), timing.assign(kind="timing")],
                     ignore_index=True).assign(target=cfg.target, loss_target=cfg.loss_target)


def _plot_speed(df: pd.DataFrame):
    from .. import plots
    hist = histories(df)
    best = best_lr(run_summary(hist, float(hist["target"].iloc[0])))
    at_best = hist.merge(best[["arm", "lr"]], on=["arm", "lr"])
    return plots.learning_curves(at_best, split="test", title="Test accuracy at each arm's best LR")


# --- the BN paper's MNIST experiment ----------------------------------------------------

@dataclass(frozen=True)
class IoffeConfig(Config):
    """Quick preset: the 5,000-image MNIST sample, 400 steps, two initial weight scales."""

    data: str = "mnist5k"
    width: int = 100
    depth: int = 3
    batch_size: int = 60
    steps: int = 400
    lrs: tuple[float, ...] = (0.5, 2.0)
    init_stds: tuple[float, ...] = (0.1, 0.3)
    eval_every: int = 50
    probe_every: int = 25
    probe_size: int = 256
    unit: int = 0
    target: float = 0.8
    norm_impl: str = "torch"

    @classmethod
    def full(cls) -> "IoffeConfig":
        # the paper: full MNIST, 50,000 steps of 60 examples
        return cls(data="mnist", steps=50000, eval_every=1000, probe_every=1000,
                   target=0.95, seeds=(0, 1, 2, 3, 4))


def _ioffe_run(*, seed: int, cfg: IoffeConfig, ds: datasets.Dataset, norm: str, lr: float,
               init_std: float) -> pd.DataFrame:
    net = seeded(seed, lambda: mlp(ds.num_features, ds.num_classes, depth=cfg.depth,
                                   width=cfg.width, activation="sigmoid", norm=norm,
                                   init="normal", init_std=init_std, norm_impl=cfg.norm_impl))
    probe = ds.test.x[:cfg.probe_size]
    tracker = PercentileTracker(net.blocks[-1].act, probe, unit=cfg.unit, every=cfg.probe_every)
    hist = train(net, ds, steps=cfg.steps, lr=lr, batch_size=cfg.batch_size, seed=seed,
                 device=cfg.device, eval_every=cfg.eval_every, eval_splits=("val", "test"),
                 callbacks=[tracker])
    return pd.concat([hist.assign(kind="history"), tracker.frame().assign(kind="percentile")],
                     ignore_index=True)


@register("ioffe_mnist", IoffeConfig, title="The BN paper's MNIST experiment (its Figure 1)",
          chapter="04_speed", plot=lambda df: _plot_ioffe(df))
def ioffe_mnist(cfg: IoffeConfig) -> pd.DataFrame:
    """Sigmoid MLP (``depth`` × ``width``), batch 60, N(0, std²) initial weights, plain SGD.

    For every initial std, arm, learning rate and seed: the training history
    (``kind == "history"``, val and test every ``eval_every`` steps) and the 15/50/85th
    percentiles of unit ``unit``'s input to the last hidden sigmoid on a fixed batch of
    test images (``kind == "percentile"``, every ``probe_every`` steps; train-mode pass).
    """
    if any(s <= 0 for s in cfg.init_stds) or not cfg.lrs:
        raise ValueError("init_stds must be positive and lrs non-empty")
    ds = datasets.load(cfg.data)
    out = sweep(_ioffe_run, seeds=cfg.seeds, arms=ARMS,
                grid={"init_std": cfg.init_stds, "lr": cfg.lrs},
                common={"cfg": cfg, "ds": ds}, desc="ioffe")
    return out.assign(target=cfg.target)


def _plot_ioffe(df: pd.DataFrame):
    from .. import plots
    hist = histories(df)
    stds = sorted(hist["init_std"].unique())
    target = float(df["target"].iloc[0])
    best = best_lr(run_summary(hist, target, by=("arm", "init_std", "lr")), by=("arm", "init_std"))
    at_best = hist.merge(best[["arm", "init_std", "lr"]], on=["arm", "init_std", "lr"])
    return plots.facets(stds, lambda s, ax: plots.learning_curves(
        at_best[at_best["init_std"] == s], split="test", ax=ax, title=f"init std {s:g}"))
