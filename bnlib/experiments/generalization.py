"""Chapter 5: does batch norm generalize better (T2, I3, I4, I8, K1's second half)? And its
second page (``05b_dropout_and_noise``): does it replace dropout (B3)?

Two experiments on the protocol (:mod:`bnlib.protocol`):

* ``generalization`` — plain vs BN MLPs on several data sets, the learning rate tuned per arm
  and data set on the validation split with the tuning seeds, then 8 reported seeds at the
  choice; train, val and test are evaluated every ``train.eval_every`` steps, so the
  train–test gap can be read at a *matched training accuracy* (:func:`matched_gap`) as well
  as at the end.
* ``generalization_controls`` — small training sets, batch norm × dropout as a factorial
  (``plain``, ``dropout``, ``BN``, ``BN + dropout``; the dropout rate tuned on validation at
  the base arm's tuned learning rate) plus two controls on BN's batch noise: full-batch BN
  (no sampling noise at all, and no gradient noise either) and ghost BN (statistics over
  virtual batches of 8: more normalisation noise, same batches and learning rate as BN).

Ghost batch normalisation (Hoffer et al. 2017) is ``MLPSpec(norm="ghost", ghost_size=...)``:
:class:`bnlib.nn.GhostBatchNorm`, which the stacked engine trains like every other arm here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import analysis
from ..config import override
from ..models import CNNSpec, MLPSpec
from ..protocol import Protocol, Tuning, load_data, rows, runs, tuned
from ..train import TrainSpec
from . import register

__all__ = ["GeneralizationConfig",
           "generalization", "ControlsConfig", "generalization_controls", "final_wide",
           "matched_gap", "plot_generalization", "plot_controls", "rows"]


# --- reading results ---------------------------------------------------------------------

def final_wide(df: pd.DataFrame, keys: Sequence[str] = ("data", "arm", "seed")) -> pd.DataFrame:
    """One row per reported run: the final ``accuracy_<split>`` and ``loss_<split>`` of every
    evaluated split side by side, the end-of-training ``gap`` (train − test accuracy) and
    ``diverged``; the tuned value columns (``lr``, ``dropout``) are kept."""
    hist = rows(df, "history") if "kind" in df else df
    keys = [k for k in (*keys, "lr", "dropout") if k in hist]
    out = None
    for split in [s for s in ("train", "val", "test") if s in set(hist["split"])]:
        for metric in ("accuracy", "loss"):
            f = analysis.final(hist, split=split, metric=metric, keys=keys)
            f = f.rename(columns={metric: f"{metric}_{split}"}).drop(columns="step")
            out = f if out is None else out.merge(f, on=keys + ["diverged"])
    if "accuracy_train" in out and "accuracy_test" in out:
        out["gap"] = out["accuracy_train"] - out["accuracy_test"]
    return out


def matched_gap(df: pd.DataFrame, target: float, *, keys: Sequence[str] = ("data", "arm", "seed")
                ) -> pd.DataFrame:
    """Each reported run at the moment its *training* accuracy first reached ``target``
    (interpolated between evaluations): ``step``, the test accuracy then and the gap
    ``target − test accuracy``. Runs that never reached it get ``reached=False`` and NaN:
    choose a target every run reaches (e.g. the smallest best training accuracy)."""
    hist = rows(df, "history") if "kind" in df else df
    keys = [k for k in keys if k in hist]
    ttt = analysis.time_to_target(hist, target, split="train", keys=keys)
    out = []
    for _, r in ttt.iterrows():
        mask = np.logical_and.reduce([hist[k] == r[k] for k in keys]) & (hist["split"] == "test")
        test = hist[mask].sort_values("step")
        acc = (float(np.interp(r["time"], test["step"], test["accuracy"])) if r["reached"]
               else np.nan)
        out.append({**{k: r[k] for k in keys}, "step": r["time"], "reached": bool(r["reached"]),
                    "accuracy_test": acc, "gap": target - acc})
    return pd.DataFrame(out)


def _tuned(cfg: Protocol, arms: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`bnlib.protocol.tuned` whose tuning runs evaluate only what the "final"
    objective reads: the validation split, at the end of training."""
    return tuned(cfg, arms=arms, tuning_overrides={"train.eval_splits": ("val",),
                                                   "train.eval_every": cfg.train.steps})


