"""Chapter 16 (M4): when batch norm hurts — tiny batches and batches that are not i.i.d.

Two experiments on an MLP (``BatchNorm1d`` normalises each feature over the *batch* only; a
CNN's ``BatchNorm2d`` also pools over the positions, see :func:`pooled_values`):

``small_batches``
    BN vs LayerNorm (and, at full scale, GroupNorm and no normaliser) at a tiny and a normal
    batch size. Each arm's learning rate is tuned per batch size on validation with the tuning
    seeds, over a grid scaled by the square-root rule ``lr = base·√(B/64)·factor``; then the
    8 reported seeds are trained at each choice. Every BN run is also evaluated with precise
    statistics and with the batch statistics of test batches of its training size.

``non_iid_batches``
    The same normalisers trained with i.i.d. (shuffled) batches or with *class-sorted*
    batches (:func:`bnlib.data.class_sorted_batches`, ``fit(..., sampler=)``), paired by
    seed, at a learning rate tuned on shuffled batches. BN runs are also evaluated with precise
    statistics and with batch statistics on shuffled and on class-sorted test batches.

Both return tidy rows: one per run and evaluation (``eval``: ``running``, ``precise``,
``batch stats``, ``batch stats, class-sorted``), from :func:`bnlib.inference.evaluate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..config import override
from ..data import class_sorted_batches
from ..inference import evaluate, recompute_batchnorm_stats
from ..models import MLPSpec
from ..protocol import Protocol, Tuning, arm_config, choose, load_data, train_spec, trained
from ..train import TrainSpec, fit
from . import register

# --- the mechanics --------------------------------------------------------------------

def two_sample_normalisation(num_features: int = 6, *, seed: int = 0, eps: float = 1e-5) -> Tensor:
    """Batch-normalise a batch of TWO random examples (no affine) and return the result.

    With two values per feature, ``x₁ − μ = (x₁ − x₂)/2 = −(x₂ − μ)`` and
    ``σ = |x₁ − x₂|/2``, so every normalised value is ``±1`` (up to ε): the layer passes
    on only *which* of the two examples is larger, feature by feature.
    """
    if num_features < 1:
        raise ValueError(f"num_features must be ≥ 1, got {num_features}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, num_features, generator=g) * 3 + 1
    mean = x.mean(0, keepdim=True)
    var = x.var(0, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def pooled_values(batch_size: int, *, conv: bool = False, height: int = 8, width: int = 8) -> int:
    """How many numbers one BN channel averages over: ``N`` for ``BatchNorm1d`` on ``(N, C)``,
    ``N·H·W`` for ``BatchNorm2d`` on ``(N, C, H, W)`` (every position is a sample)."""
    if batch_size < 1 or height < 1 or width < 1:
        raise ValueError("batch_size, height and width must be ≥ 1")
    return batch_size * (height * width if conv else 1)


def _evaluations(net, data, *, norm: str, batch_size: int, diverged: bool,
                 extra: bool) -> list[dict]:
    """Test (and val) accuracy of a trained net in eval mode; for BN also with precise
    statistics and with the batch statistics of test batches of ``batch_size``."""
    if diverged:
        return [dict(eval="running", val_acc=math.nan, test_acc=math.nan)]
    out = [dict(eval="running", val_acc=evaluate(net, data.val)[1], test_acc=evaluate(net, data.test)[1])]
    if norm != "batch":
        return out
    out.append(dict(eval="batch stats", test_acc=evaluate(
        net, data.test, statistics="batch", batch_size=batch_size, order="shuffled")[1]))
    if extra:
        out.append(dict(eval="batch stats, class-sorted", test_acc=evaluate(
            net, data.test, statistics="batch", batch_size=batch_size, order="class_sorted")[1]))
    recompute_batchnorm_stats(net, data.train.x)
    out.append(dict(eval="precise", val_acc=evaluate(net, data.val)[1], test_acc=evaluate(net, data.test)[1]))
    return out


def _reported(cfg: Protocol, arm: str, *, lr: float, batch_size: int, sampler: str,
              extra: bool) -> list[dict]:
    """Train ``arm`` at ``lr`` on every reported seed and evaluate each run. Shuffled batches
    of an arm the stacked engine supports (BN) train all seeds at once; the rest one by one."""
    c = arm_config(override(cfg, {"train.lr": lr, "train.batch_size": batch_size}), arm)
    if sampler == "shuffled":
        done = trained(c, arms=[arm], stacked=True)
    else:
        data = load_data(c)
        done = ((arm, s, h, h.attrs.pop("model"), data) for s in cfg.seeds for h in
                [fit(c.model, train_spec(c), data, s, sampler=class_sorted_batches(data.train.y))])
    out = []
    for _, seed, hist, net, data in done:
        div = bool(hist["diverged"].any())
        evals = _evaluations(net, data.to(next(net.parameters()).device), norm=c.model.norm,
                             batch_size=batch_size, diverged=div, extra=extra)
        out += [dict(arm=arm, seed=seed, lr=lr, batch_size=batch_size, sampler=sampler,
                     diverged=div, **e) for e in evals]
    return out


def _grid(cfg: "SmallBatchConfig", batch_size: int) -> tuple[float, ...]:
    return tuple(round(cfg.base_lr * math.sqrt(batch_size / cfg.reference_batch) * f, 6)
                 for f in cfg.lr_factors)


def _choose(cfg: Protocol, grid: tuple[float, ...], batch_size: int) -> pd.DataFrame:
    """Each arm's learning rate at ``batch_size``, tuned on validation with the tuning seeds."""
    return choose(override(cfg, {"train.batch_size": batch_size, "train.eval_every": cfg.train.steps,
                                 "train.eval_splits": ("val",), "tuning.grid": grid}))[1]


