"""Chapter 7: does batch norm allow higher learning rates, and does that speed training up?

One experiment, ``lr_sweep``: a plain and a batch-normalised MLP over a log-grid of
learning rates (SGD with momentum), on the reported seeds (``kind="history"``) and on
disjoint tuning seeds (``kind="tuning"``) that choose each arm's fastest rate. A few runs
also record, through :class:`bnlib.probes.WeightNormTracker`, how the hidden weight norms
grow (``kind="weights"``): a weight matrix followed by BN is scale invariant, so its
gradient is orthogonal to it, plain SGD can only grow ``‖W‖`` and the angular step
``η/‖W‖²`` falls (Ioffe & Szegedy 2015 §3.3; van Laarhoven 2017; Arora et al. 2019).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import analysis, cache
from ..models import MLPSpec
from ..protocol import (
    HiddenWeightNorms,
    Protocol,
    Tuning,
    arm_config,
    load_data,
    rows,
    runs,
)
from ..train import TrainSpec, fit
from . import register

KEYS = ["arm", "lr", "seed"]


@dataclass(frozen=True)
class LRConfig(Protocol):
    """A plain and a BN MLP over a log-grid of learning rates; the quick preset."""

    # 6 layers: deep enough that plain SGD blows up at large rates, small enough for the budget
    model: MLPSpec = MLPSpec(depth=6, width=64)
    train: TrainSpec = TrainSpec(momentum=0.9, steps=120, batch_size=64, eval_every=10,
                                 eval_splits=("val", "test"))  # a short fixed budget, SGD + momentum
    # the sweep grid is the tuning grid (three decades); tuning picks each arm's fastest rate
    # (restricted mean steps to the target) on two seeds disjoint from the reported ones
    tuning: Tuning = Tuning(grid=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0), seeds=(1000, 1001),
                            objective="speed", target=0.9)
    track_lrs: tuple[float, ...] = (0.1, 1.0, 3.0)  # rates whose weight norms are tracked
    track_seeds: tuple[int, ...] = (0, 1)  # the mechanism is deterministic enough for two

    FULL = {"data": "fashion_mnist", "model.depth": 8, "model.width": 256, "train.steps": 3000,
            "train.eval_every": 50,
            "tuning.grid": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)}


def _weights(cfg: LRConfig) -> pd.DataFrame:
    def one(acfg: LRConfig, arm: str, lr: float, seed: int) -> pd.DataFrame:
        probe = HiddenWeightNorms(every=cfg.train.eval_every)
        fit(acfg.model, dataclasses.replace(acfg.train, lr=lr), load_data(acfg), seed, callbacks=[probe])
        s = probe.tracker.summary()
        return s.assign(eff_lr=lr / s["w_ratio"] ** 2, arm=arm, lr=lr, seed=seed)

    frames = [cache.cell({"weights": acfg, "lr": lr, "seed": seed}, lambda: one(acfg, arm, lr, seed))
              for arm, acfg in ((a, arm_config(cfg, a)) for a in cfg.arms)
              for lr in cfg.track_lrs for seed in cfg.track_seeds]
    return pd.concat(frames, ignore_index=True).assign(kind="weights")


@register("lr_sweep", LRConfig, title="Accuracy, speed and weight growth against the learning rate",
          chapter="07_learning_rates", plot=lambda df: plot(df))
def lr_sweep(cfg: LRConfig) -> pd.DataFrame:
    """Histories of every arm × rate × seed (``kind`` ``"history"`` for the reported seeds,
    ``"tuning"`` for the tuning seeds) and the tracked weight norms (``kind="weights"``:
    ``step, w_ratio, eff_lr, cos_wg, arm, lr, seed``)."""
    t = cfg.tuning
    if set(t.seeds) & set(cfg.seeds):
        raise ValueError(f"tuning seeds {t.seeds} overlap the reported seeds {cfg.seeds}")
    sweep = runs(cfg, seeds=tuple(cfg.seeds) + tuple(t.seeds), grid={"train.lr": t.grid})
    sweep.loc[sweep["seed"].isin(t.seeds), "kind"] = "tuning"
    return pd.concat([sweep, _weights(cfg)], ignore_index=True)


def final_accuracy(df: pd.DataFrame, split: str = "val") -> pd.DataFrame:
    """One row per (arm, lr, seed) of the reported runs: final accuracy (NaN if diverged)."""
    return analysis.final(rows(df), split=split, keys=KEYS)


def largest_usable(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per (arm, seed): the largest rate whose final validation accuracy reaches ``target``
    (a diverged run never does); NaN when no rate does."""
    f = final_accuracy(df)
    ok = f[f["accuracy"] >= target]
    out = ok.groupby(["arm", "seed"])["lr"].max().unstack("arm")
    return out.reindex(sorted(f["seed"].unique()))


def times(df: pd.DataFrame, target: float, kind: str = "history") -> pd.DataFrame:
    """Censored steps to ``target`` validation accuracy per (arm, lr, seed): ``time`` (NaN
    when not reached), ``reached``, ``budget`` (the planned number of steps) and ``steps``
    (:func:`bnlib.analysis.censored_times`)."""
    return analysis.censored_times(rows(df, kind), target, keys=KEYS)


def observed(ttt: pd.DataFrame) -> pd.DataFrame:
    """``ttt`` with ``steps``: the time to target, or the budget where the run never
    arrived (a lower bound: it favours the run that did not arrive)."""
    return ttt.assign(steps=np.where(ttt["reached"], ttt["time"], ttt["budget"]))


def choose(df: pd.DataFrame, cfg: LRConfig) -> pd.DataFrame:
    """Each arm's fastest rate on the tuning seeds (restricted mean steps to the target),
    never at the edge of the grid."""
    t = cfg.tuning
    return analysis.tune(rows(df, "tuning"), param="lr", objective=t.objective, target=t.target,
                         seeds=t.seeds, report_seeds=cfg.seeds, allow_edge=t.allow_edge)


def plot(df: pd.DataFrame):
    """Final validation accuracy (left) and restricted mean steps to the target (right)
    against the learning rate."""
    from .. import plots
    cfg = df.attrs.get("config", LRConfig())
    fig, axes = plots.new_axes(ncols=2, width=5.2)
    f = final_accuracy(df)
    plots.draw_sweep(f, x="lr", y="accuracy", ax=axes[0][0], title="Final validation accuracy")
    s = analysis.survival_summary(times(df, cfg.tuning.target), by=["arm", "lr"])
    plots.draw_sweep(s.assign(diverged=False), x="lr", y="restricted_mean", ax=axes[0][1],
                     errorbar=None, title=f"Mean steps to {cfg.tuning.target:.0%} (capped at the budget)")
    for ax in axes[0]:
        ax.set_xlabel("learning rate")
    return fig
