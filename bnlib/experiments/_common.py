"""Building blocks shared by the chapters' experiments: one seeded training run, and
choosing each arm's learning rate on the validation split (never on the test split)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from .. import data as datasets
from ..data import Dataset
from ..models import cnn, mlp
from ..train import seeded, train

__all__ = ["train_mlp", "train_cnn", "tune_lr", "at_best_lr", "final_rows"]


def _dataset(data: Dataset | str, **load_kwargs) -> Dataset:
    return datasets.load(data, **load_kwargs) if isinstance(data, str) else data


def train_mlp(*, seed: int, data: Dataset | str, model: Mapping[str, Any] | None = None,
              **train_kwargs: Any) -> pd.DataFrame:
    """Build ``bnlib.models.mlp(**model)`` under ``seed`` and train it with ``seed``'s batch order.

    Arms that differ only in ``model`` (e.g. ``norm="batch"`` vs ``"none"``) and share a
    seed start from the same random stream and see the same batches.
    """
    ds = _dataset(data)
    net = seeded(seed, lambda: mlp(ds.num_features, ds.num_classes or ds.train.y.shape[1], **(model or {})))
    return train(net, ds, seed=seed, **train_kwargs)


def train_cnn(*, seed: int, data: Dataset | str, model: Mapping[str, Any] | None = None,
              **train_kwargs: Any) -> pd.DataFrame:
    """Like :func:`train_mlp` for ``bnlib.models.cnn`` on image-shaped inputs."""
    ds = _dataset(data).images()
    net = seeded(seed, lambda: cnn(ds.input_shape[0], ds.num_classes, **(model or {})))
    return train(net, ds, seed=seed, **train_kwargs)


def final_rows(df: pd.DataFrame, keys: Sequence[str] = ("arm", "lr", "seed")) -> pd.DataFrame:
    """The last evaluation of every run, one row per (run, split)."""
    keys = [k for k in keys if k in df]
    last = df.groupby(keys + ["split"], sort=False)["step"].transform("max")
    return df[df["step"] == last].reset_index(drop=True)


def tune_lr(df: pd.DataFrame, *, metric: str = "accuracy", split: str = "val",
            by: Sequence[str] = ("arm",), lr: str = "lr", diverged_value: float = 0.0) -> pd.DataFrame:
    """Each arm's best learning rate: the one with the best mean final ``metric`` on
    ``split`` over seeds (diverged runs count as ``diverged_value``). Returns columns
    ``by + [lr, metric, "at_edge"]``; ``at_edge`` flags a best rate at either end of the
    grid, where a wider grid might find a better one. Loss is minimised, anything else
    maximised."""
    by = list(by)
    last = final_rows(df, by + [lr, "seed"])
    last = last[last["split"] == split].copy()
    # a run that diverged has no final row on this split at its last step; count it explicitly
    runs = df.groupby(by + [lr, "seed"], sort=False)["diverged"].any().reset_index()
    last = runs.merge(last.drop(columns=["diverged"]), on=by + [lr, "seed"], how="left")
    fill = diverged_value if metric != "loss" else float("inf")
    last.loc[last["diverged"] | last[metric].isna(), metric] = fill
    mean = last.groupby(by + [lr], sort=False)[metric].mean().reset_index()
    pick = mean.loc[mean.groupby(by, sort=False)[metric].idxmin() if metric == "loss"
                    else mean.groupby(by, sort=False)[metric].idxmax()].reset_index(drop=True)
    # A best rate at the end of the grid may not be the arm's best at all: say so.
    pick["at_edge"] = pick[lr].isin([mean[lr].min(), mean[lr].max()])
    return pick


def at_best_lr(df: pd.DataFrame, **tune_kwargs: Any) -> pd.DataFrame:
    """The rows of ``df`` run at each arm's best learning rate (see :func:`tune_lr`)."""
    lr = tune_kwargs.get("lr", "lr")
    by = list(tune_kwargs.get("by", ("arm",)))
    best = tune_lr(df, **tune_kwargs)[by + [lr]]
    return df.merge(best, on=by + [lr], how="inner")
