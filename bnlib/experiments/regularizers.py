"""Chapter 15: does batch norm replace dropout and weight decay, or combine with them (M3, F10)?

Four experiments:

* ``dropout_variance_shift`` — dropout before the batch norms vs after the last one: the
  *variance shift* (Li et al. 2019) measured directly as the ratio of the inference-time
  variance of the last BN's input to that BN's running variance (median over units), and
  what recomputing the BN statistics does, with dropout left on (the naive way) and off.
* ``wd_weight_scaling`` — an exact check, no training loop: scale the weight of a layer
  that feeds a BN by 10 and the loss stays put, the gradient shrinks 10× and is orthogonal
  to the weight; scale the classifier (no BN after it) and the loss moves.
* ``weight_decay_bn`` — BN nets trained with weight decay 0, 5e-4, 5e-3: the norm of the
  BN'd weights and the effective learning rate ``lr / ‖W‖²`` along training.
* ``regularizer_grid`` — BN × dropout × weight decay on a small training set, learning
  rate tuned per arm on the validation split.

Helpers: :func:`variance_ratio`, :func:`dropout_disabled` and
:func:`recompute_stats_without_dropout`, :func:`weight_scaling_check`, :class:`WeightNormTracker`.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data as datasets
from ..inference import recompute_batchnorm_stats
from ..models import Net, mlp
from ..probes import capture, frozen_batchnorm_buffers
from ..train import evaluate, seeded, train
from . import Config, register, sweep

__all__ = ["variance_ratio", "dropout_disabled", "recompute_stats_without_dropout",
           "VarianceShiftConfig", "dropout_variance_shift", "weight_scaling_check",
           "ScalingConfig", "wd_weight_scaling", "WeightNormTracker", "WeightDecayConfig",
           "weight_decay_bn", "GridConfig", "regularizer_grid"]


# --- variance shift ---------------------------------------------------------------------

@torch.no_grad()
def variance_ratio(model: Net, x: Tensor, bn: nn.Module | None = None) -> float:
    """Median over units of ``Var_eval(input of bn) / bn.running_var``.

    The model runs in eval mode (dropout off, BNs on their running statistics) on ``x``;
    the variance of each unit of ``bn``'s input over ``x`` is compared with the variance
    that ``bn`` will divide by. 1 means the statistics match what the layer sees at
    inference; below 1, the layer's outputs are shrunk at inference. ``bn`` defaults to
    the last block's norm.
    """
    bn = bn if bn is not None else model.blocks[-1].norm
    if getattr(bn, "running_var", None) is None:
        raise ValueError("bn must be a batch-norm layer with running statistics")
    if len(x) < 2:
        raise ValueError("need at least 2 examples to measure a variance")
    was = model.training
    model.eval()
    with capture({"bn": bn}) as seen:
        model(x)
    model.train(was)
    var = seen["bn"].float().var(0, unbiased=True)
    return float((var / bn.running_var).median())


@contextlib.contextmanager
def dropout_disabled(model: nn.Module):
    """Inside this block every dropout layer of ``model`` is the identity, even in training
    mode (its probability is set to 0, then restored)."""
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    saved = [m.p for m in drops]
    try:
        for m in drops:
            m.p = 0.0
        yield model
    finally:
        for m, p in zip(drops, saved):
            m.p = p


def recompute_stats_without_dropout(model: nn.Module, x: Tensor, **kwargs) -> nn.Module:
    """:func:`bnlib.inference.recompute_batchnorm_stats` with dropout switched off.

    ``recompute_batchnorm_stats`` runs its passes in training mode, which also switches
    every dropout layer *on*: the recomputed statistics would again describe the noisy
    training-time activations. Wrapping it in :func:`dropout_disabled` makes the passes
    see the activations the network will see at inference (Li et al. 2019's remedy).
    """
    with dropout_disabled(model):
        return recompute_batchnorm_stats(model, x, **kwargs)


@dataclass(frozen=True)
class VarianceShiftConfig(Config):
    """A BN MLP with dropout ``p`` nowhere, before every BN'd layer, or only after the last BN."""

    dataset: str = "digits"
    p: float = 0.5
    depth: int = 3
    width: int = 128
    steps: int = 300
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 64

    @classmethod
    def full(cls) -> "VarianceShiftConfig":
        return cls(dataset="fashion_mnist", depth=6, width=512, steps=5000, seeds=(0, 1, 2, 3, 4))


PLACEMENTS = {"no dropout": dict(dropout=0.0), "dropout before BN": dict(dropout_at="blocks"),
              "dropout after last BN": dict(dropout_at="head")}


def _variance_shift_run(*, seed: int, data: datasets.Dataset, cfg: VarianceShiftConfig,
                        dropout: float | None = None, dropout_at: str = "blocks") -> pd.DataFrame:
    p = cfg.p if dropout is None else dropout
    net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, depth=cfg.depth,
                                   width=cfg.width, norm="batch", dropout=p, dropout_at=dropout_at))
    hist = train(net, data, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                 momentum=cfg.momentum, seed=seed, eval_every=cfg.steps, eval_splits=("test",),
                 device=cfg.device)
    dev = next(net.parameters()).device
    x_train = data.train.x.to(dev)
    test = data.test.to(dev)
    rows = []
    naive = copy.deepcopy(net)
    torch.manual_seed(seed)  # the dropout masks of the naive recomputation
    recompute_batchnorm_stats(naive, x_train)
    fixed = recompute_stats_without_dropout(copy.deepcopy(net), x_train)
    for stats, model in (("running (as trained)", net), ("recomputed, dropout on", naive),
                         ("recomputed, dropout off", fixed)):
        loss, acc = evaluate(model, test)
        rows.append(dict(stats=stats, variance_ratio=variance_ratio(model, x_train),
                         test_accuracy=acc, test_loss=loss, diverged=bool(hist["diverged"].any())))
    return pd.DataFrame(rows)


