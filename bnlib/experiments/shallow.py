"""Chapter 14: does batch norm help shallow networks too (M2, F8)?

One experiment, ``shallow_nets``: logistic regression and a one-hidden-layer MLP, each
(a) as is, (b) with batch norm, and (c) with no BN but standardised inputs, the learning
rate tuned per arm on the validation split. The history is evaluated every few steps so a
chapter can read both *early* accuracy (speed) and *final* accuracy off the same runs.

For logistic regression "with BN" means a batch norm on the input features followed by
the linear classifier (:class:`LogisticRegression` with ``input_norm=True``): in a model
with no hidden layer that is the only place a BN can go, and it is the learned,
batch-estimated version of standardising the inputs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
from torch import Tensor, nn

from .. import data as datasets
from ..models import mlp
from ..nn import BatchNorm1d
from ..train import seeded, train
from . import Config, register, sweep
from ._common import at_best_lr, final_rows

__all__ = ["LogisticRegression", "ShallowConfig", "shallow_nets", "fit_shallow", "table_at",
           "final_by_lr", "plot_shallow", "SHALLOW_ARMS"]


class LogisticRegression(nn.Module):
    """Multinomial logistic regression ``x ↦ W x + b``, optionally after a batch norm on the
    input features (``input_norm=True``: ``x ↦ W BN(x) + b``). The weights keep PyTorch's
    default ``nn.Linear`` initialisation."""

    def __init__(self, in_features: int, num_classes: int, *, input_norm: bool = False) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError(f"need in_features ≥ 1 and num_classes ≥ 2, got {in_features}, {num_classes}")
        self.norm = BatchNorm1d(in_features) if input_norm else nn.Identity()
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x))


@functools.lru_cache(maxsize=8)
def _load(name: str, preprocessing: str) -> datasets.Dataset:
    """Each (dataset, preprocessing) once per process: every run of a sweep shares it."""
    return datasets.load(name, preprocessing=preprocessing)


# arm name -> (model kind, batch norm?, input preprocessing)
SHALLOW_ARMS: dict[str, dict] = {
    "logreg": dict(kind="logreg", norm=False, preprocessing="scaled"),
    "logreg, standardized": dict(kind="logreg", norm=False, preprocessing="standardized"),
    "logreg + input BN": dict(kind="logreg", norm=True, preprocessing="scaled"),
    "1 hidden": dict(kind="mlp", norm=False, preprocessing="scaled"),
    "1 hidden, standardized": dict(kind="mlp", norm=False, preprocessing="standardized"),
    "1 hidden + BN": dict(kind="mlp", norm=True, preprocessing="scaled"),
}


def fit_shallow(*, seed: int, dataset: str, kind: str, norm: bool, preprocessing: str, lr: float,
                steps: int, width: int = 128, batch_size: int = 64, momentum: float = 0.9,
                eval_every: int = 25, device: str = "auto") -> pd.DataFrame:
    """Train one shallow model (``kind`` ``"logreg"`` or ``"mlp"`` with one hidden layer)."""
    if kind not in ("logreg", "mlp"):
        raise ValueError(f"kind must be 'logreg' or 'mlp', got {kind!r}")
    ds = _load(dataset, preprocessing)
    if ds.num_classes is None:
        raise ValueError(f"{dataset} is a regression set; shallow_nets needs a classification set")
    if kind == "logreg":
        build = lambda: LogisticRegression(ds.num_features, ds.num_classes, input_norm=norm)  # noqa: E731
    else:
        build = lambda: mlp(ds.num_features, ds.num_classes, depth=1, width=width,  # noqa: E731
                            norm="batch" if norm else "none")
    net = seeded(seed, build)
    return train(net, ds, steps=steps, lr=lr, batch_size=batch_size, momentum=momentum, seed=seed,
                 eval_every=eval_every, eval_splits=("val", "test"), device=device)


@dataclass(frozen=True)
class ShallowConfig(Config):
    """Logistic regression and a 1-hidden-layer MLP: plain, with BN, with standardised inputs."""

    datasets: tuple[str, ...] = ("digits",)
    arms: tuple[str, ...] = tuple(SHALLOW_ARMS)
    lrs: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    steps: int = 300
    early_step: int = 50
    eval_every: int = 25
    width: int = 128
    batch_size: int = 64
    momentum: float = 0.9

    @classmethod
    def full(cls) -> "ShallowConfig":
        return cls(datasets=("fashion_mnist", "mnist", "breast_cancer"), lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                   steps=5000, early_step=250, eval_every=250, width=512, seeds=(0, 1, 2, 3, 4))


def table_at(df: pd.DataFrame, step: int, by: Sequence[str] = ("dataset", "arm")) -> pd.DataFrame:
    """Each run at ``step``, at the learning rate that is best *on validation at that step*
    for its arm: columns ``by, lr, seed, accuracy_val, accuracy_test, loss_val, loss_test``."""
    if step not in set(df["step"]):
        raise ValueError(f"step {step} was not evaluated; evaluated steps: {sorted(set(df['step']))}")
    by = [b for b in by if b in df]
    upto = df[df["step"] <= step]
    best = at_best_lr(upto, by=by)
    last = final_rows(best, by + ["lr", "seed"])
    wide = last[last["split"].isin(["val", "test"])].pivot_table(
        index=by + ["lr", "seed"], columns="split", values=["accuracy", "loss"]).reset_index()
    wide.columns = [f"{a}_{b}" if b else a for a, b in wide.columns]
    return wide.assign(step=step)


def final_by_lr(df: pd.DataFrame, split: str = "val", metric: str = "accuracy") -> pd.DataFrame:
    """The final ``metric`` on ``split`` of every run, one row per (dataset, arm, lr, seed), with
    ``family`` (``"logreg"`` or ``"1 hidden"``) and ``diverged``: the learning-rate sweep view."""
    keys = [k for k in ("dataset", "arm", "lr", "seed") if k in df]
    last = final_rows(df, keys)
    last = last[last["split"] == split][keys + [metric]]
    runs = df.groupby(keys, sort=False)["diverged"].any().reset_index()
    out = runs.merge(last, on=keys, how="left")
    out["family"] = out["arm"].map(lambda a: "logreg" if a.startswith("logreg") else "1 hidden")
    return out


def plot_shallow(df: pd.DataFrame):
    """Validation accuracy over steps at each arm's best final-validation LR."""
    import matplotlib.pyplot as plt
    from ..plots import learning_curves
    best = at_best_lr(df, by=[b for b in ("dataset", "arm") if b in df])
    ax = plt.gca()
    learning_curves(best[best["step"] > 0], split="val", ax=ax)
    ax.set_ylabel("val accuracy (best LR per arm)")
    return ax


