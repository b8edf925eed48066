"""Mechanics of chapter 4's experiments and of the shared timing harness (tiny configs)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bnlib.experiments import get
from bnlib.experiments.speed import (IoffeConfig, SpeedConfig, best_lr, build_model, histories,
                                     ioffe_mnist, paired_ratio, run_summary, speed, step_phases,
                                     time_interleaved, time_to_target, timing_summary, timings)


def test_time_interleaved_rows_and_self_timed_functions():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1
        return 0.25  # a function may report its own duration

    df = time_interleaved({"a": a, "b": b}, repeats=4, number=3, warmup=1)
    assert len(df) == 8 and set(df["name"]) == {"a", "b"}
    assert calls == {"a": 13, "b": 13}  # 1 warm-up + 4 repeats × 3 calls
    assert np.allclose(df.loc[df["name"] == "b", "seconds"], 0.25)
    summary = timing_summary(df)
    assert set(summary.columns) >= {"name", "median_us", "q25_us", "q75_us", "n"}
    r = paired_ratio(df.assign(seconds=np.where(df["name"] == "a", 0.5, 0.25)), "a", "b")
    assert r["median"] == pytest.approx(2.0) and r["n"] == 4
    with pytest.raises(ValueError):
        time_interleaved({}, repeats=1)
    with pytest.raises(ValueError):
        time_interleaved({"a": a}, repeats=0)
    with pytest.raises(ValueError):
        paired_ratio(df, "a", "zzz")


def test_step_phases_train_the_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    phases = step_phases(net, x, y, lr=0.1, momentum=0.0)
    assert set(phases) == {"forward", "backward", "step"}
    before = net[0].weight.clone()
    assert isinstance(phases["backward"](), float)
    phases["step"]()
    assert not torch.equal(before, net[0].weight)


def _history(steps_acc: list[tuple[int, float]], split: str = "val") -> pd.DataFrame:
    return pd.DataFrame([dict(step=s, split=sp, loss=1 - a, accuracy=a, elapsed=s * 0.01)
                         for s, a in steps_acc for sp in ("val", "test")]).assign(diverged=False)


def test_run_summary_and_best_lr_pick_the_faster_rate():
    fast = _history([(0, 0.1), (10, 0.96), (20, 0.97)])
    slow = _history([(0, 0.1), (10, 0.5), (20, 0.96)])
    never = _history([(0, 0.1), (10, 0.2), (20, 0.3)])
    hist = pd.concat([fast.assign(arm="BN", lr=0.1, seed=0), slow.assign(arm="BN", lr=0.01, seed=0),
                      slow.assign(arm="no BN", lr=0.1, seed=0),
                      never.assign(arm="no BN", lr=0.01, seed=0)])
    s = run_summary(hist, 0.95)
    assert s.loc[(s["arm"] == "no BN") & (s["lr"] == 0.01), "steps"].item() == math.inf
    assert s.loc[(s["arm"] == "no BN") & (s["lr"] == 0.01), "speed"].item() == 0.0
    best = best_lr(s)
    assert dict(zip(best["arm"], best["lr"])) == {"BN": 0.1, "no BN": 0.1}
    timing = pd.DataFrame({"arm": ["BN", "BN", "no BN", "no BN"], "repeat": [0, 1, 0, 1],
                           "seconds": [2.0, 2.0, 1.0, 1.0]})
    tt = time_to_target(s, timing, best)
    assert tt.set_index("arm")["seconds"].to_dict() == {"BN": 20.0, "no BN": 20.0}
    with pytest.raises(ValueError):
        run_summary(hist, 1.5)


def test_speed_tiny_run():
    cfg = dataclasses.replace(SpeedConfig.quick(), seeds=(0,), lrs=(0.05,), steps=20,
                              eval_every=10, depth=2, width=16, target=0.3,
                              timing_repeats=2, timing_number=1)
    df = speed(cfg)
    hist, tm = histories(df), timings(df)
    assert set(hist["arm"]) == {"BN", "no BN"} and set(hist["split"]) >= {"val", "test"}
    assert hist["step"].max() == 20
    assert len(tm) == 4 and set(tm["phase"]) == {"step"} and (tm["seconds"] > 0).all()
    assert (df["target"] == 0.3).all()
    s = run_summary(hist, cfg.target)
    assert len(s) == 2 and len(time_to_target(s, tm, best_lr(s))) == 2
    with pytest.raises(ValueError):
        build_model(dataclasses.replace(cfg, arch="rnn"), None, "none")
    with pytest.raises(ValueError):
        speed(dataclasses.replace(cfg, lrs=()))
    assert get("speed").config is SpeedConfig


def test_ioffe_tiny_run_records_percentiles():
    cfg = dataclasses.replace(IoffeConfig.quick(), data="digits", seeds=(0,), lrs=(0.5,),
                              init_stds=(0.1,), steps=20, eval_every=10, probe_every=10,
                              probe_size=32)
    df = ioffe_mnist(cfg)
    pct = df[df["kind"] == "percentile"]
    assert set(pct["arm"]) == {"BN", "no BN"}
    assert sorted(pct["step"].unique()) == [0, 10, 20]
    assert (pct["p15"] <= pct["p50"]).all() and (pct["p50"] <= pct["p85"]).all()
    assert set(histories(df)["split"]) >= {"val", "test"}
    with pytest.raises(ValueError):
        ioffe_mnist(dataclasses.replace(cfg, init_stds=(0.0,)))
