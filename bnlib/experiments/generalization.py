"""Chapter 5: does batch norm generalize better?

Two experiments:

* ``generalization`` — plain vs BN MLPs on several datasets, the learning rate tuned per
  arm *and* per dataset on the validation split; the final train/val/test loss and
  accuracy of every run (the article's accuracy table T2, the train–test gap I3, the
  across-datasets claim I4 and the train/test losses I8).
* ``generalization_controls`` — a small-data setting (a few hundred training examples)
  with arms that pull apart *where* a regularising effect could come from (B3): BN with
  mini-batch statistics, BN with full-batch statistics (no batch noise at all), ghost BN
  (normalise in small virtual batches: more normalisation noise, same gradient noise),
  plain nets with and without dropout; a plain full-batch net (the gradient-noise
  control, arm ``"plain, full batch"``) is available but not in the quick preset.

:class:`GhostBatchNorm1d` (ghost batch normalisation, Hoffer et al. 2017) is built on
:func:`bnlib.functional.batch_norm`; :func:`use_ghost_batchnorm` swaps it into a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from .. import data as datasets
from .. import functional as BF
from ..models import mlp
from ..nn import BatchNorm1d
from ..stats import paired_difference
from ..train import seeded, train
from . import Config, register, sweep
from ._common import at_best_lr, final_rows

__all__ = ["GhostBatchNorm1d", "use_ghost_batchnorm", "GeneralizationConfig", "generalization",
           "ControlsConfig", "generalization_controls", "fit_mlp", "final_table", "arm_summary",
           "paired_table", "plot_generalization", "plot_controls"]


# --- ghost batch norm ------------------------------------------------------------------

class GhostBatchNorm1d(BatchNorm1d):
    """Batch norm whose training-mode statistics come from *virtual* batches.

    In training mode the incoming batch is cut into ``len(x) // virtual_batch_size``
    consecutive chunks of (nearly) equal size, each at least ``virtual_batch_size``
    examples, and every chunk is normalised with its own mean and variance by
    :func:`bnlib.functional.batch_norm`; each chunk also updates the running statistics,
    as in Hoffer et al. (2017). Smaller chunks give noisier statistics, so the
    normalisation noise grows while the gradient is still averaged over the whole batch.
    In evaluation mode it is an ordinary batch norm with the running statistics.
    Parameters, buffers and ``state_dict`` are those of :class:`bnlib.nn.BatchNorm1d`.
    """

    def __init__(self, num_features: int, virtual_batch_size: int = 8, **kwargs: Any) -> None:
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 2:
            raise ValueError(f"virtual_batch_size must be an int ≥ 2 (a batch norm needs two "
                             f"examples), got {virtual_batch_size!r}")
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        if len(input) < 2:
            raise ValueError(f"ghost batch norm needs at least 2 examples in training mode, "
                             f"got input size {tuple(input.shape)}")
        chunks = input.tensor_split(max(len(input) // self.virtual_batch_size, 1))
        outs = []
        for chunk in chunks:
            momentum = 0.0 if self.momentum is None else self.momentum
            track = self.track_running_stats and self.running_mean is not None
            if track:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / float(self.num_batches_tracked)
            outs.append(BF.batch_norm(chunk, self.running_mean if track else None,
                                      self.running_var if track else None, self.weight,
                                      self.bias, True, momentum, self.eps))
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


def use_ghost_batchnorm(model: nn.Module, virtual_batch_size: int = 8) -> nn.Module:
    """Replace every :class:`bnlib.nn.BatchNorm1d` of ``model`` by a
    :class:`GhostBatchNorm1d` with the same options and state, in place; returns ``model``."""
    replaced = 0

    def swap(parent: nn.Module) -> None:
        nonlocal replaced
        for name, child in parent.named_children():
            if type(child) is BatchNorm1d:
                ghost = GhostBatchNorm1d(child.num_features, virtual_batch_size, eps=child.eps,
                                         momentum=child.momentum, affine=child.affine,
                                         track_running_stats=child.track_running_stats,
                                         bias=child.bias is not None or not child.affine)
                ghost.load_state_dict(child.state_dict())
                ghost.to(child.weight.device if child.weight is not None else "cpu")
                ghost.train(child.training)
                setattr(parent, name, ghost)
                replaced += 1
            else:
                swap(child)

    swap(model)
    if not replaced:
        raise ValueError("the model has no bnlib BatchNorm1d layer to turn into ghost batch norm")
    return model


# --- one run ---------------------------------------------------------------------------

def fit_mlp(*, seed: int, data: datasets.Dataset, lr: float, steps: int, batch_size: int = 64,
            momentum: float = 0.9, weight_decay: float = 0.0, depth: int = 3, width: int = 128,
            norm: str = "none", dropout: float = 0.0, ghost: int | None = None,
            full_batch: bool = False, eval_every: int | None = None,
            splits: Sequence[str] = ("train", "val", "test"), device: str = "auto") -> pd.DataFrame:
    """Train one seeded MLP and return its history on ``splits`` (eval mode).

    ``ghost`` turns every BN into a :class:`GhostBatchNorm1d` with that virtual batch size;
    ``full_batch=True`` trains on the whole training split at every step (plain gradient
    descent, and BN statistics without any sampling noise). By default only the start and
    the end of training are evaluated.
    """
    if ghost is not None and norm != "batch":
        raise ValueError("ghost batch norm needs norm='batch'")
    net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, depth=depth, width=width,
                                   norm=norm, dropout=dropout))
    if ghost is not None:
        use_ghost_batchnorm(net, ghost)
    bs = len(data.train) if full_batch else batch_size
    return train(net, data, steps=steps, lr=lr, batch_size=bs, momentum=momentum,
                 weight_decay=weight_decay, seed=seed, eval_every=eval_every or steps,
                 eval_splits=tuple(splits), device=device)


def final_table(df: pd.DataFrame, by: Sequence[str] = ("dataset", "arm"), *,
                tuned: bool = True) -> pd.DataFrame:
    """One row per run: the final train/val/test accuracy and loss side by side, the
    train–test ``gap`` (accuracy) and ``diverged``. With ``tuned=True`` (default) only the
    runs at each group's best validation learning rate; ``tuned=False`` keeps every LR."""
    by = [b for b in by if b in df]
    keys = by + ["lr", "seed"]
    runs = at_best_lr(df, by=by) if tuned else df
    last = final_rows(runs, keys)
    last = last[last["split"].isin(["train", "val", "test"])]
    wide = last.pivot_table(index=keys, columns="split", values=["accuracy", "loss"]).reset_index()
    wide.columns = [f"{a}_{b}" if b else a for a, b in wide.columns]
    wide["gap"] = wide["accuracy_train"] - wide["accuracy_test"]
    diverged = runs.groupby(keys)["diverged"].any().reset_index()
    return wide.merge(diverged, on=keys, how="left")


