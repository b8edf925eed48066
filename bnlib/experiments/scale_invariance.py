"""Chapter 10: is a batch-normalised network invariant to the scale of its inputs?

For a first layer without bias followed by BN, multiplying every input by ``c > 0``
multiplies the layer's pre-activations by ``c``, and BN divides it out again:

    BN(W(c·x)) = (c·z − c·μ) / √(c²σ² + ε) = (z − μ) / √(σ² + ε/c²).

So in *training mode* the network computes the same function for every ``c`` (up to
ε), and because the first layer's gradient is (∂L/∂z)·(c·x)ᵀ with ∂L/∂z scaled by 1/c,
its gradient is unchanged too: the whole SGD trajectory is the same
(Ioffe & Szegedy 2015 §3.3). ε is the only thing that sees ``c``: for ``c²σ²`` comparable
to ε the invariance breaks, and compensating ε (``ε·c²``) restores it exactly.

At *inference* the BN layers use running statistics collected at the training scale, so
rescaled test inputs are normalised with the wrong numbers and the invariance is gone.
Normalising with the test batch's own statistics, or recomputing the statistics on
rescaled data, restores it.

Experiments: ``input_scale_train`` (train on ``c·x``) and ``input_scale_test`` (train
on ``x``, evaluate on ``c·x_test``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Sequence

import pandas as pd
import torch

from .. import data as datasets
from ..data import Dataset, Split
from ..inference import batch_statistics, recompute_batchnorm_stats
from ..models import mlp
from ..train import StepInfo, evaluate, seeded, train
from ..config import override
from . import Config, register, sweep

__all__ = ["rescaled", "StepLossRecorder", "ScaleTrainConfig", "ScaleTestConfig",
           "input_scale_train", "input_scale_test", "trajectory_gap", "final_accuracy",
           "plot_trajectories", "plot_scale_test"]


def rescaled(data: Dataset, c: float, splits: Sequence[str] = ("train", "val", "test")) -> Dataset:
    """``data`` with the inputs of ``splits`` multiplied by ``c`` (targets untouched)."""
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise ValueError(f"the scale c must be a positive finite number, got {c!r}")
    changes = {}
    for s in splits:
        part = data.split(s)  # raises on a bad split name
        changes[s] = Split(part.x * c, part.y)
    return replace(data, **changes)


class StepLossRecorder:
    """Training callback: the mini-batch loss of every step (``.frame()``: ``step, loss``)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def __call__(self, info: StepInfo) -> None:
        self.rows.append({"step": info.step, "loss": info.loss.item()})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["step", "loss"])


