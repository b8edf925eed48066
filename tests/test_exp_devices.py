"""Mechanics of chapter 21's experiments (bnlib/experiments/devices.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  (imported before launch() forks; the optimizer step needs it)

from bnlib import experiments
from bnlib.experiments.devices import (DevicesConfig, PerDeviceBatchNorm1d, across_devices,
                                       equivalence, fit_devices, paired, per_device,
                                       real_runs_match, sync_cost)
from bnlib.nn import GhostBatchNorm1d
from bnlib.models import mlp
from bnlib.nn import BatchNorm1d


@pytest.mark.parametrize("shape", [(12, 5), (12, 5, 3)])
def test_per_device_is_ghost_batch_norm(shape):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    dy = torch.randn(shape, dtype=torch.float64)
    per, ghost = PerDeviceBatchNorm1d(5, 3, dtype=torch.float64), GhostBatchNorm1d(5, 4, dtype=torch.float64)
    with torch.no_grad():
        for m in (per, ghost):
            m.weight.copy_(torch.linspace(0.5, 2, 5)), m.bias.copy_(torch.linspace(-1, 1, 5))
    outs = []
    for m in (per, ghost):
        xs = x.clone().requires_grad_(True)
        y = m(xs)
        y.backward(dy)
        outs.append((y.detach(), xs.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # running statistics: those of a plain BN that saw slice 0 (rank 0's buffers)
    rank0 = BatchNorm1d(5, dtype=torch.float64)
    rank0.load_state_dict(per.state_dict() | {"running_mean": torch.zeros(5),
                                              "running_var": torch.ones(5),
                                              "num_batches_tracked": torch.tensor(0)})
    rank0(x[:4])
    torch.testing.assert_close(per.running_mean, rank0.running_mean)
    torch.testing.assert_close(per.running_var, rank0.running_var)
    assert int(per.num_batches_tracked) == 1
    per.eval()
    torch.testing.assert_close(per(x), rank0.eval()(x))
    with pytest.raises(ValueError, match="slices"):
        per.train()(x[:10])


def test_per_device_swap_keeps_state():
    net = mlp(6, 3, depth=2, width=8, norm="batch").double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    per_device(net, 4)
    assert all(type(b.norm) is PerDeviceBatchNorm1d and b.norm.devices == 4 for b in net.blocks)
    assert net.blocks[0].norm.weight.dtype == torch.float64
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_fit_and_sweep_tiny():
    row = fit_devices(seed=0, devices=4, batch_size=16, steps=3, width=8, device="cpu")
    assert row["per_device"] == 4 and 0 <= row["test_acc"] <= 1
    assert row["gap"] == pytest.approx(row["val_acc_train_mode"] - row["val_acc"])
    with pytest.raises(ValueError, match="slices"):
        fit_devices(seed=0, devices=3, batch_size=16, steps=1)
    cfg = dataclasses.replace(DevicesConfig(), devices=(1, 2), batch_size=8, steps=2, width=8,
                              seeds=(0, 1), device="cpu")
    df = across_devices(cfg)
    assert len(df) == 4 and set(df["per_device"]) == {8, 4}
    assert paired(df, "test_acc", 2).shape == (2,)
    with pytest.raises(ValueError, match="devices must include 1"):
        across_devices(dataclasses.replace(cfg, devices=(2, 3)))


def test_equivalence_matches_statsmodels():
    from statsmodels.stats.weightstats import ttost_paired
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.9, 0.01, 10), rng.normal(0.9, 0.01, 10)
    res = equivalence(a - b, margin=0.02)
    p, _, _ = ttost_paired(a, b, -0.02, 0.02)
    assert res["p"] == pytest.approx(p, rel=1e-9)
    assert res["ci_low"] < res["mean"] < res["ci_high"]
    assert not equivalence(a - b + 0.05, margin=0.02)["equivalent"]
    with pytest.raises(ValueError):
        equivalence([0.1], margin=0.02)


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
    assert all(full.batch_size % k == 0 for k in full.devices) and len(full.seeds) >= 8