def arm_summary(table: pd.DataFrame, values: Sequence[str], by: Sequence[str] = ("dataset", "arm")
                ) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each column in ``values``, per ``by`` group
    (columns ``<value>_mean``, ``<value>_std``), plus the tuned ``lr`` and the seed count ``n``."""
    by = [b for b in by if b in table]
    missing = [v for v in values if v not in table]
    if missing:
        raise ValueError(f"columns {missing} not in the table; have {list(table.columns)}")
    g = table.groupby(by, sort=False)
    out = g[list(values)].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    return out.assign(lr=g["lr"].first(), n=g["seed"].nunique()).reset_index()


def paired_table(table: pd.DataFrame, value: str, a: str, b: str, by: str | None = "dataset"
                 ) -> pd.DataFrame:
    """:func:`bnlib.stats.paired_difference` of ``value`` (arm ``a`` minus arm ``b``, paired on
    the seed) for every ``by`` group: columns ``mean, std, ci_low, ci_high, significant``."""
    groups = [(None, table)] if by is None else list(table.groupby(by, sort=False))
    rows = []
    for key, sub in groups:
        d = paired_difference(sub, value, a, b)
        rows.append({**({by: key} if by is not None else {}), "comparison": f"{a} − {b}",
                     **{k: d[k] for k in ("n", "mean", "std", "ci_low", "ci_high", "significant")}})
    return pd.DataFrame(rows)


# --- experiment 1: plain vs BN across datasets ------------------------------------------

@dataclass(frozen=True)
class GeneralizationConfig(Config):
    """Plain vs BN MLPs, LR tuned per arm and dataset on the validation split."""

    datasets: tuple[str, ...] = ("digits", "mnist5k", "breast_cancer", "gaussian_mixture")
    lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    steps: int = 120
    batch_size: int = 64
    momentum: float = 0.9
    depth: int = 2
    width: int = 128
    mixture_separation: float = 0.7  # gaussian_mixture: overlapping classes, so not trivial

    @classmethod
    def full(cls) -> "GeneralizationConfig":
        return cls(datasets=("mnist", "fashion_mnist", "cifar10", "digits", "breast_cancer", "wine",
                             "gaussian_mixture"),
                   lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), steps=5000, batch_size=128,
                   depth=4, width=512, seeds=(0, 1, 2, 3, 4))


ARMS = {"plain": {"norm": "none"}, "BN": {"norm": "batch"}}


def plot_generalization(df: pd.DataFrame, ax=None):
    """Test accuracy at each arm's best validation LR, per dataset: mean ± sd over seeds
    (large markers) and the individual seeds (dots)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from ..plots import _palette
    table = final_table(df)
    ax = ax or plt.gca()
    pal = _palette(table["arm"])
    sns.pointplot(data=table, x="dataset", y="accuracy_test", hue="arm", errorbar=("sd", 1),
                  dodge=0.3, linestyle="none", palette=pal, ax=ax)
    sns.stripplot(data=table, x="dataset", y="accuracy_test", hue="arm", dodge=True, alpha=0.4,
                  palette=pal, legend=False, ax=ax)
    ax.set_ylabel("test accuracy (best val LR)")
    return ax


