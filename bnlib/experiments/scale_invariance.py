"""Chapter 10: is a batch-normalised network invariant to the scale of its inputs?

For a first layer without bias followed by BN, multiplying every input by ``c > 0``
multiplies the layer's pre-activations by ``c``, and BN divides it out again:

    BN(W(c·x)) = (c·z − c·μ) / √(c²σ² + ε) = (z − μ) / √(σ² + ε/c²).

So in *training mode* the function and its gradients are the same for every ``c`` (up to
ε): the whole SGD trajectory is the same (Ioffe & Szegedy 2015 §3.3); compensating ε
(``ε·c²``) makes it exact. At *inference* the running statistics were collected at the
training scale, so rescaled test inputs are normalised with the wrong numbers; the test
batch's own statistics, or statistics recomputed on rescaled data, restore the invariance.

Experiments (both on :mod:`bnlib.protocol`): ``input_scale_train`` (train on ``c·x``: BN,
BN with ε·c², plain with its learning rate tuned per scale) and ``input_scale_test``
(train on ``x``, evaluate on ``c·x_test``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch

from .. import analysis
from ..config import override
from ..data import Dataset, rescaled
from ..inference import evaluate, recompute_batchnorm_stats
from ..models import MLPSpec
from ..nn import batchnorm_layers
from ..probes import LossRecorder
from ..protocol import Protocol, Tuning, probed, rows, trained, tuned
from ..train import TrainSpec
from . import register

__all__ = ["FirstEpsMLPSpec", "ScaleTrainConfig", "ScaleTestConfig",
           "input_scale_train", "input_scale_test", "trajectory_gap", "final_accuracy",
           "plot_trajectories", "plot_scale_test"]


@dataclass(frozen=True)
class FirstEpsMLPSpec(MLPSpec):
    """An :class:`MLPSpec` whose first batch norm's ε is multiplied by ``eps_factor``."""

    eps_factor: float = 1.0

    def build(self, seed: int, data: Dataset):
        net = MLPSpec.build(MLPSpec(**{f.name: getattr(self, f.name)
                                       for f in dataclasses.fields(MLPSpec)}), seed, data)
        if self.eps_factor != 1.0:
            first = batchnorm_layers(net.blocks[0])
            if not first:
                raise ValueError("eps_factor needs a batch norm after the first layer")
            first[0].eps *= self.eps_factor
        return net


def _train_arms() -> dict[str, dict[str, Any]]:
    return {"BN": {"model.norm": "batch"}, "BN, ε·c²": {"model.norm": "batch"},
            "plain": {"model.norm": "none"}}