def plot_variance_shift(df: pd.DataFrame):
    """The variance ratio at the last BN per dropout placement and statistics."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    ax = plt.gca()
    sns.barplot(data=df, x="arm", y="variance_ratio", hue="stats", errorbar=("sd", 1), ax=ax)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_ylabel("Var_eval(input) / running var\n(last BN, median over units)")
    ax.set_xlabel("")
    ax.legend(title="BN statistics", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    return ax


@register("dropout_variance_shift", VarianceShiftConfig, title="Dropout before BN: the variance shift",
          chapter="15_regularizers", plot=plot_variance_shift)
def dropout_variance_shift(cfg: VarianceShiftConfig) -> pd.DataFrame:
    """One row per placement × seed × statistics: ``variance_ratio, test_accuracy, test_loss``."""
    if not 0.0 < cfg.p < 1.0:
        raise ValueError(f"dropout p must be in (0, 1), got {cfg.p}")
    if cfg.depth < 2:
        raise ValueError("dropout before a BN needs depth ≥ 2 (the first layer gets no dropout)")
    ds = datasets.load(cfg.dataset)
    return sweep(_variance_shift_run, arms=PLACEMENTS, seeds=cfg.seeds, common=dict(data=ds, cfg=cfg),
                 desc="variance shift")


# --- weight decay on BN'd weights: the exact part ---------------------------------------

def weight_scaling_check(model: Net, x: Tensor, y: Tensor, layer: nn.Module,
                         factor: float = 10.0) -> dict:
    """Loss and gradient of ``layer.weight`` before and after multiplying it by ``factor``.

    Training mode (batch statistics, as during a training step), BN running statistics
    and the weight restored afterwards. For a weight followed by a BN the loss is
    unchanged (up to BN's ε), the gradient is ``factor`` times smaller and orthogonal to
    the weight; returns ``loss, loss_scaled, grad_norm, grad_norm_scaled, grad_ratio``
    (``grad_norm / grad_norm_scaled``) and ``cos_w_grad`` (cosine between weight and
    gradient, before scaling).
    """
    if not (factor > 0 and np.isfinite(factor)):
        raise ValueError(f"factor must be a positive finite number, got {factor}")
    w = layer.weight
    original = w.detach().clone()
    was = model.training
    model.train()
    out = {}
    try:
        with frozen_batchnorm_buffers(model), dropout_disabled(model):
            for tag, scale in (("", 1.0), ("_scaled", factor)):
                with torch.no_grad():
                    w.copy_(original * scale)
                loss = F.cross_entropy(model(x), y)
                (g,) = torch.autograd.grad(loss, [w])
                out["loss" + tag] = loss.item()
                out["grad_norm" + tag] = g.norm().item()
                if not tag:
                    out["cos_w_grad"] = float(F.cosine_similarity(original.flatten(), g.flatten(), dim=0))
    finally:
        with torch.no_grad():
            w.copy_(original)
        model.train(was)
    out["grad_ratio"] = out["grad_norm"] / out["grad_norm_scaled"]
    out["weight_norm"] = w.detach().norm().item()
    return out


@dataclass(frozen=True)
class ScalingConfig(Config):
    """Briefly train a BN MLP, then scale one hidden weight (BN follows) and the classifier."""

    dataset: str = "digits"
    depth: int = 3
    width: int = 128
    steps: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    factor: float = 10.0
    probe_batch: int = 256

    @classmethod
    def full(cls) -> "ScalingConfig":
        return cls(depth=6, width=512, steps=1000, factor=100.0, seeds=(0, 1, 2, 3, 4))


def _scaling_run(*, seed: int, data: datasets.Dataset, cfg: ScalingConfig) -> pd.DataFrame:
    net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, depth=cfg.depth,
                                   width=cfg.width, norm="batch"))
    if cfg.steps:
        train(net, data, steps=cfg.steps, lr=cfg.lr, momentum=cfg.momentum, seed=seed,
              eval_every=cfg.steps, eval_splits=(), device=cfg.device)
    dev = next(net.parameters()).device
    x, y = data.train.x[:cfg.probe_batch].to(dev), data.train.y[:cfg.probe_batch].to(dev)
    mid = len(net.blocks) // 2
    rows = [dict(layer=f"hidden layer {mid + 1} (BN follows)",
                 **weight_scaling_check(net, x, y, net.blocks[mid].layer, cfg.factor)),
            dict(layer="classifier (no BN follows)",
                 **weight_scaling_check(net, x, y, net.head, cfg.factor))]
    return pd.DataFrame(rows).assign(factor=cfg.factor)


@register("wd_weight_scaling", ScalingConfig, title="Scaling a BN'd weight: same loss, smaller gradient",
          chapter="15_regularizers")
def wd_weight_scaling(cfg: ScalingConfig) -> pd.DataFrame:
    """One row per seed × layer: loss before/after scaling, gradient norms and their ratio,
    cosine(weight, gradient)."""
    if cfg.depth < 2:
        raise ValueError("need depth ≥ 2 so that a hidden layer is followed by a BN")
    return sweep(_scaling_run, seeds=cfg.seeds, common=dict(data=datasets.load(cfg.dataset), cfg=cfg),
                 desc="scaling")


# --- weight decay on BN'd weights: the effective learning rate ---------------------------

class WeightNormTracker:
    """Training callback: every ``every`` steps, ‖W‖ of each hidden layer of a :class:`Net`
    and the effective learning rate ``lr / ‖W‖²`` that a scale-invariant weight sees."""

    def __init__(self, every: int = 25) -> None:
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        self.every = every
        self.rows: list[dict] = []

    def _record(self, step: int, model: Net, lr: float) -> None:
        for i, block in enumerate(model.blocks):
            norm = block.layer.weight.detach().norm().item()
            self.rows.append(dict(step=step, layer=i + 1, weight_norm=norm, effective_lr=lr / norm ** 2))

    def __call__(self, info) -> None:
        lr = info.optimizer.param_groups[0]["lr"]
        if info.step == 1:
            self._record(0, info.model, lr)  # (after the first step; close to the init)
        if info.step % self.every == 0:
            self._record(info.step, info.model, lr)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


@dataclass(frozen=True)
class WeightDecayConfig(Config):
    """A BN MLP trained with several weight decays; norms tracked along the way."""

    dataset: str = "digits"
    weight_decays: tuple[float, ...] = (0.0, 5e-4, 5e-3)
    depth: int = 2
    width: int = 128
    steps: int = 400
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 64
    every: int = 25

    @classmethod
    def full(cls) -> "WeightDecayConfig":
        return cls(dataset="fashion_mnist", depth=4, width=512, steps=10000, every=250,
                   seeds=(0, 1, 2, 3, 4))


def _weight_decay_run(*, seed: int, data: datasets.Dataset, cfg: WeightDecayConfig,
                      weight_decay: float) -> pd.DataFrame:
    net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, depth=cfg.depth,
                                   width=cfg.width, norm="batch"))
    tracker = WeightNormTracker(cfg.every)
    hist = train(net, data, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                 momentum=cfg.momentum, weight_decay=weight_decay, seed=seed,
                 eval_every=cfg.steps, eval_splits=("val", "test"), callbacks=[tracker],
                 device=cfg.device)
    last = hist[hist["step"] == hist["step"].max()].set_index("split")
    return tracker.frame().assign(
        val_accuracy=last["accuracy"].get("val", np.nan), test_accuracy=last["accuracy"].get("test", np.nan),
        test_loss=last["loss"].get("test", np.nan), diverged=bool(hist["diverged"].any()))


def plot_weight_decay(df: pd.DataFrame):
    """‖W‖ and lr/‖W‖² of the last hidden layer along training, one line per weight decay."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    d = df[df["layer"] == df["layer"].max()].assign(wd=lambda t: t["weight_decay"].map(lambda v: f"{v:g}"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    sns.lineplot(data=d, x="step", y="weight_norm", hue="wd", errorbar=("sd", 1), ax=axes[0])
    sns.lineplot(data=d, x="step", y="effective_lr", hue="wd", errorbar=("sd", 1), ax=axes[1])
    axes[0].set_ylabel("‖W‖ (last hidden layer)")
    axes[1].set_ylabel("effective LR  lr / ‖W‖²")
    axes[1].set_yscale("log")
    return fig


@register("weight_decay_bn", WeightDecayConfig, title="Weight decay on BN'd weights: the effective LR",
          chapter="15_regularizers", plot=plot_weight_decay)
def weight_decay_bn(cfg: WeightDecayConfig) -> pd.DataFrame:
    """Rows ``step, layer, weight_norm, effective_lr`` per weight decay × seed, with the run's
    final ``val_accuracy, test_accuracy, test_loss``; column ``weight_decay``."""
    if any(wd < 0 for wd in cfg.weight_decays):
        raise ValueError(f"weight decays must be ≥ 0, got {cfg.weight_decays}")
    return sweep(_weight_decay_run, grid={"weight_decay": cfg.weight_decays}, seeds=cfg.seeds,
                 common=dict(data=datasets.load(cfg.dataset), cfg=cfg), desc="weight decay")


# --- the combinations grid -------------------------------------------------------------

@dataclass(frozen=True)
class GridConfig(Config):
    """BN × dropout × weight decay on a small training set, LR tuned per arm."""

    dataset: str = "digits"
    n_train: int = 300
    dropout: float = 0.3
    dropout_at: str = "head"
    weight_decay: float = 5e-4
    lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    depth: int = 2
    width: int = 128
    steps: int = 100
    momentum: float = 0.9
    batch_size: int = 64

    @classmethod
    def full(cls) -> "GridConfig":
        return cls(dataset="fashion_mnist", n_train=5000, lrs=(0.01, 0.03, 0.1, 0.3, 1.0), depth=4,
                   width=512, steps=5000, seeds=(0, 1, 2, 3, 4))


def _grid_run(*, seed: int, data: datasets.Dataset, cfg: GridConfig, lr: float, norm: str,
              dropout: float, weight_decay: float) -> pd.DataFrame:
    net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, depth=cfg.depth,
                                   width=cfg.width, norm=norm, dropout=dropout,
                                   dropout_at=cfg.dropout_at))
    return train(net, data, steps=cfg.steps, lr=lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
                 weight_decay=weight_decay, seed=seed, eval_every=cfg.steps,
                 eval_splits=("train", "val", "test"), device=cfg.device)


