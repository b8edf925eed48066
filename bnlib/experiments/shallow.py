"""Chapter 14: does batch norm help shallow networks too (M2, F8)?

One experiment, ``shallow_nets``: a one-hidden-layer MLP plain (``"plain"``), with BN
(``"BN"``) and with standardised inputs but no BN (``"standardized input"``), on digits and
MNIST-1D; and logistic regression plain and with BN on its inputs, on digits. The learning rate is
tuned per arm, data set *and horizon* on the validation split with the tuning seeds: the
choice for the early horizon uses only what the tuning runs showed up to that step
(:func:`as_of`), never a divergence that happened later. The reported seeds then train at
each horizon's choice.

For logistic regression "with BN" means a batch norm on the input features followed by the
linear classifier (:class:`bnlib.models.LogRegSpec` with ``norm="batch"``): with no hidden
layer that is the only place a BN can go, the learned, batch-estimated version of
standardising the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .. import analysis
from ..config import override
from ..models import CNNSpec, LogRegSpec, MLPSpec
from ..protocol import Protocol, Tuning, rows, runs
from ..train import TrainSpec
from . import register


def _arms() -> dict[str, dict[str, Any]]:
    return {
        "plain": {"model.norm": "none"},
        "BN": {"model.norm": "batch"},
        "standardized input": {"preprocessing": "standardized"},
        "logreg": {"model": LogRegSpec()},
        "logreg + input BN": {"model": LogRegSpec(norm="batch")},
    }


@dataclass(frozen=True)
class ShallowConfig(Protocol):
    """One hidden layer and logistic regression: plain, with BN, with standardised inputs."""

    datasets: tuple[str, ...] = ("digits", "mnist1d")  # digits sits at its ceiling; MNIST-1D does not
    logreg_on: tuple[str, ...] = ("digits",)  # logistic regression runs one by one: one data set
    model: MLPSpec | CNNSpec | LogRegSpec = MLPSpec(depth=1, width=128)  # "shallow": one hidden layer
    # a few hundred steps, evaluated at the early horizon and every 50 steps after it (the choices
    # and verdicts read the evaluations at early_step and at the end only)
    train: TrainSpec = TrainSpec(momentum=0.9, steps=300, batch_size=64, eval_every=50)
    arms: dict[str, dict[str, Any]] = field(default_factory=_arms)
    tuning: Tuning = Tuning(grid=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0))  # wide enough that no choice is at an edge
    early_step: int = 50  # "speed": accuracy after the first few epochs' worth of steps
    margin: float = 0.01  # a test-accuracy difference under 1 point does not matter

    FULL = {"datasets": ("mnist1d", "fashion_mnist"), "model.width": 512, "train.steps": 5000,
            "train.eval_every": 250, "early_step": 250}


def as_of(df: pd.DataFrame, step: int) -> pd.DataFrame:
    """The runs as they stood at ``step``: rows up to ``step``, and ``diverged`` only for a run
    that had diverged by then (its last evaluation came before ``step``). A choice made at
    ``step`` from this table uses no information from later in training."""
    keys = [c for c in df.columns if c not in analysis.HISTORY_COLUMNS]
    last = df.groupby(keys, sort=False)["step"].transform("max")
    out = df[df["step"] <= step].copy()
    out["diverged"] = (df["diverged"].astype(bool) & (last < step)).loc[out.index]
    return out


def choices(tuning: pd.DataFrame, cfg: ShallowConfig) -> pd.DataFrame:
    """Each (data set, arm, horizon)'s learning rate, chosen on validation with the tuning seeds
    from the tuning runs as they stood at that horizon: columns ``data, arm, horizon, lr``."""
    out = []
    for horizon in (cfg.early_step, cfg.train.steps):
        pick = analysis.tune(as_of(tuning, horizon), "lr", by=("data", "arm"), seeds=cfg.tuning.seeds,
                             report_seeds=cfg.seeds, allow_edge=cfg.tuning.allow_edge)
        out.append(pick[["data", "arm", "lr", "at_edge"]].assign(horizon=horizon))
    return pd.concat(out, ignore_index=True)


def reported(df: pd.DataFrame, cfg: ShallowConfig, horizon: int) -> pd.DataFrame:
    """One row per (data set, arm, reported seed) at ``horizon``, each run at its arm's choice
    for that horizon: ``data, arm, seed, lr, accuracy_val, accuracy_test``."""
    pick = choices(rows(df, "tuning"), cfg)
    pick = pick[pick["horizon"] == horizon]
    hist = as_of(rows(df, "history"), horizon).merge(pick[["data", "arm", "lr"]])
    out = []
    for split in ("val", "test"):
        f = analysis.final(hist, split=split, keys=["data", "arm", "seed", "lr"])
        out.append(f.set_index(["data", "arm", "seed", "lr"])["accuracy"].rename(f"accuracy_{split}"))
    return pd.concat(out, axis=1).reset_index()


def plot_shallow(df: pd.DataFrame):
    """Validation accuracy over steps, reported seeds, each arm at its final-horizon choice."""
    from ..plots import draw_curves, facets
    cfg = df.attrs.get("config") or ShallowConfig()
    pick = choices(rows(df, "tuning"), cfg)
    hist = rows(df, "history").merge(pick[pick["horizon"] == cfg.train.steps][["data", "arm", "lr"]])

    def draw(name, ax):
        draw_curves(hist[(hist["data"] == name) & (hist["step"] > 0)], split="val", ax=ax, title=name)
        ax.axvline(cfg.early_step, color="k", lw=0.8, ls=":")
        ax.set_ylabel("val accuracy")

    return facets(dict.fromkeys(hist["data"]), draw, width=5.5)


@register("shallow_nets", ShallowConfig, title="Shallow nets: BN vs standardised inputs",
          chapter="14_shallow", plot=plot_shallow)
def shallow_nets(cfg: ShallowConfig) -> pd.DataFrame:
    """Tuning runs (``kind="tuning"``: every arm × grid × tuning seed) and reported runs
    (``kind="history"``: the reported seeds at each horizon's choice), evaluated every
    ``train.eval_every`` steps on val and test; columns of :func:`bnlib.protocol.runs` plus
    ``data`` and ``lr``."""
    unknown = [a for a in cfg.arms if a not in _arms()]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(_arms())}")
    ev = cfg.train.eval_every
    if cfg.early_step % ev or cfg.train.steps % ev or not 0 < cfg.early_step < cfg.train.steps:
        raise ValueError("early_step and train.steps must be multiples of train.eval_every, "
                         "with 0 < early_step < train.steps")
    tuning = []
    for name in cfg.datasets:
        dcfg = override(cfg, {"data": name})
        arms = [a for a in cfg.arms if not a.startswith("logreg") or name in cfg.logreg_on]
        tuning.append(runs(dcfg, seeds=cfg.tuning.seeds, grid={"train.lr": cfg.tuning.grid},
                           arms=arms).assign(data=name, kind="tuning"))
    tuning = pd.concat(tuning, ignore_index=True)
    pick = choices(tuning, cfg)
    frames = [tuning]
    for (name, arm), lrs in pick.groupby(["data", "arm"], sort=False)["lr"]:
        frames.append(runs(override(cfg, {"data": name}), grid={"train.lr": tuple(sorted(set(lrs)))},
                           arms=[arm]).assign(data=name))
    return pd.concat(frames, ignore_index=True)
