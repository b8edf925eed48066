"""Mechanics of Part I's experiments (bnlib/experiments/foundations.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bnlib.config import override
from bnlib.experiments import foundations as fd
from bnlib.experiments import get
from bnlib.models import MLPSpec
from bnlib.nn import batchnorm_layers
from bnlib.probes import SetBNMomentum
from bnlib.train import TrainSpec, fit


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


def test_ema_tracker_records_without_touching_the_model():
    spec = MLPSpec(depth=2, width=16, norm="batch")
    tracker_x = torch.randn(100, 64)
    tracker = fd.EMATracker(tracker_x, every=2, batch_size=32)
    hist = fit(spec, TrainSpec(steps=4, batch_size=32, eval_every=4, eval_splits=()), "digits", 0,
               callbacks=[SetBNMomentum(0.5), tracker])
    net = hist.attrs["model"]
    assert all(bn.momentum == 0.5 for bn in batchnorm_layers(net))
    assert sorted({r["step"] for r in tracker.rows}) == [2, 4] and len(tracker.rows) == 4


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
