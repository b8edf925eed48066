"""Mechanics of Part I's experiments and helpers (bnlib/experiments/foundations.py)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from bnlib import reference
from bnlib.config import override
from bnlib.experiments import foundations as fd
from bnlib.experiments import get
from bnlib.models import MLPSpec
from bnlib.train import TrainSpec, fit


def _problem(n=6, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = 4 * rng.standard_normal((n, d)) + 3
    gamma, beta = rng.standard_normal(d), rng.standard_normal(d)
    out, cache = reference.batchnorm_forward(x, gamma, beta)
    return x, gamma, beta, rng.standard_normal((n, d)), cache


def test_relative_error():
    a = np.array([1.0, 2.0])
    assert fd.relative_error(a, a) == 0.0
    assert fd.relative_error(a, -a) == pytest.approx(1.0)
    assert fd.relative_error(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError):
        fd.relative_error(a, np.ones(3))
    with pytest.raises(ValueError):
        fd.relative_error(a, np.array([1.0, np.nan]))


def test_autograd_matches_closed_form_and_buggy_backward_is_caught_only_by_random_dout():
    x, gamma, beta, dout, cache = _problem()
    ours = reference.batchnorm_backward(dout, cache)
    auto = fd.autograd_batchnorm_grads(x, gamma, beta, dout)
    for a, b in zip(ours, auto):
        assert fd.relative_error(a, b) < 1e-12
    ones = np.ones_like(dout)
    good = reference.batchnorm_backward(ones, cache)[0]
    bad = fd.backward_without_variance_path(ones, cache)[0]
    assert np.abs(good).max() < 1e-12 and np.abs(bad).max() < 1e-12   # the trap: both zero
    assert fd.relative_error(fd.backward_without_variance_path(dout, cache)[0], ours[0]) > 1e-2
    with pytest.raises(ValueError):
        fd.autograd_batchnorm_grads(x, gamma, beta, dout[:2])


def test_backward_peak_memory_and_bad_impl():
    assert fd.backward_peak_memory(512, 64, "closed form") < fd.backward_peak_memory(512, 64, "naive")
    with pytest.raises(ValueError):
        fd.backward_peak_memory(8, 4, "fast")


def test_backward_timing_is_tidy_and_registered():
    cfg = override(fd.BackwardTimingConfig(), {"sizes": ((8, 4), (16, 8)), "repeats": 3, "number": 1})
    df = fd.backward_timing(cfg)
    assert list(df.columns) == ["n", "d", "impl", "repeat", "seconds", "max_abs_diff"]
    assert len(df) == 2 * 2 * 3 and (df["seconds"] >= 0).all()
    assert (df["max_abs_diff"] < 1e-12).all()
    sp = fd.timing_speedups(df)
    assert list(sp["entries"]) == [32, 128] and (sp["repeats"] == 3).all()
    assert get("backward_timing").chapter == "02_backward_pass"
    assert len(fd.BackwardTimingConfig.full().sizes) > len(cfg.sizes)
    with pytest.raises(ValueError):
        fd.backward_timing(dataclasses.replace(cfg, repeats=0))


def test_feature_distributions_standardises():
    df = fd.feature_distributions(pixel_ranks=(0, 5), units=(0, 1), batch_size=64, width=8)
    after = df[df["stage"] == "after BN"].groupby(["source", "feature"])["value"]
    assert np.allclose(after.mean(), 0, atol=1e-5)
    assert np.allclose(after.std(ddof=0), 1, atol=1e-3)
    with pytest.raises(ValueError):
        fd.feature_distributions(units=(99,), width=8)


def test_sigmoid_linear_r2():
    assert fd.sigmoid_linear_r2(1.0, n=2000) > fd.sigmoid_linear_r2(5.0, n=2000)
    with pytest.raises(ValueError):
        fd.sigmoid_linear_r2(0.0)


def test_ema_conventions_agree():
    v = np.arange(10.0)
    assert np.allclose(fd.ema(v, 0.1, convention="torch"), fd.ema(v, 0.9, convention="keras"))
    assert fd.ema([5.0], 1.0)[-1] == 5.0
    with pytest.raises(ValueError):
        fd.ema(v, 0.1, convention="jax")
    with pytest.raises(ValueError):
        fd.ema(v, 1.5)


def test_probes_set_momentum_and_track_without_touching_the_model():
    spec = MLPSpec(depth=2, width=16, norm="batch")
    tracker_x = torch.randn(100, 64)
    tracker = fd.EMATracker(tracker_x, every=2, batch_size=32)
    hist = fit(spec, TrainSpec(steps=4, batch_size=32, eval_every=4, eval_splits=()), "digits", 0,
               callbacks=[fd.SetBNMomentum(0.5), tracker])
    net = hist.attrs["model"]
    assert all(bn.momentum == 0.5 for bn in fd.batchnorm_layers(net))
    assert sorted({r["step"] for r in tracker.rows}) == [2, 4] and len(tracker.rows) == 4
    err = fd.statistics_error(net, net)
    assert list(err["layer"]) == [1, 2] and (err[["mean_error", "var_log_ratio"]] == 0).all().all()
    other = copy.deepcopy(net)
    other.blocks[0].norm.running_mean += 1.0
    assert fd.statistics_error(other, net).loc[0, "mean_error"] > 0
    with pytest.raises(ValueError):
        fd.statistics_error(net, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        fd.SetBNMomentum(0.0)


def test_inference_statistics_tiny():
    cfg = override(fd.InferenceStatsConfig(), {
        "data": "digits", "seeds": (0,), "model.width": 16, "model.depth": 2, "train.steps": 6,
        "train.batch_size": 32, "samples": (64,), "track_points": 3, "track_seeds": 1})
    cfg = dataclasses.replace(cfg, arms={"tiny": {}, "slow": {"train.steps": 4, "bn_momentum": 0.01}})
    df = fd.inference_statistics(cfg)
    assert set(df.columns) == {"regime", "seed", "step", "method", "samples", "layer", "metric", "value"}
    acc = df[df["metric"] == "test_accuracy"]
    assert fd.method_order(acc["method"]) == ["EMA", "precise (64)", "precise (all)", "batch stats",
                                               "batch stats, class-sorted"]
    ema_steps = sorted(df[(df["method"] == "EMA") & (df["metric"] == "mean_error")
                          & (df["regime"] == "tiny")]["step"].unique())
    assert ema_steps == [2, 4, 6]
    full = df[(df["method"] == "precise (all)") & (df["metric"] == "mean_error")]
    assert (full["value"] == 0).all()
    sub = df[(df["method"] == "precise (64)") & (df["metric"] == "mean_error")]
    assert (sub["value"] > 0).all()
    assert get("inference_statistics").chapter == "03_train_vs_inference"
    assert fd.InferenceStatsConfig.full().data == "mnist"
    with pytest.raises(ValueError):
        fd.inference_statistics(dataclasses.replace(cfg, samples=(1,)))
