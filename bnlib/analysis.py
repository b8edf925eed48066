"""The book's evidence protocol, written once: tidy training histories in, numbers a
referee cannot break out.

Input: histories from :func:`bnlib.train.train` stacked over runs, i.e. the columns
``step, split, loss, accuracy, elapsed, diverged`` plus run-key columns (``arm``, ``lr``,
``seed``, any grid key). A *run* is one combination of key columns; by default the keys
are every column that is not a history column.

* :func:`final` — each run's last evaluation; a diverged run gets an explicit value (NaN).
* :func:`time_to_target`, :func:`survival_summary`, :func:`time_ratio` — time to a target
  is censored data: a run that never arrives is censored at its budget, never ``inf``.
* :func:`paired_difference`, :func:`equivalence`, :func:`compare`, :func:`compare_family`
  — paired-by-seed t-intervals, TOST with a declared margin, Holm over a family.
* :func:`tune`, :func:`select` — choose a value on validation with seeds disjoint from the
  reporting seeds, refuse a choice at the edge of its grid, count divergence as worst.
* :func:`reliability`, :func:`expected_calibration_error` — calibration of predicted
  probabilities: the reliability table and its ECE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor

__all__ = ["HISTORY_COLUMNS", "MIN_EQUIVALENCE_SEEDS", "GridEdgeError", "run_keys", "final",
           "censored_times", "time_to_target", "survival_summary", "TimeRatio", "time_ratio", "pairs", "Diff",
           "paired_difference", "Equivalence", "equivalence", "Comparison", "compare", "compare_arms", "holm",
           "compare_family", "tune", "select", "reliability", "expected_calibration_error"]

HISTORY_COLUMNS = ("step", "split", "loss", "accuracy", "elapsed", "diverged")
#: House rule: "no difference" is claimed only from an equivalence test on at least 8 seeds.
MIN_EQUIVALENCE_SEEDS = 8


class GridEdgeError(ValueError):
    """A tuned value sits at the smallest or largest value of its grid, so a wider grid
    might do better: the comparison would be against an arm that was not really tuned."""


def _cols(c: str | Sequence[str]) -> list[str]:
    return [c] if isinstance(c, str) else list(c)


def run_keys(df: pd.DataFrame, keys: Sequence[str] | None = None) -> list[str]:
    """The columns that identify a run: ``keys`` if given (all must exist), else every
    column of ``df`` that is not one of :data:`HISTORY_COLUMNS`."""
    if keys is None:
        return [c for c in df.columns if c not in HISTORY_COLUMNS]
    missing = [k for k in _cols(keys) if k not in df.columns]
    if missing:
        raise ValueError(f"key columns {missing} not in the table (columns: {list(df.columns)})")
    return _cols(keys)


def _runs(df: pd.DataFrame, split: str, keys: Sequence[str] | None):
    """Yield ``(key dict, this run's rows on split sorted by step, diverged)`` for every run,
    including runs with no row on ``split`` (e.g. diverged before their first evaluation)."""
    if split not in set(df["split"]):
        raise ValueError(f"split {split!r} not in the table (splits: {sorted(set(df['split']))})")
    keys = run_keys(df, keys)
    groups = df.groupby(keys, sort=False, dropna=False) if keys else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        h = g[g["split"] == split].sort_values("step")
        if h["step"].duplicated().any():
            raise ValueError(f"several runs share the keys {dict(zip(keys, key))}: "
                             "a key column is missing")
        div = bool(g["diverged"].any())
        if h.empty and not div:
            raise ValueError(f"run {dict(zip(keys, key))} was never evaluated on {split!r}")
        yield dict(zip(keys, key)), h, div


def final(df: pd.DataFrame, *, split: str, metric: str = "accuracy",
          keys: Sequence[str] | None = None, diverged_value: float = math.nan) -> pd.DataFrame:
    """One row per run: its last evaluation of ``metric`` on ``split``.

    Columns: keys, ``step`` (of that evaluation; NaN if none), ``metric``, ``diverged``.
    A diverged run's value is ``diverged_value`` (NaN by default) rather than whatever it
    measured before it blew up, so a divergence never passes for a result; the caller
    decides how to count it (:func:`tune` counts it worst).
    """
    rows = []
    for key, h, div in _runs(df, split, keys):
        last = h.iloc[-1] if len(h) else None
        value = diverged_value if div else (float(last[metric]) if last is not None else math.nan)
        rows.append({**key, "step": float(last["step"]) if last is not None else math.nan,
                     metric: value, "diverged": div})
    return pd.DataFrame(rows)


def _crossing(t: np.ndarray, v: np.ndarray, target: float, higher: bool,
              interpolate: bool) -> float:
    """First time ``v`` reaches ``target`` (NaN if never), linear between the bracketing
    evaluations so the answer does not depend on the evaluation interval."""
    ok = v >= target if higher else v <= target
    if not ok.any():
        return math.nan
    i = int(np.argmax(ok))
    if i == 0 or not interpolate:
        return float(t[i])
    frac = (target - v[i - 1]) / (v[i] - v[i - 1])
    return float(t[i - 1] + frac * (t[i] - t[i - 1]))


def time_to_target(df: pd.DataFrame, target: float, *, split: str = "val",
                   metric: str = "accuracy", keys: Sequence[str] | None = None,
                   column: str = "step", interpolate: bool = True,
                   higher: bool | None = None, budget: float | None = None) -> pd.DataFrame:
    """One row per run: when ``metric`` on ``split`` first reaches ``target``.

    Columns: keys, ``time`` (in ``column``: ``"step"`` or ``"elapsed"`` seconds; NaN when
    not reached, never ``inf``), ``reached``, ``budget`` and ``diverged``. "Reaches" means
    ``≥ target`` unless ``higher=False`` (the default for a metric named like ``loss``:
    ``≤``). With ``interpolate`` the time is interpolated linearly between the two
    evaluations that bracket the crossing.

    ``budget`` is how long the run was watched: its last evaluation. A diverged run that
    never got there will never get there, so it is censored at the *planned* budget
    (``budget`` if given, else the largest ``column`` any non-diverged run reached on
    ``split``), not at the step where it stopped. A crossing observed before a run
    diverged still counts as reached (it did get there); :func:`tune` is stricter.
    """
    higher = ("loss" not in metric) if higher is None else higher
    on = df[df["split"] == split]
    ok = on[~on["diverged"].astype(bool)]
    planned = float(budget) if budget is not None else float((ok if len(ok) else on)[column].max())
    rows = []
    for key, h, div in _runs(df, split, keys):
        h = h[h[metric].notna()]
        if h.empty and not div:
            raise ValueError(f"{metric!r} is NaN throughout run {key} on {split!r}")
        t = _crossing(h[column].to_numpy(float), h[metric].to_numpy(float), target, higher,
                      interpolate)
        last = float(h[column].iloc[-1]) if len(h) else math.nan
        rows.append({**key, "time": t, "reached": not math.isnan(t),
                     "budget": planned if div else last, "diverged": div})
    out = pd.DataFrame(rows)
    out.attrs["unit"] = "step" if column == "step" else ("s" if column == "elapsed" else column)
    return out


def censored_times(df: pd.DataFrame, target: float, *, keys: Sequence[str],
                   split: str = "val") -> pd.DataFrame:
    """:func:`time_to_target` with the planned budget (the last evaluated step on ``split``),
    plus ``steps``: the time, or the budget where the run never arrived (a lower bound: it
    favours the run that did not arrive; never inf)."""
    budget = float(df.loc[df["split"] == split, "step"].max())
    t = time_to_target(df, target, split=split, keys=keys, budget=budget)
    return t.assign(steps=np.where(t["reached"], t["time"], t["budget"]))


def _observed(ttt: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per run: the observed time (arrival, or censoring at the budget) and the event flag."""
    reached = ttt["reached"].to_numpy(bool)
    return np.where(reached, ttt["time"].to_numpy(float), ttt["budget"].to_numpy(float)), reached


def _kaplan_meier(obs: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan–Meier survival S(t) ("not yet arrived"): the event times and S just after each.
    A censoring tied with an event counts as still at risk at that event."""
    times = np.unique(obs[event])
    surv, s = [], 1.0
    for t in times:
        s *= 1.0 - (event & (obs == t)).sum() / (obs >= t).sum()
        surv.append(s)
    return times, np.asarray(surv)


def _restricted_mean(obs: np.ndarray, event: np.ndarray, horizon: float) -> float:
    """Area under the Kaplan–Meier curve on [0, horizon]: the mean of min(T, horizon),
    valid with unequal budgets as long as every run was watched up to its own budget."""
    times, surv = _kaplan_meier(obs, event)
    edges = np.concatenate([[0.0], times[times < horizon], [horizon]])
    levels = np.concatenate([[1.0], surv[times < horizon]])
    return float(np.sum(np.diff(edges) * levels))


def survival_summary(ttt: pd.DataFrame, *, by: Sequence[str] = ("arm",),
                     horizon: float | None = None) -> pd.DataFrame:
    """Per group of :func:`time_to_target` rows: ``n``, ``n_reached``, ``fraction_reached``,
    ``horizon``, ``restricted_mean`` (Kaplan–Meier area up to ``horizon``, i.e. the mean of
    min(T, horizon); a run that never arrives counts its whole budget), ``km_median`` (first
    time S(t) ≤ 0.5; NaN when the curve never gets there) and ``mean_time`` (plain mean, only
    when every run arrived, else NaN).

    ``horizon`` defaults to the smallest, over groups, of each group's largest budget, so it
    is common to all groups and each group's curve is known up to it.
    """
    by = _cols(by)
    groups = list(ttt.groupby(by, sort=False)) if by else [((), ttt)]
    if horizon is None:
        horizon = min(float(g["budget"].max()) for _, g in groups)
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        if horizon > g["budget"].max():
            raise ValueError(f"horizon {horizon} exceeds every budget of group {key}")
        obs, event = _observed(g)
        times, surv = _kaplan_meier(obs, event)
        below = np.flatnonzero(surv <= 0.5)
        rows.append({**dict(zip(by, key)), "n": len(g), "n_reached": int(event.sum()),
                     "fraction_reached": float(event.mean()), "horizon": float(horizon),
                     "restricted_mean": _restricted_mean(obs, event, horizon),
                     "km_median": float(times[below[0]]) if len(below) else math.nan,
                     "mean_time": float(obs.mean()) if event.all() else math.nan})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class TimeRatio:
    """Paired ratio of times to target, ``a / b``; ``censored`` when some run did not arrive,
    and then only the fractions reached and the restricted means are reported."""
    a: str
    b: str
    n: int
    censored: bool
    reached_a: int
    reached_b: int
    horizon: float
    restricted_mean_a: float
    restricted_mean_b: float
    unit: str = "step"
    ratio: float = math.nan  # geometric mean of the paired ratios
    median: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    confidence: float = 0.95

    def describe(self) -> str:
        """One line fit for prose: the ratio with its interval, or why there is none."""
        if not self.censored:
            return (f"{self.a}/{self.b} time ratio {self.ratio:.3g} (geometric mean of {self.n} "
                    f"paired runs; {self.confidence:.0%} CI {self.ci_low:.3g}–{self.ci_high:.3g}; "
                    f"median {self.median:.3g})")
        by = (f"step {self.horizon:g}" if self.unit == "step" else f"{self.horizon:.4g} {self.unit}")
        gone = "; ".join(f"{arm} not reached by {by} in {self.n - k} of {self.n} runs"
                         for arm, k in ((self.a, self.reached_a), (self.b, self.reached_b))
                         if k < self.n)
        return (f"no ratio: {gone}. Restricted mean time (up to {by}): "
                f"{self.a} {self.restricted_mean_a:.4g}, {self.b} {self.restricted_mean_b:.4g}")

    __str__ = describe


def time_ratio(ttt: pd.DataFrame, a: str, b: str, *, arm: str = "arm",
               pair_on: Sequence[str] = ("seed",), confidence: float = 0.95) -> TimeRatio:
    """The paired ratio of arm ``a``'s time to target over arm ``b``'s (pairs share
    ``pair_on``; filter ``ttt`` to one setting per arm first). Computed only when every
    paired run of both arms arrived: geometric mean with a t-interval on the log ratios,
    and the median. Otherwise a censored result with the counts and restricted means —
    never ``inf``, never 0 for something that did not arrive."""
    ta, tb = (ttt[ttt[arm] == x].set_index(_cols(pair_on)) for x in (a, b))
    _check_pairs(ta.index, tb.index, a, b)
    tb = tb.loc[ta.index]
    horizon = min(float(ta["budget"].max()), float(tb["budget"].max()))
    ra, rb = int(ta["reached"].sum()), int(tb["reached"].sum())
    base = dict(a=a, b=b, n=len(ta), reached_a=ra, reached_b=rb, horizon=horizon,
                restricted_mean_a=_restricted_mean(*_observed(ta), horizon),
                restricted_mean_b=_restricted_mean(*_observed(tb), horizon),
                unit=ttt.attrs.get("unit", "step"), confidence=confidence)
    if ra < len(ta) or rb < len(tb):
        return TimeRatio(censored=True, **base)
    x, y = ta["time"].to_numpy(float), tb["time"].to_numpy(float)
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("a time to target is 0 (reached at the first evaluation): "
                         "no ratio; choose a harder target")
    d = paired_difference(np.log(x), np.log(y), confidence=confidence)
    return TimeRatio(censored=False, ratio=math.exp(d.mean), median=float(np.median(x / y)),
                     ci_low=math.exp(d.ci_low), ci_high=math.exp(d.ci_high), **base)


def _check_pairs(ia: pd.Index, ib: pd.Index, a: str, b: str) -> None:
    if ia.has_duplicates or ib.has_duplicates:
        raise ValueError(f"several rows per pair for {a!r} or {b!r}: filter to one setting first")
    only = sorted(set(ia) ^ set(ib), key=str)
    if only or len(ia) == 0:
        raise ValueError(f"arms {a!r} and {b!r} are not paired: unmatched {only or 'no rows'}")


def pairs(df: pd.DataFrame, value: str, a: str, b: str, *, arm: str = "arm",
          pair_on: Sequence[str] = ("seed",)) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: ``value`` of arm ``a`` and of arm ``b``, aligned on ``pair_on`` (the seed).
    Raises when a pair is missing or duplicated instead of silently dropping it."""
    xa, xb = (df[df[arm] == x].set_index(_cols(pair_on))[value] for x in (a, b))
    _check_pairs(xa.index, xb.index, a, b)
    return xa.to_numpy(float), xb.loc[xa.index].to_numpy(float)


def _differences(x: Iterable[float], y: Iterable[float]) -> np.ndarray:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples need equal 1-d shapes, got {x.shape} and {y.shape}")
    if len(x) < 2 or not np.isfinite(x).all() or not np.isfinite(y).all():
        raise ValueError(f"a paired test needs n ≥ 2 finite pairs, got n={len(x)} "
                         f"with {int((~np.isfinite(x - y)).sum())} non-finite")
    d = x - y
    if np.ptp(d) == 0:
        raise ValueError("all paired differences are equal (sd = 0): a t-test is undefined")
    return d


@dataclass(frozen=True)
class Diff:
    """Mean paired difference ``x − y`` with its t-interval and two-sided paired t-test."""
    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    p: float
    confidence: float = 0.95

    def describe(self) -> str:
        return (f"difference {self.mean:+.4g} ({self.confidence:.0%} CI {self.ci_low:+.4g} to "
                f"{self.ci_high:+.4g}, paired t p = {self.p:.2g}, n = {self.n})")


def paired_difference(x: Iterable[float], y: Iterable[float], *,
                      confidence: float = 0.95) -> Diff:
    """Paired difference ``x − y`` (pairs share a seed): n, mean, sd, Student-t interval
    and two-sided paired t-test p-value. Needs n ≥ 2 finite pairs."""
    d = _differences(x, y)
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return Diff(n, mean, sd, mean - half, mean + half, p, confidence)


@dataclass(frozen=True)
class Equivalence:
    """TOST result: ``p`` (the larger one-sided p), the (1−2α) interval of the difference
    and ``equivalent`` (p < α, i.e. that interval lies inside ±margin)."""
    n: int
    margin: float
    alpha: float
    p: float
    ci_low: float
    ci_high: float
    equivalent: bool


def equivalence(x: Iterable[float], y: Iterable[float], margin: float, *,
                alpha: float = 0.05) -> Equivalence:
    """Two one-sided paired t-tests that the mean difference ``x − y`` lies in
    (−margin, margin) (statsmodels ``ttost_paired``). ``margin`` must be declared by the
    caller in advance. Raises ValueError below :data:`MIN_EQUIVALENCE_SEEDS` pairs: the
    house rules allow no verdict of "no difference" from fewer seeds."""
    from statsmodels.stats.weightstats import ttost_paired
    if not margin > 0:
        raise ValueError(f"the equivalence margin must be > 0, got {margin}")
    d = _differences(x, y)
    if len(d) < MIN_EQUIVALENCE_SEEDS:
        raise ValueError(f"equivalence needs ≥ {MIN_EQUIVALENCE_SEEDS} paired seeds, got {len(d)}")
    p = float(ttost_paired(d, np.zeros_like(d), -margin, margin)[0])
    ci = paired_difference(d, np.zeros_like(d), confidence=1 - 2 * alpha)
    return Equivalence(len(d), margin, alpha, p, ci.ci_low, ci.ci_high, p < alpha)


@dataclass(frozen=True)
class Comparison:
    """A verdict on ``x`` against ``y``: ``"better"``, ``"worse"``, ``"equivalent"`` or
    ``"inconclusive"``, with the numbers it rests on and why."""
    verdict: str
    diff: Diff
    margin: float
    alpha: float
    p: float  # the difference test's p (Holm-adjusted inside a family)
    p_tost: float  # NaN when fewer than MIN_EQUIVALENCE_SEEDS pairs
    reason: str
    name: str = ""

    def describe(self) -> str:
        tost = f"TOST p = {self.p_tost:.2g} (margin ±{self.margin:g})" if not math.isnan(
            self.p_tost) else "no TOST"
        head = f"{self.name}: " if self.name else ""
        return (f"{head}{self.verdict} — mean difference {self.diff.mean:+.4g} "
                f"({self.diff.confidence:.0%} CI {self.diff.ci_low:+.4g} to "
                f"{self.diff.ci_high:+.4g}), p = {self.p:.2g}, {tost}, n = {self.diff.n}; "
                f"{self.reason}")

    __str__ = describe

    def row(self) -> dict:
        """The verdict and its numbers as one table row (``verdict, mean, ci_low, ci_high,
        p, p_tost``)."""
        return dict(verdict=self.verdict, mean=self.diff.mean, ci_low=self.diff.ci_low,
                    ci_high=self.diff.ci_high, p=self.p, p_tost=self.p_tost)


def _verdict(diff: Diff, p: float, p_tost: float, alpha: float, higher_is_better: bool,
             margin: float) -> tuple[str, str]:
    if p < alpha:
        good = (diff.mean > 0) == higher_is_better
        return ("better" if good else "worse"), f"paired t-test rejects no difference at α={alpha}"
    if not math.isnan(p_tost) and p_tost < alpha:
        return "equivalent", f"TOST rejects a difference beyond ±{margin:g} at α={alpha}"
    if math.isnan(p_tost):
        return "inconclusive", f"no difference shown; fewer than {MIN_EQUIVALENCE_SEEDS} seeds for equivalence"
    return "inconclusive", f"neither a difference nor equivalence within ±{margin:g} shown"


def compare(x: Iterable[float], y: Iterable[float], *, margin: float, alpha: float = 0.05,
            higher_is_better: bool = True, name: str = "") -> Comparison:
    """Verdict on ``x`` against ``y`` (paired): better/worse when the two-sided paired t-test
    rejects at ``alpha`` (direction from the mean and ``higher_is_better``); equivalent when
    it does not and TOST with the declared ``margin`` rejects; otherwise inconclusive. With
    fewer than :data:`MIN_EQUIVALENCE_SEEDS` pairs equivalence is not tested."""
    if not margin > 0:
        raise ValueError(f"the equivalence margin must be > 0, got {margin}")
    diff = paired_difference(x, y)
    p_tost = (equivalence(x, y, margin, alpha=alpha).p if diff.n >= MIN_EQUIVALENCE_SEEDS
              else math.nan)
    word, why = _verdict(diff, diff.p, p_tost, alpha, higher_is_better, margin)
    return Comparison(word, diff, margin, alpha, diff.p, p_tost, why, name)


def compare_arms(df: pd.DataFrame, value: str, a: str, b: str, *, margin: float,
                 higher_is_better: bool = True, name: str = "", arm: str = "arm",
                 pair_on: Sequence[str] = ("seed",), alpha: float = 0.05) -> Comparison:
    """:func:`compare` of arm ``a`` against arm ``b`` on the column ``value`` of a tidy table,
    paired on ``pair_on`` (:func:`pairs`): the one-line verdict a chapter asks for."""
    x, y = pairs(df, value, a, b, arm=arm, pair_on=pair_on)
    return compare(x, y, margin=margin, alpha=alpha, higher_is_better=higher_is_better, name=name)


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction: ``(reject, adjusted p-values)`` in input order. The
    k-th smallest of m p-values is multiplied by m − k + 1, then made non-decreasing and
    capped at 1. (Same numbers as statsmodels' ``multipletests(method="holm")``, which the
    tests check; computed here because that function calls ``gc.collect()`` on every call.)"""
    p = np.asarray(pvalues, float)
    if p.ndim != 1 or len(p) == 0 or not np.isfinite(p).all():
        raise ValueError(f"holm needs a non-empty list of finite p-values, got {pvalues}")
    order = np.argsort(p, kind="stable")
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(len(p), 0, -1)))
    return adjusted < alpha, adjusted


def compare_family(family: Mapping[str, tuple[Iterable[float], Iterable[float]]], *,
                   margin: float, alpha: float = 0.05,
                   higher_is_better: bool = True) -> dict[str, Comparison]:
    """:func:`compare` for each named ``(x, y)`` of a family (e.g. four activations against
    one baseline), with the difference p-values and the TOST p-values each Holm-adjusted
    over the family before the verdicts are read."""
    raw = {k: compare(x, y, margin=margin, alpha=alpha, higher_is_better=higher_is_better,
                      name=k) for k, (x, y) in family.items()}
    p = dict(zip(raw, holm([c.p for c in raw.values()], alpha)[1]))
    tested = [k for k, c in raw.items() if not math.isnan(c.p_tost)]
    pt = dict(zip(tested, holm([raw[k].p_tost for k in tested], alpha)[1])) if tested else {}
    out = {}
    for k, c in raw.items():
        pk, ptk = float(p[k]), float(pt.get(k, math.nan))
        word, why = _verdict(c.diff, pk, ptk, alpha, higher_is_better, margin)
        out[k] = Comparison(word, c.diff, margin, alpha, pk, ptk,
                            f"{why} (Holm over {len(raw)})", k)
    return out


def tune(df: pd.DataFrame, param: str = "lr", *, metric: str = "accuracy", split: str = "val",
         by: Sequence[str] = ("arm",), seed: str = "seed", seeds: Iterable | None = None,
         report_seeds: Iterable | None = None, allow_edge: bool = False,
         objective: str = "final", target: float | None = None,
         column: str = "step") -> pd.DataFrame:
    """Choose ``param`` per group of ``by`` on ``split`` using the tuning ``seeds`` only.

    ``objective="final"``: best mean final ``metric`` over seeds (loss minimised, else
    maximised), after first preferring the value with the fewest diverged runs — a
    divergence counts as worse than any finished run. ``"speed"``: smallest restricted mean
    time to ``target`` (:func:`survival_summary`, common horizon); ``"reached"``: largest
    fraction reached, then smallest restricted mean. For speed a diverged run counts as not
    arrived. Ties go to the smaller value.

    ``seeds`` default to every seed not in ``report_seeds``; overlapping sets raise
    ValueError. A choice at either end of its group's grid raises :class:`GridEdgeError`
    unless ``allow_edge`` (then ``at_edge`` says so). Returns ``by + [param, "score", "n",
    "n_diverged", "at_edge"]`` (+ ``fraction_reached``, ``restricted_mean``, ``horizon``
    for speed); ``attrs`` keep ``keys``, ``tuning_seeds`` and ``report_seeds`` for
    :func:`select`.
    """
    by, report = _cols(by), set(report_seeds or ())
    tuning = set(df[seed]) - report if seeds is None else set(seeds)
    if tuning & report:
        raise ValueError(f"tuning and reporting seeds overlap: {sorted(tuning & report)}")
    if not tuning or not tuning <= set(df[seed]):
        raise ValueError(f"tuning seeds {sorted(tuning)} not all in the table")
    keys = by + [param, seed]
    sub = df[df[seed].isin(tuning)]
    if objective == "final":
        runs = final(sub, split=split, metric=metric, keys=keys)
        lower = "loss" in metric
        score = runs.groupby(by + [param], sort=False).agg(
            score=(metric, "mean"), n=(metric, "size"), n_diverged=("diverged", "sum")).reset_index()
        order, asc = ["n_diverged", "score"], [True, lower]
    elif objective in ("speed", "reached"):
        if target is None:
            raise ValueError(f"objective={objective!r} needs a target")
        ttt = time_to_target(sub, target, split=split, metric=metric, keys=keys, column=column)
        ttt.loc[ttt["diverged"], ["reached", "time"]] = [False, math.nan]
        score = survival_summary(ttt, by=by + [param])
        score["n_diverged"] = ttt.groupby(by + [param], sort=False)["diverged"].sum().to_numpy()
        score["score"] = score["restricted_mean"]
        order = ["restricted_mean"] if objective == "speed" else ["fraction_reached", "restricted_mean"]
        asc = [True] if objective == "speed" else [False, True]
    else:
        raise ValueError(f"objective must be 'final', 'speed' or 'reached', got {objective!r}")
    ranked = score.sort_values(order + [param], ascending=asc + [True], kind="stable")
    pick = ranked.groupby(by, sort=False).head(1) if by else ranked.head(1)
    grid = score.groupby(by, sort=False)[param] if by else None
    lo = grid.transform("min") if by else score[param].min()
    hi = grid.transform("max") if by else score[param].max()
    edge = (score[param] == lo) | (score[param] == hi)
    pick = pick.assign(at_edge=edge.loc[pick.index].to_numpy()).reset_index(drop=True)
    if not allow_edge and pick["at_edge"].any():
        bad = pick[pick["at_edge"]]
        raise GridEdgeError("; ".join(
            f"{dict(zip(by, r[by])) or 'all'}: best {param}={r[param]} is at the edge of the grid "
            f"{sorted(score.loc[(score[by] == r[by]).all(axis=1) if by else score.index, param])}"
            for _, r in bad.iterrows()) + " (widen the grid, or pass allow_edge=True)")
    pick.attrs.update(keys=by + [param], tuning_seeds=sorted(tuning), report_seeds=sorted(report))
    return pick


def select(df: pd.DataFrame, choice: pd.DataFrame, *, on: Sequence[str] | None = None,
           seed: str = "seed", seeds: Iterable | None = None) -> pd.DataFrame:
    """The rows of ``df`` run at the values :func:`tune` chose, restricted to the reporting
    ``seeds`` (default: the ``report_seeds`` recorded by :func:`tune`, if any). Raises
    ValueError if a reporting seed was also a tuning seed."""
    on = _cols(on if on is not None else choice.attrs.get("keys", ()))
    if not on:
        raise ValueError("select needs `on` (the key columns of the choice)")
    seeds = set(seeds if seeds is not None else choice.attrs.get("report_seeds") or ())
    leak = seeds & set(choice.attrs.get("tuning_seeds", ()))
    if leak:
        raise ValueError(f"reporting seeds {sorted(leak)} were used for tuning")
    out = df.merge(choice[on], on=on, how="inner")
    return out[out[seed].isin(seeds)].reset_index(drop=True) if seeds else out


# --- calibration ---------------------------------------------------------------------------

def reliability(probs: Tensor, labels: Tensor, n_bins: int = 15) -> pd.DataFrame:
    """Reliability table: examples binned by confidence (the top probability) into
    ``n_bins`` equal-width bins of [0, 1]; per non-empty bin ``count``, mean
    ``confidence`` and ``accuracy``."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be ≥ 1, got {n_bins}")
    probs, labels = torch.as_tensor(probs).detach().cpu().double(), torch.as_tensor(labels).detach().cpu()
    if probs.dim() != 2 or labels.dim() != 1 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError("probs must be (N, classes) and labels (N,) with N ≥ 1")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative (pass softmax outputs)")
    if not torch.allclose(probs.sum(1), torch.ones(len(probs), dtype=probs.dtype), atol=1e-4):
        raise ValueError("each row of probs must sum to 1 (pass softmax outputs, not logits)")
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    # bin b holds confidences in (b/n, (b+1)/n]; confidence 0 cannot occur for a softmax
    bins = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = bins == b
        if m.any():
            rows.append(dict(bin=b, lo=b / n_bins, hi=(b + 1) / n_bins, count=int(m.sum()),
                             confidence=float(conf[m].mean()), accuracy=float(correct[m].mean())))
    return pd.DataFrame(rows)


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE = Σ_bins (n_b / N) · |accuracy_b − confidence_b| over ``n_bins`` equal-width
    confidence bins (Guo et al. 2017's estimator). 0 is perfectly calibrated."""
    t = reliability(probs, labels, n_bins)
    return float((t["count"] / t["count"].sum() * (t["accuracy"] - t["confidence"]).abs()).sum())