@register("generalization", GeneralizationConfig, title="Plain vs BN: accuracy and loss across datasets",
          chapter="05_generalization", plot=plot_generalization)
def generalization(cfg: GeneralizationConfig) -> pd.DataFrame:
    """Start and end of every run: columns ``step, split, loss, accuracy, ..., arm, seed,
    lr, dataset``, splits ``train``/``val``/``test`` (eval mode) and ``batch``."""
    if not cfg.datasets or not cfg.lrs:
        raise ValueError("give at least one dataset and one learning rate")
    frames = []
    for name in cfg.datasets:
        kwargs = {"separation": cfg.mixture_separation} if name == "gaussian_mixture" else {}
        ds = datasets.load(name, **kwargs)
        df = sweep(fit_mlp, arms=ARMS, grid={"lr": cfg.lrs}, seeds=cfg.seeds,
                   common=dict(data=ds, steps=cfg.steps, batch_size=cfg.batch_size,
                               momentum=cfg.momentum, depth=cfg.depth, width=cfg.width,
                               device=cfg.device), desc=name)
        frames.append(df.assign(dataset=name))
    return pd.concat(frames, ignore_index=True)


# --- experiment 2: where would the regularisation come from? ---------------------------

CONTROL_ARMS: dict[str, dict] = {
    "plain": {"norm": "none"},
    "plain, full batch": {"norm": "none", "full_batch": True},
    "plain + dropout": {"norm": "none", "dropout": 0.3},
    "BN": {"norm": "batch"},
    "BN, full batch": {"norm": "batch", "full_batch": True},
    "ghost BN": {"norm": "batch", "ghost": 8},
}


@dataclass(frozen=True)
class ControlsConfig(Config):
    """Small-data digits: BN vs controls that remove or add batch-statistics noise."""

    dataset: str = "digits"
    n_train: int = 300
    lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    steps: int = 120
    batch_size: int = 64
    momentum: float = 0.9
    depth: int = 2
    width: int = 128
    dropout: float = 0.3
    ghost_batch: int = 8
    arms: tuple[str, ...] = ("plain", "plain + dropout", "BN", "BN, full batch", "ghost BN")

    @classmethod
    def full(cls) -> "ControlsConfig":
        return cls(dataset="fashion_mnist", n_train=2000, lrs=(0.01, 0.03, 0.1, 0.3, 1.0),
                   steps=3000, depth=4, width=512, seeds=(0, 1, 2, 3, 4))


def _control_arms(cfg: ControlsConfig) -> dict[str, dict]:
    unknown = [a for a in cfg.arms if a not in CONTROL_ARMS]
    if unknown:
        raise ValueError(f"unknown control arms {unknown}; choose from {list(CONTROL_ARMS)}")
    arms = {a: dict(CONTROL_ARMS[a]) for a in cfg.arms}
    for kw in arms.values():
        if "dropout" in kw:
            kw["dropout"] = cfg.dropout
        if "ghost" in kw:
            kw["ghost"] = cfg.ghost_batch
    return {(f"ghost BN ({cfg.ghost_batch})" if "ghost" in kw else a): kw for a, kw in arms.items()}


def plot_controls(df: pd.DataFrame):
    """Test accuracy and train–test gap per control arm at its best validation LR."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    table = final_table(df)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for ax, col, label in zip(axes, ["accuracy_test", "gap"], ["test accuracy", "train − test accuracy"]):
        sns.pointplot(data=table, y="arm", x=col, errorbar=("sd", 1), linestyle="none", ax=ax,
                      color="#1f77b4")
        sns.stripplot(data=table, y="arm", x=col, color="0.4", size=4, ax=ax, alpha=0.6)
        ax.set_xlabel(label + " (best val LR)")
        ax.set_ylabel("")
    return fig


@register("generalization_controls", ControlsConfig,
          title="Small data: BN vs full-batch BN, ghost BN and dropout",
          chapter="05_generalization", plot=plot_controls)
def generalization_controls(cfg: ControlsConfig) -> pd.DataFrame:
    """Like :func:`generalization` on ``n_train`` examples, with the control arms."""
    if cfg.ghost_batch >= cfg.batch_size:
        raise ValueError(f"ghost_batch ({cfg.ghost_batch}) must be smaller than batch_size "
                         f"({cfg.batch_size}) to add normalisation noise")
    ds = datasets.load(cfg.dataset, n_train=cfg.n_train)
    df = sweep(fit_mlp, arms=_control_arms(cfg), grid={"lr": cfg.lrs}, seeds=cfg.seeds,
               common=dict(data=ds, steps=cfg.steps, batch_size=cfg.batch_size,
                           momentum=cfg.momentum, depth=cfg.depth, width=cfg.width,
                           device=cfg.device), desc="controls")
    return df.assign(dataset=f"{cfg.dataset} ({len(ds.train)} train)")
