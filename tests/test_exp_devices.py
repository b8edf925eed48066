"""Mechanics of chapter 21's experiments (bnlib/experiments/devices.py)."""
from __future__ import annotations

import pytest

from bnlib import experiments
from bnlib.analysis import pairs
from bnlib.config import override
from bnlib.experiments.devices import (DevicesConfig, across_devices, fit_devices, real_runs_match,
                                       sync_cost)


def test_fit_and_sweep_tiny():
    cfg = override(DevicesConfig(), {"devices": (1, 2), "train.batch_size": 8, "train.steps": 2,
                                     "train.eval_every": 2, "model.width": 8, "seeds": (0, 1),
                                     "device": "cpu"})
    row = fit_devices(override(cfg, {"train.batch_size": 16}), 0, 4)
    assert row["per_device"] == 4 and 0 <= row["test_acc"] <= 1
    assert row["gap"] == pytest.approx(row["val_acc_train_mode"] - row["val_acc"])
    with pytest.raises(ValueError, match="slices"):
        fit_devices(override(cfg, {"train.batch_size": 16}), 0, 3)
    df = across_devices(cfg)
    assert len(df) == 4 and set(df["per_device"]) == {8, 4}
    assert pairs(df, "test_acc", 2, 1, arm="devices")[0].shape == (2,)
    with pytest.raises(ValueError, match="devices must include 1"):
        across_devices(override(cfg, {"devices": (2, 3)}))


def test_real_runs_and_cost_tiny():
    df = real_runs_match(batch_size=8, steps=3, width=8, n_train=64)
    got = df.set_index(["distributed", "single_process"])
    assert got.loc[("SyncBN", "full-batch BN"), "max_abs_diff"] < 1e-12
    assert got.loc[("per-device BN", "ghost BN"), "max_abs_diff"] < 1e-12
    assert got.loc[("per-device BN", "per-device BN (1 process)"), "max_abs_diff_running"] < 1e-12
    assert got.loc[("SyncBN", "ghost BN"), "max_abs_diff"] > 1e-6
    cost = sync_cost(shapes=((8, 4),), reps=2, repeats=1)
    assert list(cost.columns) == ["shape", "local BN", "SyncBN", "overhead_us", "ratio"]
    assert (cost[["local BN", "SyncBN"]] > 0).all().all()


def test_registered():
    exp = experiments.get("across_devices")
    assert exp.chapter == "21_across_devices"
    full = DevicesConfig.full()
    assert all(full.train.batch_size % k == 0 for k in full.devices) and len(full.seeds) >= 8
