"""bnlib.analysis on tables built by hand, against numbers worked out by hand (in the
comments). scipy is used only for Student-t quantiles and tail areas."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from bnlib import analysis as A


def run(accs, *, step=100, diverged=False, split="val", **keys):
    """One run's history on ``split``: evaluations at 0, step, 2·step, …; loss = 1 − acc,
    elapsed = step / 50 seconds (so seconds = steps / 50)."""
    return pd.DataFrame([dict(step=i * step, split=split, loss=1 - a, accuracy=a,
                              elapsed=i * step / 50, diverged=diverged, **keys)
                         for i, a in enumerate(accs)])


def table(*runs):
    return pd.concat(runs, ignore_index=True)


def ttt(rows):
    """A time-to-target table by hand: (arm, seed, time or None, budget)."""
    return pd.DataFrame([dict(arm=a, seed=s, time=math.nan if t is None else t,
                              reached=t is not None, budget=b, diverged=False)
                         for a, s, t, b in rows])


# ---------------------------------------------------------------- final values

def test_final_last_evaluation_and_diverged_is_nan():
    df = table(run([0.5, 0.7, 0.9], arm="a", seed=0),
               run([0.5, 0.6], arm="a", seed=1, diverged=True),
               run([0.6, 0.8, 0.85], arm="b", seed=0))
    f = A.final(df, split="val")
    assert list(f.columns) == ["arm", "seed", "step", "accuracy", "diverged"]
    assert f["accuracy"].iloc[0] == 0.9 and f["step"].iloc[0] == 200
    assert math.isnan(f["accuracy"].iloc[1]) and f["diverged"].iloc[1] and f["step"].iloc[1] == 100
    assert A.final(df, split="val", diverged_value=0.0)["accuracy"].iloc[1] == 0.0
    with pytest.raises(ValueError, match="split 'test' not in the table"):
        A.final(df, split="test")
    with pytest.raises(ValueError, match="never evaluated on 'test'"):
        A.final(table(df, run([0.5], arm="b", seed=1, split="test")), split="test")


def test_runs_sharing_keys_are_refused():
    df = table(run([0.5, 0.7], arm="a", seed=0, lr=0.1), run([0.5, 0.8], arm="a", seed=0, lr=1.0))
    with pytest.raises(ValueError, match="key column is missing"):
        A.final(df, split="val", keys=["arm", "seed"])


# ---------------------------------------------------------------- time to target

def test_crossing_is_interpolated_between_bracketing_evaluations():
    df = run([0.5, 0.7, 0.9, 0.95], arm="a", seed=0)
    # 0.8 lies between step 100 (0.7) and step 200 (0.9): 100 + (0.8-0.7)/(0.9-0.7)·100 = 150
    t = A.time_to_target(df, 0.8)
    assert t["time"].iloc[0] == pytest.approx(150) and t["reached"].iloc[0]
    assert t["budget"].iloc[0] == 300
    # without interpolation: the first evaluation at or above the target
    assert A.time_to_target(df, 0.8, interpolate=False)["time"].iloc[0] == 200
    # seconds: elapsed = step / 50, so 150 steps = 3.0 s
    assert A.time_to_target(df, 0.8, column="elapsed")["time"].iloc[0] == pytest.approx(3.0)
    # loss (1 − acc: 0.5, 0.3, 0.1, 0.05) reaches ≤ 0.25 between 100 (0.3) and 200 (0.1):
    # 100 + (0.25-0.3)/(0.1-0.3)·100 = 125
    assert A.time_to_target(df, 0.25, metric="loss")["time"].iloc[0] == pytest.approx(125)
    # reached at the very first evaluation: time 0, nothing to interpolate
    assert A.time_to_target(df, 0.4)["time"].iloc[0] == 0


def test_censoring_never_gives_inf():
    df = table(run([0.5, 0.7, 0.9, 0.95], arm="a", seed=0),
               run([0.5, 0.6, 0.7, 0.75], arm="a", seed=1),              # never arrives
               run([0.5, 0.6], arm="a", seed=2, diverged=True))          # stopped at 100
    t = A.time_to_target(df, 0.8)
    assert t["reached"].tolist() == [True, False, False]
    assert t["time"].isna().tolist() == [False, True, True]
    assert not np.isinf(t[["time", "budget"]].to_numpy(float)).any()
    # the never-arriving run is censored at its last evaluation; the diverged one at the
    # planned budget (the longest non-diverged run, 300), not at step 100 where it stopped
    assert t["budget"].tolist() == [300, 300, 300]
    assert A.time_to_target(df, 0.8, budget=400)["budget"].iloc[2] == 400
    # a crossing seen before the run diverged is a fact: 0.55 at 0 + (0.05/0.1)·100 = 50
    assert A.time_to_target(df, 0.55)["time"].iloc[2] == pytest.approx(50)
    # in seconds the censored text names the unit: budget 300 steps = 6 s
    r = A.time_ratio(A.time_to_target(table(df, run([0.5, 0.9, 0.9, 0.9], arm="b", seed=1)),
                                      0.8, column="elapsed").query("seed == 1"), "a", "b")
    assert str(r).startswith("no ratio: a not reached by 6 s in 1 of 1 runs")


# ---------------------------------------------------------------- survival summary

def test_restricted_mean_and_km_median_with_unequal_budgets():
    t = ttt([("a", 0, 100, 300), ("a", 1, None, 150), ("a", 2, 200, 300), ("a", 3, None, 300)])
    s = A.survival_summary(t).iloc[0]
    # KM: t=100: 4 at risk, 1 arrives → S = 3/4; the run censored at 150 leaves the risk set;
    # t=200: 2 at risk (200, 300), 1 arrives → S = 3/4 · 1/2 = 3/8.
    # horizon = largest budget 300; area = 100·1 + 100·3/4 + 100·3/8 = 212.5
    assert s["horizon"] == 300 and s["restricted_mean"] == pytest.approx(212.5)
    assert s["km_median"] == 200  # first time S ≤ 0.5
    assert (s["n"], s["n_reached"], s["fraction_reached"]) == (4, 2, 0.5)
    assert math.isnan(s["mean_time"])  # not every run arrived
    # horizon 250: 100 + 75 + 50·3/8 = 193.75
    assert A.survival_summary(t, horizon=250)["restricted_mean"].iloc[0] == pytest.approx(193.75)
    with pytest.raises(ValueError, match="exceeds every budget"):
        A.survival_summary(t, horizon=400)


def test_restricted_mean_equals_mean_of_min_with_equal_budgets():
    t = ttt([("a", 0, 100, 300), ("a", 1, 200, 300), ("a", 2, None, 300), ("a", 3, None, 300),
             ("b", 0, 50, 300), ("b", 1, 150, 300), ("b", 2, 100, 300), ("b", 3, 100, 300)])
    s = A.survival_summary(t).set_index("arm")
    # a: mean(min(T, 300)) = (100 + 200 + 300 + 300) / 4 = 225; S = 3/4 then 1/2 → median 200
    assert s.loc["a", "restricted_mean"] == pytest.approx(225) and s.loc["a", "km_median"] == 200
    # b: all arrived: restricted mean = plain mean = (50 + 150 + 100 + 100) / 4 = 100;
    # S: 3/4 at 50, 1/4 at 100 → median 100
    assert s.loc["b", "restricted_mean"] == pytest.approx(100) == s.loc["b", "mean_time"]
    assert s.loc["b", "km_median"] == 100
    one = A.survival_summary(ttt([("a", s_, t_, 300) for s_, t_ in
                                  [(0, 100), (1, None), (2, None), (3, None)]]))
    assert math.isnan(one["km_median"].iloc[0])  # S never below 3/4


# ---------------------------------------------------------------- time ratio

def test_time_ratio_paired_geometric_mean_and_interval():
    t = ttt([("a", 0, 100, 500), ("a", 1, 200, 500), ("a", 2, 400, 500),
             ("b", 2, 200, 500), ("b", 0, 200, 500), ("b", 1, 200, 500)])   # b out of order
    r = A.time_ratio(t, "a", "b")
    # ratios 0.5, 1, 2 → logs −ln2, 0, ln2: mean 0 (ratio 1), sd = ln2, se = ln2/√3
    half = stats.t.ppf(0.975, 2) * math.log(2) / math.sqrt(3)
    assert not r.censored and r.ratio == pytest.approx(1) and r.median == pytest.approx(1)
    assert (r.ci_low, r.ci_high) == pytest.approx((math.exp(-half), math.exp(half)))


def test_time_ratio_refuses_when_a_run_did_not_arrive():
    t = ttt([("a", 0, 100, 300), ("a", 1, 200, 300), ("a", 2, 250, 300),
             ("b", 0, 200, 300), ("b", 1, 200, 300), ("b", 2, None, 300)])
    r = A.time_ratio(t, "a", "b")
    assert r.censored and math.isnan(r.ratio) and (r.reached_a, r.reached_b, r.n) == (3, 2, 3)
    # restricted means to 300: a (100+200+250)/3 = 183.33, b (200+200+300)/3 = 233.33
    assert r.restricted_mean_a == pytest.approx(550 / 3)
    assert r.restricted_mean_b == pytest.approx(700 / 3)
    text = str(r)
    assert "b not reached by step 300 in 1 of 3 runs" in text
    assert "inf" not in text and "0.00" not in text and "a not reached" not in text
    with pytest.raises(ValueError, match="not paired"):
        A.time_ratio(t[~((t["arm"] == "b") & (t["seed"] == 2))], "a", "b")


# ---------------------------------------------------------------- paired differences

X = [0.90, 0.85, 0.88, 0.92]
Y = [0.86, 0.84, 0.85, 0.88]


def test_paired_difference_against_hand_t_interval():
    d = A.paired_difference(X, Y)
    # d = 0.04, 0.01, 0.03, 0.04: mean 0.03; squares of deviations 1e-4 + 4e-4 + 0 + 1e-4 = 6e-4,
    # var = 6e-4 / 3 = 2e-4, sd = 0.014142, se = sd / 2 = 0.0070711, t = 0.03 / se = 4.2426
    se = math.sqrt(2e-4) / 2
    half = stats.t.ppf(0.975, 3) * se  # 3.1824 · 0.0070711 = 0.022503
    assert d.n == 4 and d.mean == pytest.approx(0.03) and d.sd == pytest.approx(math.sqrt(2e-4))
    assert (d.ci_low, d.ci_high) == pytest.approx((0.03 - half, 0.03 + half))
    assert d.ci_low == pytest.approx(0.0075, abs=1e-4)
    assert d.p == pytest.approx(2 * stats.t.sf(0.03 / se, 3))
    assert d.p == pytest.approx(stats.ttest_rel(X, Y).pvalue)


def test_paired_inputs_are_checked():
    with pytest.raises(ValueError, match="n ≥ 2"):
        A.paired_difference([1.0], [0.5])
    with pytest.raises(ValueError, match="non-finite"):
        A.paired_difference([1.0, math.nan, 2.0], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="sd = 0"):
        A.paired_difference([1.0, 2.0], [0.5, 1.5])
    df = pd.DataFrame(dict(arm=["a", "a", "b", "b"], seed=[0, 1, 1, 0], acc=[0.9, 0.8, 0.7, 0.6]))
    x, y = A.pairs(df, "acc", "a", "b", pair_on="seed")
    assert x.tolist() == [0.9, 0.8] and y.tolist() == [0.6, 0.7]  # aligned on the seed
    with pytest.raises(ValueError, match="unmatched"):
        A.pairs(df.iloc[:3], "acc", "a", "b")


D8 = np.array([0.01, -0.02, 0.00, 0.015, -0.005, 0.01, -0.01, 0.005])  # paired differences


def test_equivalence_tost_against_a_second_computation():
    y = np.full(8, 0.8)
    x = y + D8
    mean, se = D8.mean(), D8.std(ddof=1) / math.sqrt(8)
    for margin in (0.03, 0.005):
        e = A.equivalence(x, y, margin)
        # two one-sided tests: H0 mean ≤ −m (t = (mean+m)/se) and H0 mean ≥ m (t = (mean−m)/se)
        p = max(stats.t.sf((mean + margin) / se, 7), stats.t.cdf((mean - margin) / se, 7))
        assert e.p == pytest.approx(p)
        q = stats.t.ppf(0.95, 7) * se  # 90% interval
        assert (e.ci_low, e.ci_high) == pytest.approx((mean - q, mean + q))
        inside = -margin < e.ci_low and e.ci_high < margin
        assert e.equivalent == inside == (e.p < 0.05)
    assert A.equivalence(x, y, 0.03).equivalent and not A.equivalence(x, y, 0.005).equivalent
    with pytest.raises(ValueError, match="≥ 8 paired seeds"):
        A.equivalence(x[:7], y[:7], 0.03)
    with pytest.raises(ValueError, match="margin must be > 0"):
        A.equivalence(x, y, 0.0)


def test_compare_verdicts():
    y = np.full(8, 0.8)
    up = y + 0.05 + D8  # mean +0.05, clearly above
    assert A.compare(up, y, margin=0.01).verdict == "better"
    assert A.compare(up, y, margin=0.01, higher_is_better=False).verdict == "worse"
    eq = A.compare(y + D8, y, margin=0.03)
    assert eq.verdict == "equivalent" and eq.p >= 0.05 and eq.p_tost < 0.05
    assert A.compare(y + D8, y, margin=0.005).verdict == "inconclusive"
    few = A.compare((y + D8)[:4], y[:4], margin=0.03)  # 4 seeds: no equivalence allowed
    assert few.verdict == "inconclusive" and math.isnan(few.p_tost) and "fewer than 8" in few.reason
    assert "equivalent" in eq.describe() and "n = 8" in eq.describe()


def test_compare_arms_pairs_a_tidy_table_by_seed():
    y = np.full(8, 0.8)
    up = y + 0.05 + D8
    seeds = np.arange(8)
    # rows shuffled: the verdict must come from seed-aligned pairs, not row order
    df = pd.DataFrame({"arm": ["BN"] * 8 + ["plain"] * 8, "seed": np.r_[seeds[::-1], seeds],
                       "acc": np.r_[up[::-1], y]})
    got = A.compare_arms(df, "acc", "BN", "plain", margin=0.01, name="BN − plain")
    ref = A.compare(up, y, margin=0.01, name="BN − plain")
    assert got.verdict == ref.verdict == "better"
    assert got.diff.mean == pytest.approx(0.05 + D8.mean()) and got.p == pytest.approx(ref.p)
    worse = A.compare_arms(df, "acc", "BN", "plain", margin=0.01, higher_is_better=False)
    assert worse.verdict == "worse"
    with pytest.raises(ValueError, match="not paired"):
        A.compare_arms(df[df["seed"] != 3].iloc[1:], "acc", "BN", "plain", margin=0.01)


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max
    # 0.02, 0.03, 0.06, 0.06; back in input order:
    reject, adj = A.holm(p)
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert reject.tolist() == [True, False, False, True]
    # a second computation: statsmodels; 0.6 is 3rd smallest of 5: 0.6·3 = 1.8, capped at 1
    from statsmodels.stats.multitest import multipletests
    q = [0.6, 0.001, 0.7, 0.02, 0.9]
    ref_reject, ref_adj, _, _ = multipletests(q, alpha=0.05, method="holm")
    reject, adj = A.holm(q)
    assert adj == pytest.approx(ref_adj) and reject.tolist() == ref_reject.tolist()
    assert adj[0] == 1.0


def test_compare_family_applies_holm():
    y = np.full(8, 0.8)
    fam = {"relu": (y + 0.05 + D8, y), "gelu": (y + 0.011 + D8, y),
           "tanh": (y + D8, y), "silu": (y - 0.002 + D8, y)}
    raw = {k: A.compare(x, b, margin=0.03) for k, (x, b) in fam.items()}
    out = A.compare_family(fam, margin=0.03)
    # gelu alone is "better" (p ≈ 0.03) but not after Holm over 4 comparisons
    assert raw["gelu"].verdict == "better" and 0.01 < raw["gelu"].p < 0.05
    ps = sorted(c.p for c in raw.values())
    k = ps.index(raw["gelu"].p)  # its rank: adjusted = max over ranks ≤ k of (4 − j)·p_j
    assert out["gelu"].p == pytest.approx(min(1, max((4 - j) * ps[j] for j in range(k + 1))))
    assert out["gelu"].verdict != "better" and out["relu"].verdict == "better"
    assert out["tanh"].verdict == "equivalent" and "Holm over 4" in out["tanh"].reason


# ---------------------------------------------------------------- tuning

def grid_table():
    """arm a over lr ∈ {0.01, 0.1, 1}; tuning seeds 0, 1; reporting seed 2."""
    acc = {0.01: [0.80, 0.82, 0.95], 0.1: [0.90, 0.88, 0.70], 1.0: [None, 0.99, 0.60]}
    runs = []
    for lr, finals in acc.items():
        for seed, f in enumerate(finals):
            runs.append(run([0.5, 0.95] if f is None else [0.5, f], arm="a", lr=lr, seed=seed,
                            diverged=f is None))
    return table(*runs)


def test_tune_picks_best_mean_and_counts_divergence_worst():
    df = grid_table()
    pick = A.tune(df, report_seeds=[2])
    # means over seeds 0, 1: 0.01 → 0.81, 0.1 → 0.89, 1 → 0.99 over one finished seed but one
    # diverged run (its 0.95 before diverging does not count) → 0.1 wins; seed 2 would say 0.01
    assert pick["lr"].tolist() == [0.1] and pick["score"].iloc[0] == pytest.approx(0.89)
    assert pick["n_diverged"].tolist() == [0] and not pick["at_edge"].iloc[0]
    rows = A.select(df, pick)
    assert set(rows["seed"]) == {2} and set(rows["lr"]) == {0.1}
    with pytest.raises(ValueError, match="used for tuning"):
        A.select(df, pick, seeds=[1, 2])


def test_tune_refuses_grid_edge_and_overlapping_seeds():
    df = grid_table()
    b = df[df["lr"] == 0.01].assign(arm="b", accuracy=lambda d: d["accuracy"] + 0.1)
    both = pd.concat([df, b, df[df["lr"] == 0.1].assign(arm="b")], ignore_index=True)
    with pytest.raises(A.GridEdgeError, match=r"'arm': 'b'.*lr=0.01.*\[0.01, 0.1\]"):
        A.tune(both, report_seeds=[2])
    pick = A.tune(both, report_seeds=[2], allow_edge=True).set_index("arm")
    assert pick.loc["b", "lr"] == 0.01 and pick.loc["b", "at_edge"] and not pick.loc["a", "at_edge"]
    with pytest.raises(ValueError, match=r"overlap: \[1\]"):
        A.tune(df, seeds=[0, 1], report_seeds=[1, 2])
    assert issubclass(A.GridEdgeError, ValueError)


def test_tune_on_speed_with_censoring_and_divergence():
    runs = []
    for seed in (0, 1):
        runs.append(run([0.5, 0.7, 0.8], arm="a", lr=0.01, seed=seed))      # never 0.85
        runs.append(run([0.5, 0.9, 0.95], arm="a", lr=0.1, seed=seed))      # 87.5 steps
    runs.append(run([0.5, 0.95], arm="a", lr=1.0, seed=0, diverged=True))   # crossed, diverged
    runs.append(run([0.5, 0.95, 0.97], arm="a", lr=1.0, seed=1))            # 77.8 steps
    df = table(*runs)
    pick = A.tune(df, objective="speed", target=0.85)
    # 0.1: 0 + (0.85−0.5)/(0.9−0.5)·100 = 87.5 both seeds; 0.01: censored at 200 → 200;
    # 1.0: diverged counts as not arrived → (200 + 35/45·100) / 2 = 138.9
    assert pick["lr"].tolist() == [0.1] and pick["restricted_mean"].iloc[0] == pytest.approx(87.5)
    assert pick["fraction_reached"].iloc[0] == 1.0
    assert A.tune(df, objective="reached", target=0.85)["lr"].tolist() == [0.1]
    with pytest.raises(ValueError, match="needs a target"):
        A.tune(df, objective="speed")


# --- calibration -------------------------------------------------------------------------

def test_ece_known_values():
    labels = torch.tensor([0, 0, 0, 0])
    perfect = torch.tensor([[1.0, 0.0]] * 4)
    assert A.expected_calibration_error(perfect, labels) == pytest.approx(0.0)
    # confidence 0.9 everywhere, half right: |0.5 − 0.9| = 0.4
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert A.expected_calibration_error(probs, labels) == pytest.approx(0.4)
    t = A.reliability(probs, labels, n_bins=10)
    assert t["count"].sum() == 4 and len(t) == 1
    with pytest.raises(ValueError):
        A.expected_calibration_error(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError):
        A.expected_calibration_error(perfect, torch.tensor([0, 0]))