# --- experiment 1: plain vs BN across data sets ---------------------------------------------

@dataclass(frozen=True)
class GeneralizationConfig(Protocol):
    """Plain vs BN MLPs on several data sets, LR tuned per arm and data set on validation."""

    datasets: tuple[str, ...] = ("digits", "mnist1d", "breast_cancer", "gaussian_mixture")  # MNIST-1D: far from its ceiling
    model: MLPSpec | CNNSpec = MLPSpec(depth=2, width=128)  # small: sequential runs stay affordable
    # reported runs: train and test every 20 steps (the gap at a matched training accuracy);
    # the tuning runs read the validation split at the end only
    train: TrainSpec = TrainSpec(momentum=0.9, steps=200, batch_size=64, eval_every=20,
                                 eval_splits=("train", "test"))
    # no choice at an edge (pilot: every choice in 0.01-0.3); two tuning seeds (disjoint from
    # the reported ones) keep the chapter within its time budget
    tuning: Tuning = Tuning(grid=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), seeds=(1000, 1001))
    margin: float = 0.01  # a test-accuracy difference under 1 point does not matter
    loss_margin: float = 0.03  # a cross-entropy difference under 0.03 nats does not matter

    FULL = {"datasets": ("mnist1d", "fashion_mnist", "cifar10", "digits"),
            "model.depth": 4, "model.width": 512, "train.steps": 5000,
            "train.eval_every": 250, "train.batch_size": 128}


def plot_generalization(df: pd.DataFrame, ax=None):
    """Test accuracy per data set and arm at the tuned learning rates: mean ± sd over the
    reported seeds (large markers) and the individual seeds (dots)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from ..plots import _palette
    table = final_wide(df)
    ax = ax or plt.gca()
    pal = _palette(table["arm"])
    sns.pointplot(data=table, x="data", y="accuracy_test", hue="arm", errorbar=("sd", 1),
                  dodge=0.3, linestyle="none", palette=pal, ax=ax)
    sns.stripplot(data=table, x="data", y="accuracy_test", hue="arm", dodge=True, alpha=0.4,
                  palette=pal, legend=False, ax=ax)
    ax.set_ylabel("test accuracy (tuned LR)")
    return ax


@register("generalization", GeneralizationConfig, title="Plain vs BN: accuracy and loss across data sets",
          chapter="05_generalization", plot=plot_generalization)
def generalization(cfg: GeneralizationConfig) -> pd.DataFrame:
    """:func:`bnlib.protocol.tuned` on every data set: tuning runs (``kind="tuning"``) and the
    reported seeds at each arm's choice (``kind="history"``), with a ``data`` column."""
    if not cfg.datasets:
        raise ValueError("give at least one data set")
    return pd.concat([_tuned(override(cfg, {"data": name})).assign(data=name)
                      for name in cfg.datasets], ignore_index=True)


# --- experiment 2: BN × dropout, and where a regularising effect could come from ----------

def _control_arms() -> dict[str, dict[str, Any]]:
    return {"plain": {"model.norm": "none"}, "BN": {"model.norm": "batch"},
            "BN, full batch": {"model.norm": "batch", "train.batch_size": 0},  # 0: the whole split
            "dropout": {"model.norm": "none"}, "BN + dropout": {"model.norm": "batch"},
            "ghost BN": {"model.norm": "ghost"}}