def grid_arms(cfg: GridConfig) -> dict[str, dict]:
    """The eight arms, named like ``"BN + dropout + WD"`` (``"plain"`` for none)."""
    arms = {}
    for norm in ("none", "batch"):
        for p in (0.0, cfg.dropout):
            for wd in (0.0, cfg.weight_decay):
                parts = (["BN"] if norm == "batch" else []) + (["dropout"] if p else []) + (["WD"] if wd else [])
                arms[" + ".join(parts) or "plain"] = dict(norm=norm, dropout=p, weight_decay=wd)
    return arms


def plot_grid(df: pd.DataFrame):
    """Test accuracy of every arm at its best validation LR (mean ± sd over seeds)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from .generalization import final_table
    table = final_table(df, by=("arm",))
    ax = plt.gca()
    sns.pointplot(data=table, y="arm", x="accuracy_test", errorbar=("sd", 1), linestyle="none",
                  order=list(dict.fromkeys(df["arm"])), ax=ax)
    ax.set_xlabel("test accuracy (best val LR)")
    ax.set_ylabel("")
    return ax


@register("regularizer_grid", GridConfig, title="BN × dropout × weight decay",
          chapter="15_regularizers", plot=plot_grid)
def regularizer_grid(cfg: GridConfig) -> pd.DataFrame:
    """Start and end of every arm × LR × seed run (splits ``train``/``val``/``test``)."""
    if not 0.0 < cfg.dropout < 1.0 or cfg.weight_decay <= 0:
        raise ValueError("dropout must be in (0, 1) and weight_decay > 0 for the grid")
    ds = datasets.load(cfg.dataset, n_train=cfg.n_train)
    return sweep(_grid_run, arms=grid_arms(cfg), grid={"lr": cfg.lrs}, seeds=cfg.seeds,
                 common=dict(data=ds, cfg=cfg), desc="grid")
