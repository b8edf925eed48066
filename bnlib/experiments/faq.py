"""Chapter 18 (FAQ): the small measurements the FAQ page makes itself.

``bn_at_a_glance`` (F5, F9)
    Plain vs BN MLP on the protocol: each arm's learning rate tuned on validation with the
    tuning seeds, then 8 paired reported seeds at each arm's choice. The tuning sweep says
    at which rates each arm trains; the reported runs give the time to a validation target
    (censored, never inf) and the final test accuracy (a TOST with a declared margin).

``bn_hyperparameters`` (F6, the "extra hyperparameters" half)
    BN momentum × ε. Momentum never changes training (in training mode BN normalises with
    batch statistics and only *writes* the running averages), so one run per ε and seed
    trains the network while :class:`RunningStatsProbe` keeps, for every momentum, the running
    averages a BN with that momentum would have kept. Each momentum × ε is then evaluated with
    its own statistics and with precise statistics, and compared with PyTorch's default
    (momentum 0.1, ε 1e-5) by a paired TOST over the reported seeds.

:func:`momentum_conventions` shows numerically that PyTorch's ``momentum`` weighs the new
batch and Keras' the old running value, so Keras' default 0.99 is PyTorch's 0.01.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import analysis, cache
from .. import nn as bnn
from ..inference import evaluate, recompute_batchnorm_stats
from ..models import MLPSpec
from ..probes import Probe
from ..protocol import Protocol, Tuning, load_data, rows, train_spec, tuned
from ..train import TrainSpec, fit
from . import register

#: Keras ``BatchNormalization`` defaults (keras.io documentation): ``momentum`` is the
#: weight of the *old* moving value, ``moving = moving·momentum + batch·(1 − momentum)``.
KERAS_DEFAULTS = {"momentum": 0.99, "epsilon": 1e-3}


def torch_defaults() -> dict:
    """PyTorch's ``BatchNorm1d`` defaults, read from a fresh layer (weight of the *new* batch)."""
    bn = nn.BatchNorm1d(1)
    return {"momentum": bn.momentum, "eps": bn.eps}


def keras_update(moving: np.ndarray, batch_value: np.ndarray, momentum: float) -> np.ndarray:
    """One Keras moving-statistic update: ``moving·momentum + batch·(1 − momentum)``."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return moving * momentum + batch_value * (1.0 - momentum)


def half_life(weight_on_new: float) -> float:
    """Batches until a running statistic has forgotten half of its past:
    ``ln ½ / ln(1 − w)`` for weight ``w`` on the new batch (PyTorch's momentum)."""
    if not 0.0 < weight_on_new < 1.0:
        raise ValueError(f"the weight on the new batch must be in (0, 1), got {weight_on_new}")
    return math.log(0.5) / math.log(1.0 - weight_on_new)


@torch.no_grad()
def momentum_conventions(steps: int = 50, *, batch_size: int = 16, seed: int = 0) -> pd.DataFrame:
    """Feed the same batches (mean drifting from 0 to 2) to bnlib's and torch's
    ``BatchNorm1d(momentum=0.1)`` and apply Keras' rule with ``momentum=0.9`` and, the
    classic porting mistake, ``momentum=0.1``; plus PyTorch 0.01 vs Keras' default 0.99.

    Returns one row per step with each running mean: ``bnlib 0.1``, ``torch 0.1``,
    ``keras 0.9``, ``keras 0.1``, ``torch 0.01``, ``keras 0.99`` and the ``batch`` mean.
    """
    if steps < 1 or batch_size < 2:
        raise ValueError("steps must be ≥ 1 and batch_size ≥ 2")
    g = torch.Generator().manual_seed(seed)
    layers = {"bnlib 0.1": bnn.BatchNorm1d(1, momentum=0.1), "torch 0.1": nn.BatchNorm1d(1, momentum=0.1),
              "torch 0.01": nn.BatchNorm1d(1, momentum=0.01)}
    keras = {"keras 0.9": 0.9, "keras 0.1": 0.1, "keras 0.99": 0.99}
    moving = {k: np.zeros(1) for k in keras}   # Keras' moving_mean also starts at 0
    for layer in layers.values():
        layer.train()
    out = []
    for t in range(1, steps + 1):
        x = torch.randn(batch_size, 1, generator=g) + 2.0 * t / steps
        row = {"step": t, "batch": float(x.mean())}
        for name, layer in layers.items():
            layer(x)
            row[name] = float(layer.running_mean[0])
        for name, m in keras.items():
            moving[name] = keras_update(moving[name], x.mean(0).double().numpy(), m)
            row[name] = float(moving[name][0])
        out.append(row)
    return pd.DataFrame(out)


# --- F5, F9: plain vs BN at a glance -------------------------------------------------------

@dataclass(frozen=True)
class GlanceConfig(Protocol):
    """Plain vs BN MLP on digits (the protocol's arms and 8 seeds), each arm's learning rate
    tuned on validation."""

    model: MLPSpec = MLPSpec(depth=4, width=64)        # deep enough for BN to matter, small enough for CPU
    train: TrainSpec = TrainSpec(steps=150, batch_size=32, eval_every=10)  # a short run: speed shows early
    tuning: Tuning = Tuning(grid=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0))  # a decade-and-a-half each side of 0.1
    target: float = 0.9                                # validation accuracy both arms reach
    margin: float = 0.02                               # smallest test-accuracy difference that matters

    FULL = {"data": "fashion_mnist", "model.width": 256, "train.steps": 3000,
            "train.eval_every": 50, "target": 0.85}


