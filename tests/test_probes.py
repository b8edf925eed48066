"""bnlib.probes: activation statistics, percentile tracking, gradient and weight norms —
all without changing the model's training state."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlib import data as datasets
from bnlib import models, probes
from bnlib import nn as bnn
from bnlib.train import seeded, train


@pytest.fixture
def net():
    model = seeded(0, lambda: models.mlp(6, 3, depth=3, width=10, norm="batch"))
    model(torch.randn(32, 6) * 2 + 1)  # non-trivial running statistics
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_frozen_batchnorm_buffers_restores_running_stats(net):
    before = _state(net)
    with probes.frozen_batchnorm_buffers(net):
        net.train()
        net(torch.randn(16, 6) + 5)
        assert not torch.equal(net.blocks[0].norm.running_mean, before["blocks.0.norm.running_mean"])
    _assert_unchanged(net, before)


def test_capture_inputs_and_outputs_and_removes_hooks(net):
    act = net.blocks[1].act
    x = torch.randn(8, 6)
    with probes.capture({"act": act}, "input") as seen_in, probes.capture({"act": act}, "output") as seen_out:
        net(x)
    torch.testing.assert_close(seen_out["act"], F.relu(seen_in["act"]))
    assert not act._forward_hooks
    with pytest.raises(ValueError, match="what"):
        with probes.capture({"act": act}, "gradient"):
            pass


@pytest.mark.parametrize("train_mode", [None, True, False])
def test_activation_stats(net, train_mode):
    net.eval()
    before = _state(net)
    x = torch.randn(64, 6)
    mods = {f"act{i}": b.act for i, b in enumerate(net.blocks)}
    df = probes.activation_stats(net, x, mods, train_mode=train_mode, percentiles=(10, 50, 90))
    assert list(df.columns) == ["module", "mean", "var", "p10", "p50", "p90"]
    assert list(df["module"]) == list(mods)
    _assert_unchanged(net, before)
    assert not net.training  # mode restored
    # the numbers are those of the captured input, in the requested mode
    net.train(bool(train_mode))
    with probes.frozen_batchnorm_buffers(net), probes.capture(mods) as seen:
        net(x)
    net.eval()
    t = seen["act1"]
    row = df.set_index("module").loc["act1"]
    assert row["mean"] == pytest.approx(t.mean().item(), rel=1e-5, abs=1e-6)
    assert row["var"] == pytest.approx(t.var().item(), rel=1e-5)
    assert row["p50"] == pytest.approx(torch.quantile(t.flatten(), 0.5).item(), rel=1e-5, abs=1e-6)
    assert row["p10"] <= row["p50"] <= row["p90"]
    if train_mode:  # BN before the activation: its input is normalised per unit in train mode
        assert abs(row["mean"]) < 1e-5


def test_percentile_tracker_during_training():
    gm = datasets.load("gaussian_mixture", n=300, dim=6, classes=3)
    net = seeded(0, lambda: models.mlp(6, 3, depth=2, width=8, norm="batch"))
    probe_x = gm.val.x[:50]
    tracker = probes.PercentileTracker(net.blocks[-1].act, probe_x, unit=2, every=4)
    train(net, gm, steps=12, batch_size=32, device="cpu", callbacks=[tracker])
    df = tracker.frame()
    assert list(df["step"]) == [0, 4, 8, 12]
    assert list(df.columns) == ["step", "p15", "p50", "p85"]
    assert (df["p15"] <= df["p50"]).all() and (df["p50"] <= df["p85"]).all()
    # recording leaves the buffers and mode alone
    before = _state(net)
    tracker.record(99, net)
    _assert_unchanged(net, before)
    assert not net.training
    assert df["p50"].abs().max() < 1.0  # BN-normalised unit: median near 0


def test_gradient_norms_match_autograd_and_leave_state(net):
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    net.eval()
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    before = _state(net)
    norms = probes.gradient_norms(net, x, y)
    assert norms.shape == (4,)  # three blocks and the head, input side first
    _assert_unchanged(net, before)
    assert not net.training
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in net.parameters())
    twin = copy.deepcopy(net).train()
    loss = F.cross_entropy(twin(x), y)
    grads = torch.autograd.grad(loss, [layer.weight for layer in twin.weight_layers()])
    np.testing.assert_allclose(norms, [g.norm().item() for g in grads], rtol=1e-5)
    mse = probes.gradient_norms(net, x, F.one_hot(y, 3).float(), layers=[net.head], loss=F.mse_loss)
    assert mse.shape == (1,) and mse[0] > 0


def test_weight_norms(net):
    norms = probes.weight_norms(net)
    np.testing.assert_allclose(norms, [layer.weight.norm().item() for layer in net.weight_layers()])
    lin = nn.Linear(3, 3)
    assert probes.weight_norms(net, [lin])[0] == pytest.approx(lin.weight.norm().item())


@pytest.mark.cuda
def test_probes_on_cuda(net):
    net = net.cuda()
    x = torch.randn(32, 6, device="cuda")
    df = probes.activation_stats(net, x, {"act": net.blocks[0].act})
    assert np.isfinite(df[["mean", "var", "p15", "p50", "p85"]].to_numpy()).all()
    norms = probes.gradient_norms(net, x, torch.randint(0, 3, (32,), device="cuda"))
    assert np.isfinite(norms).all()


def test_loss_recorder_and_probed_label_every_run():
    from bnlib.models import MLPSpec
    from bnlib.protocol import Protocol, probed
    from bnlib.train import TrainSpec
    cfg = Protocol(model=MLPSpec(depth=1, width=8), train=TrainSpec(steps=5, eval_every=5, batch_size=32),
                   seeds=(0, 1))
    made = []

    def make(acfg, data):
        made.append(probes.LossRecorder())
        return made[-1]

    df = probed(cfg, make)
    assert len(made) == 4 and set(df["record"]) == {"history", "loss"}
    steps = df[df["record"] == "loss"]
    assert list(steps.groupby(["arm", "seed"]).size()) == [5] * 4 and (steps["loss"] > 0).all()
    # the recorded mini-batch losses are the history's: the mean over the 5 steps is its "batch" loss
    hist = df[(df["record"] == "history") & (df["split"] == "batch")].set_index(["arm", "seed"])["loss"]
    mean = steps.groupby(["arm", "seed"])["loss"].mean()
    assert np.allclose(mean.loc[hist.index], hist, rtol=1e-6)


def test_dropout_disabled_restores_p():
    torch.manual_seed(0)
    net = models.mlp(6, 3, depth=2, width=16, norm="batch", dropout=0.5)
    x = torch.randn(32, 6)
    net.train()
    with probes.dropout_disabled(net):
        torch.testing.assert_close(net(x), net(x))  # no random masks in train mode
    assert all(m.p == 0.5 for m in net.modules() if isinstance(m, nn.Dropout))


def test_set_bn_momentum_sets_every_bn_before_training(net):
    probe = probes.SetBNMomentum(0.5)
    probe.on_train_start(net)
    assert all(bn.momentum == 0.5 for bn in bnn.batchnorm_layers(net))
    assert probe.frame().empty
    with pytest.raises(ValueError):
        probes.SetBNMomentum(0.0)