@register("shallow_nets", ShallowConfig, title="Shallow nets: BN vs standardised inputs",
          chapter="14_shallow", plot=plot_shallow)
def shallow_nets(cfg: ShallowConfig) -> pd.DataFrame:
    """Evaluation history (every ``eval_every`` steps, splits ``val``/``test``) of every arm ×
    learning rate × seed × dataset; columns as :func:`bnlib.train.train` plus ``arm, lr, seed,
    dataset``."""
    unknown = [a for a in cfg.arms if a not in SHALLOW_ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(SHALLOW_ARMS)}")
    if cfg.early_step % cfg.eval_every or cfg.steps % cfg.eval_every or cfg.early_step >= cfg.steps:
        raise ValueError("early_step and steps must be multiples of eval_every, with early_step < steps")
    frames = []
    for name in cfg.datasets:
        df = sweep(fit_shallow, arms={a: SHALLOW_ARMS[a] for a in cfg.arms}, grid={"lr": cfg.lrs},
                   seeds=cfg.seeds, common=dict(dataset=name, steps=cfg.steps, width=cfg.width,
                                                batch_size=cfg.batch_size, momentum=cfg.momentum,
                                                eval_every=cfg.eval_every, device=cfg.device),
                   desc=name)
        frames.append(df.assign(dataset=name))
    return pd.concat(frames, ignore_index=True)