@dataclass(frozen=True)
class ScaleTrainConfig(Config):
    """Train on ``c·x`` for each ``c`` in ``scales``: BN at ``lr``, BN with ε·c², and the
    plain net at each of ``plain_lrs`` (its LR is tuned per scale on the validation split).

    Quick: 3×128 ReLU MLP on digits (pixels scaled to [0, 1], then × c), SGD with
    momentum 0.9, 120 steps of batch 64, 8 seeds (the plain LR tuned on 3 others). ``dtype="float64"``: in float32 the
    rounding of ``c·x`` (≈1e-7) is enough for training's step-after-step amplification to
    make "identical" runs drift apart visibly in a few hundred steps; float64 keeps the
    comparison about ε, not rounding.
    """

    data: str = "digits"
    depth: int = 3
    width: int = 64                          # small: 8 seeds x 3 scales x 3 arms fit the time budget
    scales: tuple[float, ...] = (0.01, 1.0, 100.0)  # tiny, as trained, huge
    lr: float = 0.1                          # BN's rate, the same at every scale
    plain_lrs: tuple[float, ...] = (0.001, 0.01, 0.1)  # the plain net's grid, tuned per scale
    steps: int = 120
    batch_size: int = 64
    momentum: float = 0.9
    eval_every: int = 40
    dtype: str = "float64"                   # keeps the comparison about eps, not rounding
    seeds: tuple[int, ...] = tuple(range(8))  # reported, paired seeds
    tuning_seeds: tuple[int, ...] = (1000, 1001, 1002)  # the plain LR is chosen on these (val split)
    exact_seeds: tuple[int, ...] = (0, 1, 2)  # the ε·c² arm: an exactness check per seed, not a statistic

    @classmethod
    def full(cls) -> "ScaleTrainConfig":
        return override(cls(), {"data": "fashion_mnist", "width": 256, "steps": 3000, "eval_every": 250,
                                "scales": (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
                                "plain_lrs": (1e-5, 1e-4, 0.001, 0.01, 0.1)})


def _train_scaled(*, seed: int, data: Dataset, c: float, model: dict, lr: float,
                  compensate_eps: bool = False, steps: int, batch_size: int, momentum: float,
                  eval_every: int, device: str) -> pd.DataFrame:
    """One run on ``c·x``: the evaluation history plus one ``split="step"`` row per step
    holding that step's mini-batch loss. ``compensate_eps`` sets the first BN's ε to ε·c²,
    which makes the run *exactly* the c = 1 run (up to rounding)."""
    ds = rescaled(data, c)
    net = seeded(seed, lambda: mlp(ds.num_features, ds.num_classes, **model)).to(ds.train.x.dtype)
    if compensate_eps:
        first = net.blocks[0].norm
        if not hasattr(first, "eps"):
            raise ValueError("compensate_eps needs a batch norm after the first layer")
        first.eps = first.eps * c * c
    rec = StepLossRecorder()
    hist = train(net, ds, steps=steps, lr=lr, momentum=momentum, batch_size=batch_size, seed=seed,
                 eval_every=eval_every, eval_splits=("val", "test"), callbacks=[rec], device=device,
                 show_progress=False)
    steps_df = rec.frame().assign(split="step", accuracy=math.nan, elapsed=math.nan,
                                  diverged=bool(hist["diverged"].any()))
    return pd.concat([hist, steps_df], ignore_index=True)


@register("input_scale_train", ScaleTrainConfig, title="Training on inputs multiplied by c",
          chapter="10_scale_invariance", plot=lambda df: plot_trajectories(df))
def input_scale_train(cfg: ScaleTrainConfig) -> pd.DataFrame:
    """Histories of BN (``lr``), BN with ε·c² and plain (each of ``plain_lrs``) on ``c·x``.

    Columns: those of :func:`bnlib.train.train` (split ``"step"`` rows carry every step's
    mini-batch loss), ``arm, seed, c, lr``. Arms share seeds: same init, same batches.
    """
    if not cfg.scales or any(not (c > 0 and math.isfinite(c)) for c in cfg.scales):
        raise ValueError(f"scales must be positive finite numbers, got {cfg.scales}")
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {cfg.dtype!r}")
    ds = datasets.load(cfg.data, dtype=getattr(torch, cfg.dtype))
    base = dict(depth=cfg.depth, width=cfg.width)
    common = dict(data=ds, steps=cfg.steps, batch_size=cfg.batch_size, momentum=cfg.momentum,
                  eval_every=cfg.eval_every, device=cfg.device)
    bn = pd.concat([
        sweep(_train_scaled, seeds=cfg.seeds, arms={"BN": {"model": {**base, "norm": "batch"}}},
              grid={"c": list(cfg.scales)}, common={**common, "lr": cfg.lr}, desc="scale BN"),
        sweep(_train_scaled, seeds=cfg.exact_seeds,
              arms={"BN, ε·c²": {"model": {**base, "norm": "batch"}, "compensate_eps": True}},
              grid={"c": list(cfg.scales)}, common={**common, "lr": cfg.lr}, desc="scale BN eps")],
        ignore_index=True)
    bn["lr"] = cfg.lr
    plain_arm = {"plain": {"model": {**base, "norm": "none"}}}
    tuning = sweep(_train_scaled, seeds=cfg.tuning_seeds, arms=plain_arm,
                   grid={"c": list(cfg.scales), "lr": list(cfg.plain_lrs)}, common=common,
                   desc="scale plain tuning")
    fin = final_accuracy(tuning)
    choice = fin.groupby(["c", "lr"])["val_acc"].mean().groupby("c").idxmax().map(lambda t: t[1])
    plain = pd.concat([sweep(_train_scaled, seeds=cfg.seeds, arms=plain_arm, grid={"c": [c]},
                             common={**common, "lr": float(choice[c])}, desc="scale plain").assign(lr=float(choice[c]))
                       for c in cfg.scales], ignore_index=True)
    return pd.concat([bn.assign(kind="history"), plain.assign(kind="history"),
                      tuning.assign(kind="tuning")], ignore_index=True)


def trajectory_gap(df: pd.DataFrame, arm: str, c: float, reference: float = 1.0) -> pd.DataFrame:
    """Per seed: max over steps of |loss(c) − loss(reference)| of the per-step mini-batch
    losses of ``arm`` (same seed, same batches), and the same relative to the loss."""
    d = df[(df["arm"] == arm) & (df["split"] == "step")]
    if d.empty:
        raise ValueError(f"no per-step rows for arm {arm!r}")
    a = d[d["c"] == c].set_index(["seed", "step"])["loss"]
    b = d[d["c"] == reference].set_index(["seed", "step"])["loss"]
    if a.empty or b.empty:
        raise ValueError(f"scale {c} or reference {reference} is missing for arm {arm!r}")
    gap = (a - b).abs()
    rel = gap / b.abs()
    out = pd.DataFrame({"max_abs_gap": gap.groupby("seed").max(),
                        "max_rel_gap": rel.groupby("seed").max(),
                        "steps_compared": gap.groupby("seed").count()}).reset_index()
    return out.assign(arm=arm, c=c)


def final_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, c, lr, seed) of an ``input_scale_train`` result: the final
    ``val_acc`` and ``test_acc`` (0 for a diverged run, never a stale number) and ``diverged``."""
    missing = {"arm", "c", "lr", "seed", "split", "accuracy", "diverged"} - set(df.columns)
    if missing:
        raise ValueError(f"not an input_scale_train result: missing columns {sorted(missing)}")
    rows = []
    for (arm, c, lr, seed), run in df.groupby(["arm", "c", "lr", "seed"], sort=False):
        div = bool(run["diverged"].any())

        def last(split: str) -> float:
            h = run[run["split"] == split]
            return 0.0 if div or h.empty else float(h["accuracy"].iloc[-1])

        rows.append({"arm": arm, "c": c, "lr": lr, "seed": seed, "diverged": div,
                     "val_acc": last("val"), "test_acc": last("test")})
    return pd.DataFrame(rows)


def plot_trajectories(df: pd.DataFrame, axes=None, seed: int | None = None):
    """Left: BN's per-step training loss on ``c·x`` for every ``c`` (one seed). Right:
    |loss(c) − loss(1)| per step for BN and for BN with ε·c² (log scale; exact zeros,
    where the two runs agree to the last bit, are drawn at the bottom of the axis)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from .. import plots
    steps = df[df["split"] == "step"]
    seed = steps["seed"].min() if seed is None else seed
    if axes is None:
        _, axes = plots.new_axes(ncols=2, width=5.2)
        axes = axes[0]
    bn = steps[(steps["arm"] == "BN") & (steps["seed"] == seed)]
    for c, g in bn.groupby("c"):
        axes[0].plot(g["step"], g["loss"], lw=1.2 if c == 1 else 0.9, ls="-" if c == 1 else "--",
                     label=f"c = {c:g}")
    axes[0].set_yscale("log")
    axes[0].set(title=f"BN: training loss on c·x (seed {seed})", xlabel="step", ylabel="mini-batch loss")
    axes[0].legend()
    floor = 1e-17
    for arm in ("BN", "BN, ε·c²"):
        d = steps[(steps["arm"] == arm) & (steps["seed"] == seed)].pivot(index="step", columns="c", values="loss")
        for c in [c for c in d.columns if c != 1.0]:
            gap = np.maximum((d[c] - d[1.0]).abs(), floor)
            axes[1].plot(d.index, gap, lw=1, ls="-" if arm == "BN" else ":", label=f"{arm}, c = {c:g}")
    axes[1].set_yscale("log")
    axes[1].set_ylim(bottom=floor / 2)
    axes[1].set(title="|loss(c) − loss(1)| per step", xlabel="step", ylabel="absolute difference")
    axes[1].legend(fontsize=8)
    return plt.gcf()