@register("bn_at_a_glance", GlanceConfig, title="Plain vs BN, learning rate tuned per arm",
          chapter="18_faq", plot=lambda df: plot_glance(df))
def bn_at_a_glance(cfg: GlanceConfig) -> pd.DataFrame:
    """Tuning sweep (``kind="tuning"``) and reported runs at each arm's rate (``"history"``)."""
    if not 0 < cfg.target <= 1 or not cfg.margin > 0:
        raise ValueError(f"target must be in (0, 1] and margin > 0, got {cfg.target}, {cfg.margin}")
    return tuned(cfg)


def usable_rates(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per arm and learning rate of the tuning sweep: the fraction of tuning seeds that
    reached ``target`` validation accuracy (a diverged run did not) and the mean final
    validation accuracy; ``trains`` when every tuning seed reached the target."""
    sweep = rows(df, "tuning")
    ttt = analysis.time_to_target(sweep, target, keys=["arm", "lr", "seed"])
    ttt.loc[ttt["diverged"], "reached"] = False
    out = ttt.groupby(["arm", "lr"])["reached"].mean().rename("fraction_reached").reset_index()
    fin = analysis.final(sweep, split="val", keys=["arm", "lr", "seed"])
    out = out.merge(fin.groupby(["arm", "lr"])["accuracy"].mean().rename("val_acc").reset_index())
    return out.assign(trains=out["fraction_reached"].eq(1.0))


def plot_glance(df: pd.DataFrame, ax=None):
    """Validation accuracy against step for each arm at its tuned learning rate (mean ± sd)."""
    import matplotlib.pyplot as plt

    from .. import plots
    ax = ax or plt.gca()
    rep = rows(df, "history")
    rep = rep.assign(arm=rep["arm"] + " (lr " + rep["lr"].map(lambda v: f"{v:g}") + ")")
    pal = {a: plots.color(a.split(" (")[0]) for a in rep["arm"].unique()}
    plots.draw_curves(rep, split="val", ax=ax, palette=pal,
                      title="Validation accuracy at each arm's tuned learning rate")
    ax.set_ylim(0, 1)
    return ax.figure


# --- F6: momentum × ε -----------------------------------------------------------------------

class RunningStatsProbe(Probe):
    """Sets every BN's ε at the start, then keeps, for each of ``momenta``, the running mean
    and variance a BN with that momentum (PyTorch convention) would have: the same update
    ``r ← (1 − m)·r + m·batch`` from the same batch statistics (unbiased variance), starting
    at 0 and 1. Momentum does not change training, so one run serves every momentum."""

    def __init__(self, momenta, eps: float) -> None:
        self.momenta, self.eps, self.rows = tuple(momenta), eps, []
        self.stats: dict[float, list[list[torch.Tensor]]] = {}
        self._handles: list = []

    def on_train_start(self, model: nn.Module) -> None:
        layers = bnn.batchnorm_layers(model)
        if not layers:
            raise ValueError("RunningStatsProbe needs a model with batch norm")
        self.stats = {m: [[torch.zeros(bn.num_features, dtype=torch.float64),
                           torch.ones(bn.num_features, dtype=torch.float64)] for bn in layers]
                      for m in self.momenta}
        for i, bn in enumerate(layers):
            bn.eps = self.eps
            self._handles.append(bn.register_forward_pre_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(module, inputs):
            if not module.training:
                return
            h = inputs[0].detach().double()
            mean, var = h.mean(0), h.var(0, unbiased=True)
            for m, st in self.stats.items():
                st[i][0].mul_(1 - m).add_(mean, alpha=m)
                st[i][1].mul_(1 - m).add_(var, alpha=m)
        return hook

    def __call__(self, info) -> None:
        pass

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def load(self, model: nn.Module, momentum: float) -> None:
        """Copy momentum ``momentum``'s running statistics into the model's BN layers."""
        for bn, (mean, var) in zip(bnn.batchnorm_layers(model), self.stats[momentum]):
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(var.to(bn.running_var.dtype))


@dataclass(frozen=True)
class HyperConfig(Protocol):
    """BN momentum × ε on a short run of a BN MLP on digits, 8 paired seeds."""

    model: MLPSpec = MLPSpec(depth=3, width=64, norm="batch")
    train: TrainSpec = TrainSpec(lr=0.1, steps=150, batch_size=32, eval_every=150,
                                 eval_splits=("test",))  # short: a slow average has least time to catch up
    arms: dict = field(default_factory=lambda: {"BN": {}})
    momenta: tuple[float, ...] = (0.01, 0.1, 0.5)      # Keras' default, PyTorch's default, a fast one
    epsilons: tuple[float, ...] = (1e-5, 1e-3, 1e-1)   # PyTorch's, Keras' default, a large one
    reference: tuple[float, float] = (0.1, 1e-5)       # PyTorch's defaults: every setting is compared with it
    margin: float = 0.02                               # smallest test-accuracy difference that matters

    FULL = {"data": "fashion_mnist", "model.width": 256, "train.steps": 2000,
            "train.batch_size": 64, "train.eval_every": 2000,
            "momenta": (0.001, 0.01, 0.1, 0.5, 0.9), "epsilons": (1e-5, 1e-3, 1e-1, 1.0)}


@register("bn_hyperparameters", HyperConfig, title="BN momentum × ε after a short run",
          chapter="18_faq", plot=lambda df: plot_hyper(df))
def bn_hyperparameters(cfg: HyperConfig) -> pd.DataFrame:
    """One row per momentum × ε × seed: ``test_acc`` (running statistics of that momentum)
    and ``precise_test_acc`` (precise statistics of the same weights), ``diverged``."""
    if not cfg.momenta or any(not 0 < m <= 1 for m in cfg.momenta):
        raise ValueError(f"momenta must be non-empty and in (0, 1], got {cfg.momenta}")
    if not cfg.epsilons or any(not e > 0 for e in cfg.epsilons):
        raise ValueError(f"epsilons must be non-empty and positive, got {cfg.epsilons}")
    if cfg.model.norm != "batch":
        raise ValueError("bn_hyperparameters needs a batch-norm model (model.norm='batch')")
    data = load_data(cfg)
    spec = train_spec(cfg)

    def one(eps: float, seed: int) -> list[dict]:
        probe = RunningStatsProbe(cfg.momenta, eps)
        hist = fit(cfg.model, spec, data, seed, callbacks=[probe])
        probe.close()
        net, diverged = hist.attrs["model"], bool(hist["diverged"].any())
        test = data.to(next(net.parameters()).device).test
        precise = math.nan
        if not diverged:
            recompute_batchnorm_stats(net, data.to(next(net.parameters()).device).train.x)
            precise = evaluate(net, test)[1]
        out = []
        for m in cfg.momenta:
            acc = math.nan
            if not diverged:
                probe.load(net, m)
                acc = evaluate(net, test)[1]
            out.append(dict(momentum=m, eps=eps, seed=seed, test_acc=acc,
                            precise_test_acc=precise, diverged=diverged))
        return out

    out = [row for eps in cfg.epsilons for seed in cfg.seeds
           for row in cache.cell({"hyper": cfg, "eps": eps, "seed": seed}, lambda: one(eps, seed))]
    return pd.DataFrame(out).assign(kind="hyper")


def hyper_comparisons(df: pd.DataFrame, cfg: HyperConfig, value: str = "test_acc") -> dict:
    """Every momentum × ε against ``cfg.reference`` (paired by seed): better/worse/equivalent/
    inconclusive within ``cfg.margin``, Holm-adjusted over the family."""
    ref_m, ref_e = cfg.reference
    ref = df[(df["momentum"] == ref_m) & (df["eps"] == ref_e)].set_index("seed")[value]
    family = {}
    for (m, e), g in df.groupby(["momentum", "eps"]):
        if (m, e) == (ref_m, ref_e):
            continue
        g = g.set_index("seed")[value]
        family[f"momentum {m:g}, ε {e:g}"] = (g.to_numpy(float), ref.loc[g.index].to_numpy(float))
    return analysis.compare_family(family, margin=cfg.margin)


def plot_hyper(df: pd.DataFrame, axes=None):
    """Heatmaps of mean test accuracy (± sd over seeds) per momentum × ε: running statistics
    (left) and precise statistics (right)."""
    import seaborn as sns

    from .. import plots
    axes = plots.new_axes(2, width=5.2)[1][0] if axes is None else axes
    for ax, value, title in zip(axes, ("test_acc", "precise_test_acc"),
                                ("running statistics", "precise statistics")):
        mean = df.pivot_table(index="momentum", columns="eps", values=value, aggfunc="mean")
        sd = df.pivot_table(index="momentum", columns="eps", values=value, aggfunc="std")
        labels = mean.map(lambda v: f"{v:.3f}") + "\n± " + sd.map(lambda v: f"{v:.3f}")
        sns.heatmap(mean, annot=labels, fmt="", cmap="viridis", vmin=float(np.nanmin(mean.values)) - 0.01,
                    vmax=1.0, cbar_kws={"label": "test accuracy"}, ax=ax)
        ax.set_xticklabels([f"{e:g}" for e in mean.columns])
        ax.set(xlabel="ε", ylabel="momentum (PyTorch convention)", title=title)
    return axes[0].figure
