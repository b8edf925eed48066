"""Small statistics the chapters report: mean ± spread over seeds, paired differences,
and "how long until a target" read off a training history."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["summarize", "paired_difference", "steps_to_target", "final", "t_interval"]


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of ``values`` (NaNs dropped)."""
    from scipy import stats
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def summarize(df: pd.DataFrame, by: str | Sequence[str], value: str, level: float = 0.95) -> pd.DataFrame:
    """Per group: ``n``, ``mean``, ``std`` (over seeds, ddof=1), ``ci_low``/``ci_high``."""
    by = [by] if isinstance(by, str) else list(by)

    def one(g: pd.Series) -> pd.Series:
        mean, lo, hi = t_interval(g.to_numpy(), level)
        return pd.Series({"n": int(g.notna().sum()), "mean": mean,
                          "std": float(g.std(ddof=1)) if g.notna().sum() > 1 else math.nan,
                          "ci_low": lo, "ci_high": hi})

    return df.groupby(by, sort=False)[value].apply(one).unstack().reset_index()


def paired_difference(df: pd.DataFrame, value: str, a: str, b: str, *, arm: str = "arm",
                      pair_on: Sequence[str] = ("seed",), level: float = 0.95) -> dict:
    """Mean of ``value[a] − value[b]`` over pairs that share ``pair_on`` (e.g. the seed),
    with a t confidence interval. ``significant`` is True when the interval excludes 0."""
    keys = list(pair_on)
    left = df[df[arm] == a].set_index(keys)[value]
    right = df[df[arm] == b].set_index(keys)[value]
    diff = (left - right).dropna()
    if diff.empty:
        raise ValueError(f"no pairs of arms {a!r} and {b!r} share {keys}")
    mean, lo, hi = t_interval(diff.to_numpy(), level)
    return {"a": a, "b": b, "n": len(diff), "mean": mean,
            "std": float(diff.std(ddof=1)) if len(diff) > 1 else math.nan,
            "ci_low": lo, "ci_high": hi,
            "significant": bool(lo > 0 or hi < 0) if not math.isnan(lo) else False}


def steps_to_target(history: pd.DataFrame, target: float, *, split: str = "val",
                    metric: str = "accuracy", column: str = "step") -> float:
    """First ``step`` (or ``elapsed`` with ``column="elapsed"``) at which ``metric`` on
    ``split`` reaches ``target``; ``inf`` when the run never gets there (or diverged first).
    For ``metric="loss"`` the target is reached from above."""
    h = history[history["split"] == split]
    hit = h[h[metric] <= target] if metric == "loss" else h[h[metric] >= target]
    return float(hit[column].iloc[0]) if len(hit) else math.inf


def final(history: pd.DataFrame, *, split: str = "test", metric: str = "accuracy",
          diverged_value: float | None = None) -> float:
    """The last recorded ``metric`` on ``split``. A diverged run gives ``diverged_value``
    (e.g. chance accuracy, or NaN to drop it) so no divergence passes for a result."""
    if bool(history["diverged"].any()) and diverged_value is not None:
        return diverged_value
    h = history[history["split"] == split]
    return float(h[metric].iloc[-1]) if len(h) else math.nan