@dataclass(frozen=True)
class ScaleTestConfig(Config):
    """Train BN and plain nets on ``x`` (c = 1), then evaluate on ``c·x_test`` for each
    ``c`` in ``scales``: with running statistics, with the test batch's own statistics, and
    with statistics recomputed on ``c·x_train``."""

    data: str = "digits"
    depth: int = 3
    width: int = 64                          # small: 8 seeds fit the time budget
    scales: tuple[float, ...] = (0.5, 1.0, 2.0, 10.0)  # test-input scales
    lr: float = 0.1
    plain_lr: float = 0.1
    steps: int = 150                         # enough for ~95 % test accuracy at c = 1
    batch_size: int = 64
    momentum: float = 0.9
    seeds: tuple[int, ...] = tuple(range(8))  # reported, paired seeds
    margin: float = 0.02                     # accuracy change (vs c = 1) small enough to call "unchanged"
    plain_margin: float = 0.05               # the same, for the plain net's "nearly flat"

    @classmethod
    def full(cls) -> "ScaleTestConfig":
        return override(cls(), {"data": "fashion_mnist", "width": 256, "steps": 3000,
                                "scales": (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)})


def _train_then_rescale(*, seed: int, data: Dataset, model: dict, lr: float, scales: Sequence[float],
                        steps: int, batch_size: int, momentum: float, device: str) -> pd.DataFrame:
    """Train on ``x``; return one row per (test scale, inference mode) with loss and accuracy."""
    net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, **model))
    hist = train(net, data, steps=steps, lr=lr, momentum=momentum, batch_size=batch_size, seed=seed,
                 eval_every=steps, eval_splits=("val",), device=device, show_progress=False)
    diverged = bool(hist["diverged"].any())
    has_bn = model.get("norm") == "batch"
    rows = []
    for c in scales:
        test = rescaled(data, c, splits=("test",)).test
        modes = {"running statistics" if has_bn else "eval mode (no BN)": lambda m: evaluate(m, test)}
        if has_bn:
            def batch_mode(m, test=test):
                with batch_statistics(m):
                    return evaluate(m, test)   # the whole test set is one batch

            def recomputed(m, c=c, test=test):
                m2 = recompute_batchnorm_stats(copy.deepcopy(m), data.train.x * c)
                return evaluate(m2, test)
            modes.update({"test-batch statistics": batch_mode, "recomputed on c·x_train": recomputed})
        for mode, fn in modes.items():
            loss, acc = fn(net)
            rows.append({"c": c, "mode": mode, "loss": loss, "accuracy": acc, "diverged": diverged})
    return pd.DataFrame(rows)