def _bn_ln() -> dict:
    return {"BN": {"model.norm": "batch"}, "LN": {"model.norm": "layer"}}


_FULL_ARMS = {**_bn_ln(), "GN": {"model.norm": "group"}, "plain": {"model.norm": "none"}}


@dataclass(frozen=True)
class SmallBatchConfig(Protocol):
    """BN vs LayerNorm at a tiny and a normal batch size, learning rate tuned per arm and size."""

    # torch's BN layer, for the time budget: with bnlib's, this config adds ~10 s of CPU to the
    # chapter (36 -> 46 s measured) and the class-sorted one below ~4 s more
    model: MLPSpec = MLPSpec(depth=3, width=64, norm_impl="torch")  # an MLP: BatchNorm1d pools over the batch only
    train: TrainSpec = TrainSpec(steps=150, eval_every=150)  # same steps at every batch size
    arms: dict = field(default_factory=_bn_ln)         # full adds GN and plain
    tuning: Tuning = Tuning(seeds=(1000, 1001, 1002))  # never reported; choices never at the grid's edge
    batch_sizes: tuple[int, ...] = (2, 64)             # degenerate vs healthy
    base_lr: float = 0.2                               # the rate at the reference batch
    reference_batch: int = 64                          # square-root rule: lr ∝ √(batch/64)
    lr_factors: tuple[float, ...] = (0.25, 1.0, 4.0, 16.0)  # the tuning grid, ×4 steps around the rule
    margin: float = 0.02                               # smallest test-accuracy difference that matters

    FULL = {"data": "fashion_mnist", "model.width": 256, "train.steps": 3000,
            "batch_sizes": (2, 4, 8, 32, 128), "lr_factors": (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
            "arms": _FULL_ARMS}


@register("small_batches", SmallBatchConfig, title="BN vs LayerNorm across batch sizes",
          chapter="16_when_it_hurts", plot=lambda df: plot_small_batches(df))
def small_batches(cfg: SmallBatchConfig) -> pd.DataFrame:
    """Tuning choices (``kind="choice"``) and one row per reported run × evaluation
    (``kind="final"``: ``arm, seed, lr, batch_size, eval, val_acc, test_acc, diverged``)."""
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 2:
        raise ValueError(f"batch sizes must be ≥ 2, got {cfg.batch_sizes}")
    if not cfg.lr_factors or any(not (f > 0 and math.isfinite(f)) for f in cfg.lr_factors):
        raise ValueError(f"lr_factors must be positive, got {cfg.lr_factors}")
    out, choices = [], []
    for b in cfg.batch_sizes:
        choice = _choose(cfg, _grid(cfg, b), b)
        choices.append(choice.assign(batch_size=b))
        for arm, lr in zip(choice["arm"], choice["lr"]):
            out += _reported(cfg, arm, lr=float(lr), batch_size=b, sampler="shuffled", extra=False)
    return pd.concat([pd.DataFrame(out).assign(kind="final"),
                      pd.concat(choices, ignore_index=True).assign(kind="choice")], ignore_index=True)


@dataclass(frozen=True)
class NonIIDConfig(Protocol):
    """Shuffled vs class-sorted batches of 32 for BN and LayerNorm, paired by seed."""

    # torch's BN layer, for the time budget (see SmallBatchConfig): with bnlib's layer in both
    # configs the chapter took 50 s of CPU instead of 36, too close to its 60 s in CI
    model: MLPSpec = MLPSpec(depth=3, width=64, norm_impl="torch")  # the small-batch network
    train: TrainSpec = TrainSpec(steps=150, batch_size=32, eval_every=150)  # a healthy batch size
    arms: dict = field(default_factory=_bn_ln)         # full adds GN and plain
    tuning: Tuning = Tuning(grid=(0.03, 0.1, 0.3, 1.0))  # tuned on shuffled batches, per arm
    margin: float = 0.02                               # smallest test-accuracy difference that matters

    FULL = {"data": "fashion_mnist", "model.width": 256, "train.steps": 3000,
            "train.batch_size": 64, "arms": _FULL_ARMS}


@register("non_iid_batches", NonIIDConfig, title="Shuffled vs class-sorted batches",
          chapter="16_when_it_hurts", plot=lambda df: plot_non_iid(df))
def non_iid_batches(cfg: NonIIDConfig) -> pd.DataFrame:
    """Tuning choices (``kind="choice"``) and one row per run × sampler × evaluation
    (``kind="final"``)."""
    b = cfg.train.batch_size
    if b < 2:
        raise ValueError(f"batch_size must be ≥ 2, got {b}")
    choice = _choose(cfg, cfg.tuning.grid, b)
    out = []
    for arm, lr in zip(choice["arm"], choice["lr"]):
        for sampler in ("shuffled", "class-sorted"):
            out += _reported(cfg, arm, lr=float(lr), batch_size=b, sampler=sampler, extra=True)
    return pd.concat([pd.DataFrame(out).assign(kind="final"), choice.assign(kind="choice")],
                     ignore_index=True)


def final_table(df: pd.DataFrame, eval: str = "running", value: str = "test_acc") -> pd.DataFrame:
    """``value`` of the reported runs for one evaluation, seeds as rows and (the other keys)
    as columns: ``arm`` plus ``batch_size`` or ``sampler``."""
    f = df[(df["kind"] == "final") & (df["eval"] == eval)]
    cols = ["arm"] + [c for c in ("batch_size", "sampler") if f[c].nunique() > 1]
    return f.pivot_table(index="seed", columns=cols, values=value)


def plot_small_batches(df: pd.DataFrame, ax=None):
    """Test accuracy (mean ± sd over seeds, each arm at its tuned rate) against batch size;
    BN with precise statistics and with batch statistics added."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .. import plots
    ax = ax or plt.gca()
    f = df[df["kind"] == "final"].copy()
    f["curve"] = np.where(f["eval"] == "running", f["arm"], f["arm"] + ", " + f["eval"])
    pal = {c: plots.color(c.split(",")[0]) for c in f["curve"].unique()}
    sns.lineplot(data=f, x="batch_size", y="test_acc", hue="curve", style="eval", marker="o",
                 errorbar=("sd", 1), palette=pal, ax=ax)
    ax.set_xscale("log", base=2)
    sizes = sorted(f["batch_size"].unique())
    ax.set(xticks=sizes, xticklabels=[str(int(b)) for b in sizes], xlabel="batch size",
           ylabel="test accuracy", title="Accuracy against batch size")
    return ax.figure


def plot_non_iid(df: pd.DataFrame, ax=None):
    """Test accuracy (eval mode) of each normaliser with shuffled vs class-sorted batches."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    ax = ax or plt.gca()
    f = df[(df["kind"] == "final") & (df["eval"] == "running")]
    sns.barplot(data=f, x="arm", y="test_acc", hue="sampler", errorbar=("sd", 1), ax=ax)
    ax.set(ylabel="test accuracy (eval mode)", xlabel="", ylim=(0, 1),
           title="Shuffled vs class-sorted batches")
    return ax.figure