@dataclass(frozen=True)
class ControlsConfig(Protocol):
    """Small training sets: BN × dropout, full-batch BN and ghost BN."""

    datasets: tuple[str, ...] = ("digits", "mnist1d")  # digits as before; MNIST-1D is far from its ceiling
    n_train: int | None = 300  # little data: room for a regulariser to matter
    # every arm trains stacked (bnlib.stacked: dropout and ghost BN included)
    model: MLPSpec | CNNSpec = MLPSpec(depth=2, width=128)
    train: TrainSpec = TrainSpec(momentum=0.9, steps=200, batch_size=64, eval_every=200,
                                 eval_splits=("train", "test"))
    arms: dict[str, dict[str, Any]] = field(default_factory=_control_arms)
    # the learning rate (pilot: every choice in 0.03-0.3); one tuning seed, also for the
    # dropout rate (time budget)
    tuning: Tuning = Tuning(grid=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), seeds=(1000,))
    dropout_grid: tuple[float, ...] = (0.1, 0.3, 0.5)  # tuned per dropout arm; 0.5 is the usual ceiling
    ghost_batch: int = 8  # virtual batch: 8 ghost batches per batch of 64
    margin: float = 0.01  # a test-accuracy difference under 1 point does not matter

    FULL = {"datasets": ("mnist1d", "fashion_mnist"), "n_train": 2000,
            "model.depth": 4, "model.width": 512, "train.steps": 3000,
            "train.eval_every": 3000}


def plot_controls(df: pd.DataFrame):
    """Test accuracy and train–test gap per arm and data set, reported seeds."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    table = final_wide(df)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for ax, col, label in zip(axes, ["accuracy_test", "gap"], ["test accuracy", "train − test accuracy"]):
        sns.pointplot(data=table, y="arm", x=col, hue="data", errorbar=("sd", 1), linestyle="none",
                      dodge=0.4, ax=ax)
        ax.set_xlabel(label)
        ax.set_ylabel("")
    return fig


@register("generalization_controls", ControlsConfig,
          title="Small data: BN × dropout, full-batch BN and ghost BN",
          chapter="05b_dropout_and_noise", plot=plot_controls)
def generalization_controls(cfg: ControlsConfig) -> pd.DataFrame:
    """Per data set: the learning rate tuned for ``plain``, ``BN`` and ``BN, full batch``;
    ``dropout`` and ``BN + dropout`` at their base arm's learning rate with the dropout rate
    tuned (column ``dropout``); ``ghost BN`` at BN's learning rate. All tuning on validation
    with the tuning seeds; reported seeds at the choices."""
    unknown = [a for a in cfg.arms if a not in _control_arms()]
    if unknown:
        raise ValueError(f"unknown control arms {unknown}; choose from {list(_control_arms())}")
    if cfg.ghost_batch >= cfg.train.batch_size:
        raise ValueError(f"ghost_batch ({cfg.ghost_batch}) must be smaller than train.batch_size "
                         f"({cfg.train.batch_size}) to add normalisation noise")
    if not isinstance(cfg.model, MLPSpec):
        raise ValueError("generalization_controls needs an MLPSpec model")
    frames = []
    for name in cfg.datasets:
        n = len(load_data(override(cfg, {"data": name})).train)
        arms = {a: dict(cfg.arms[a]) for a in cfg.arms}
        if "BN, full batch" in arms:
            arms["BN, full batch"]["train.batch_size"] = n
        if "ghost BN" in arms:
            arms["ghost BN"] = {"model.norm": "ghost", "model.ghost_size": cfg.ghost_batch}
        dcfg = dataclasses.replace(override(cfg, {"data": name}), arms=arms)
        lr_arms = [a for a in ("plain", "BN", "BN, full batch") if a in arms]
        base = _tuned(dcfg, arms=lr_arms)
        frames.append(base.assign(data=name))
        rep = rows(base, "history")
        lr = rep.groupby("arm")["lr"].first()
        for arm, of in (("dropout", "plain"), ("BN + dropout", "BN")):
            if arm in arms:
                t = Tuning(param="model.dropout", grid=cfg.dropout_grid, seeds=cfg.tuning.seeds,
                           allow_edge=True)
                dc = dataclasses.replace(override(dcfg, {"train.lr": float(lr[of])}), tuning=t)
                frames.append(_tuned(dc, arms=[arm]).assign(data=name, lr=float(lr[of])))
        if "ghost BN" in arms:
            frames.append(runs(override(dcfg, {"train.lr": float(lr["BN"])}), arms=["ghost BN"])
                          .assign(data=name, lr=float(lr["BN"])))
    return pd.concat(frames, ignore_index=True)