@register("input_scale_test", ScaleTestConfig, title="Evaluating on rescaled test inputs",
          chapter="10_scale_invariance", plot=lambda df: plot_scale_test(df))
def input_scale_test(cfg: ScaleTestConfig) -> pd.DataFrame:
    """One row per arm × seed × test scale × inference mode: ``c, mode, loss, accuracy,
    diverged, arm, seed``. The plain net has one mode, ``eval mode (no BN)``."""
    if not cfg.scales or any(not (c > 0 and math.isfinite(c)) for c in cfg.scales):
        raise ValueError(f"scales must be positive finite numbers, got {cfg.scales}")
    ds = datasets.load(cfg.data)
    base = dict(depth=cfg.depth, width=cfg.width)
    return sweep(_train_then_rescale, seeds=cfg.seeds,
                 arms={"BN": {"model": {**base, "norm": "batch"}, "lr": cfg.lr},
                       "plain": {"model": {**base, "norm": "none"}, "lr": cfg.plain_lr}},
                 common=dict(data=ds, scales=tuple(cfg.scales), steps=cfg.steps,
                             batch_size=cfg.batch_size, momentum=cfg.momentum, device=cfg.device),
                 desc="scale test")


def plot_scale_test(df: pd.DataFrame, ax=None):
    """Test accuracy against the test-input scale, one line per arm and inference mode."""
    from .. import plots
    d = df.assign(setting=df["arm"] + ": " + df["mode"])
    ax = plots.sweep(d, x="c", y="accuracy", hue="setting", ax=ax,
                     title="Test accuracy on c · x_test (trained on x)")
    cs = sorted(d["c"].unique())
    ax.set_xticks(cs, [f"{c:g}" for c in cs])
    ax.minorticks_off()
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_xlabel("test input scale c")
    ax.set_ylabel("test accuracy")
    return ax
