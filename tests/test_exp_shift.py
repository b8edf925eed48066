"""Mechanics of chapter 20's experiment (bnlib/experiments/shift.py)."""
from __future__ import annotations


import pytest

from bnlib import experiments
from bnlib.experiments.shift import ShiftConfig, bn_under_shift


def test_bn_under_shift_tiny_run():
    assert experiments.get("bn_under_shift").chapter == "20_shift"
    cfg = ShiftConfig(seeds=(0,), steps=3, channels=4, noise=(0.5,), contrast=(2.0,), offset=(1.0,),
                      severity_batch_sizes=(2,), sweep_conditions=(("offset", 1.0),),
                      test_batch_sizes=(1, 64), priors=(0.0, 16.0), device="cpu")
    df = bn_under_shift(cfg)
    assert set(df.columns) == {"seed", "shift", "level", "method", "batch_size", "prior", "accuracy"}
    assert set(df["method"]) == {"running", "recomputed", "adapted", "batch"}
    # 4 conditions × 3 whole-set methods + 4 × B=2 + offset's extra (1, 0), (1, 16), (64, 0), (64, 16)
    assert len(df) == 4 * 3 + 4 + 4
    assert df["accuracy"].between(0, 1).all()
    # contrast: with bias-free convolutions, batch statistics make it invisible
    b2 = df[(df["method"] == "batch") & (df["batch_size"] == 2)].set_index("shift")["accuracy"]
    assert b2["contrast"] == pytest.approx(b2["none"])


def test_bn_under_shift_resumes_from_finished_seeds(tmp_path, monkeypatch):
    """Under checkpointing, a seed whose model was trained and measured is not trained again."""
    from bnlib import cache
    from bnlib.experiments import shift
    calls = []
    real = shift.fit
    monkeypatch.setattr(shift, "fit", lambda cfg, seed: calls.append(seed) or real(cfg, seed))
    cfg = ShiftConfig(seeds=(0, 1), steps=2, channels=4, noise=(0.5,), contrast=(2.0,), offset=(1.0,),
                      severity_batch_sizes=(2,), sweep_conditions=(), test_batch_sizes=(64,),
                      priors=(0.0,), device="cpu")
    with cache.checkpointing(tmp_path):
        first = bn_under_shift(cfg)
    with cache.checkpointing(tmp_path):
        again = bn_under_shift(cfg)
    assert calls == [0, 1] and first.equals(again)