@dataclass(frozen=True)
class ScaleTrainConfig(Protocol):
    """Train on ``c·x`` for each ``c`` in ``scales``: BN at ``train.lr``, BN with ε·c² (an
    exactness check on ``exact_seeds``), and the plain net with its learning rate tuned per
    scale on the validation split (tuning seeds disjoint from the reported ones).

    Quick: 3×64 ReLU MLP on digits (pixels scaled to [0, 1], then × c), SGD with momentum
    0.9, 120 steps of batch 64 (fewer leave BN at c = 0.01, where ε shows, below 90 %). ``dtype="float64"``: in float32 the rounding of ``c·x``
    (≈1e-7) is enough for training's step-after-step amplification to make "identical" runs
    drift apart visibly; float64 keeps the comparison about ε, not rounding.
    """

    data: str = "digits"
    # small: 8 seeds × 3 scales × 3 arms
    model: MLPSpec = MLPSpec(depth=3, width=64)
    # evaluated at the end only (the trajectories are the LossRecorder's per-step losses)
    train: TrainSpec = TrainSpec(lr=0.1, momentum=0.9, steps=120, batch_size=64, eval_every=120)
    arms: dict[str, dict[str, Any]] = field(default_factory=_train_arms)
    c: float = 1.0                           # the input scale of a run (the experiment sets it)
    scales: tuple[float, ...] = (0.01, 1.0, 100.0)  # tiny, as trained, huge
    dtype: str = "float64"                   # keeps the comparison about eps, not rounding
    seeds: tuple[int, ...] = tuple(range(8))  # reported, paired seeds
    exact_seeds: tuple[int, ...] = (0, 1, 2)  # the ε·c² arm: an exactness check per seed, not a statistic
    # the plain net's rate, per scale; its choice may sit at the grid's edge (the chapter says why)
    tuning: Tuning = Tuning(grid=(0.001, 0.01, 0.1), seeds=(1000, 1001, 1002), allow_edge=True)

    FULL = {"data": "fashion_mnist", "model.width": 256, "train.steps": 3000,
            "train.eval_every": 250,
            "scales": (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
            "tuning.grid": (1e-5, 1e-4, 0.001, 0.01, 0.1)}

    def prepare(self, data: Dataset) -> Dataset:
        """The inputs in ``dtype``, multiplied by ``c``."""
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        return rescaled(data, self.c, dtype=getattr(torch, self.dtype))


def _check_scales(scales: Sequence[float]) -> None:
    if not scales or any(not (c > 0 and math.isfinite(c)) for c in scales):
        raise ValueError(f"scales must be positive finite numbers, got {scales}")


@register("input_scale_train", ScaleTrainConfig, title="Training on inputs multiplied by c",
          chapter="10_scale_invariance", plot=lambda df: plot_trajectories(df))
def input_scale_train(cfg: ScaleTrainConfig) -> pd.DataFrame:
    """Per scale ``c``: BN and BN with ε·c² (each with a :class:`bnlib.probes.LossRecorder`:
    ``kind == "steps"`` rows hold every step's mini-batch loss) and the plain net through
    :func:`bnlib.protocol.tuned` (``kind == "tuning"`` and ``"history"`` rows). Columns of a
    history plus ``arm, seed, c, lr, kind``. Arms share seeds: same init, same batches."""
    _check_scales(cfg.scales)
    frames = []
    for c in cfg.scales:
        at = override(cfg, {"c": c})
        exact = dataclasses.replace(at, model=FirstEpsMLPSpec(**dataclasses.asdict(at.model),
                                                              eps_factor=c * c))
        for run_cfg, arm, seeds in ((at, "BN", cfg.seeds), (exact, "BN, ε·c²", cfg.exact_seeds)):
            df = probed(run_cfg, lambda acfg, data: LossRecorder(), arms=[arm], seeds=seeds)
            frames.append(df.assign(kind=df.pop("record").map({"history": "history", "loss": "steps"}),
                                    lr=cfg.train.lr, c=c))
        frames.append(tuned(at, arms=["plain"]).assign(c=c))
    return pd.concat(frames, ignore_index=True)


def trajectory_gap(df: pd.DataFrame, arm: str, c: float, reference: float = 1.0) -> pd.DataFrame:
    """Per seed: max over steps of |loss(c) − loss(reference)| of the per-step mini-batch
    losses of ``arm`` (same seed, same batches), and the same relative to the loss."""
    d = rows(df, "steps")
    d = d[d["arm"] == arm]
    if d.empty:
        raise ValueError(f"no per-step rows for arm {arm!r}")
    a = d[d["c"] == c].set_index(["seed", "step"])["loss"]
    b = d[d["c"] == reference].set_index(["seed", "step"])["loss"]
    if a.empty or b.empty:
        raise ValueError(f"scale {c} or reference {reference} is missing for arm {arm!r}")
    gap = (a - b).abs()
    out = pd.DataFrame({"max_abs_gap": gap.groupby("seed").max(),
                        "max_rel_gap": (gap / b.abs()).groupby("seed").max(),
                        "steps_compared": gap.groupby("seed").count()}).reset_index()
    return out.assign(arm=arm, c=c)


def final_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """One row per reported (arm, c, lr, seed) of an ``input_scale_train`` result: the final
    ``val_acc`` and ``test_acc`` (0 for a diverged run, never a stale number) and ``diverged``."""
    h = rows(df, "history")
    keys = ["arm", "c", "lr", "seed"]
    val, test = (analysis.final(h, split=s, keys=keys) for s in ("val", "test"))
    out = val[keys + ["diverged"]].assign(val_acc=val["accuracy"].fillna(0.0),
                                          test_acc=test["accuracy"].fillna(0.0).to_numpy())
    return out


def plot_trajectories(df: pd.DataFrame, axes=None, seed: int | None = None):
    """Left: BN's per-step training loss on ``c·x`` for every ``c`` (one seed). Right:
    |loss(c) − loss(1)| per step for BN and for BN with ε·c² (log scale; exact zeros are
    drawn at the bottom of the axis)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from .. import plots
    steps = rows(df, "steps")
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
class ScaleTestConfig(Protocol):
    """Train BN and plain nets on ``x`` (c = 1), then evaluate on ``c·x_test`` for each ``c``
    in ``scales``: with running statistics, with the test batch's own statistics, and with
    statistics recomputed on ``c·x_train``."""

    data: str = "digits"
    model: MLPSpec = MLPSpec(depth=3, width=64)  # as in ScaleTrainConfig
    # enough for ~95 % test accuracy at c = 1; the same rate for both arms
    train: TrainSpec = TrainSpec(lr=0.1, momentum=0.9, steps=100, batch_size=64, eval_every=100,
                                 eval_splits=("val",))
    scales: tuple[float, ...] = (0.5, 1.0, 2.0, 10.0)  # test-input scales
    seeds: tuple[int, ...] = tuple(range(8))  # reported, paired seeds
    margin: float = 0.02                     # accuracy change (vs c = 1) small enough to call "unchanged"
    plain_margin: float = 0.05               # the same, for the plain net's "nearly flat"

    FULL = {"data": "fashion_mnist", "model.width": 256, "train.steps": 3000,
            "train.eval_every": 1000,
            "scales": (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)}


@register("input_scale_test", ScaleTestConfig, title="Evaluating on rescaled test inputs",
          chapter="10_scale_invariance", plot=lambda df: plot_scale_test(df))
def input_scale_test(cfg: ScaleTestConfig) -> pd.DataFrame:
    """One row per arm × seed × test scale × inference mode: ``c, mode, loss, accuracy,
    diverged, arm, seed``. A net without BN has one mode, ``eval mode (no BN)``."""
    _check_scales(cfg.scales)
    out = []
    for arm, seed, hist, net, data in trained(cfg):
        has_bn = bool(batchnorm_layers(net))
        for c in cfg.scales:
            test = rescaled(data, c, splits=("test",)).test
            modes = [("eval mode (no BN)", net, "running")]
            if has_bn:  # the whole test set is one batch for "batch" statistics
                recomputed = recompute_batchnorm_stats(copy.deepcopy(net), data.train.x * c)
                modes = [("running statistics", net, "running"), ("test-batch statistics", net, "batch"),
                         ("recomputed on c·x_train", recomputed, "running")]
            for mode, m, statistics in modes:
                loss, acc = evaluate(m, test, statistics=statistics, batch_size=len(test))
                out.append({"arm": arm, "seed": seed, "c": c, "mode": mode, "loss": loss,
                            "accuracy": acc, "diverged": bool(hist["diverged"].any())})
    return pd.DataFrame(out)


def plot_scale_test(df: pd.DataFrame, ax=None):
    """Test accuracy against the test-input scale, one line per arm and inference mode."""
    from .. import plots
    d = df.assign(setting=df["arm"] + ": " + df["mode"])
    ax = plots.draw_sweep(d, x="c", y="accuracy", hue="setting", ax=ax,
                          title="Test accuracy on c · x_test (trained on x)")
    cs = sorted(d["c"].unique())
    ax.set_xticks(cs, [f"{c:g}" for c in cs])
    ax.minorticks_off()
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set(xlabel="test input scale c", ylabel="test accuracy")
    return ax
