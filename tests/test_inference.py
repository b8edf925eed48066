"""bnlib.inference: precise BN (recompute_batchnorm_stats), batch_statistics, the running
averages (ema, statistics_error, recompute_in_train_mode) and test-time statistics
(adapt_batchnorm_stats, grouped_accuracy)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from bnlib import models
from bnlib import nn as bnn
from bnlib.inference import (_mixed_hook, adapt_batchnorm_stats, batch_statistics, ema, grouped_accuracy,
                             recompute_batchnorm_stats, recompute_in_train_mode, statistics_error)


def _net(impl="bnlib", dropout=0.0):
    torch.manual_seed(0)
    return models.mlp(5, 3, depth=2, width=6, norm="batch", norm_impl=impl, dropout=dropout)


def _bn_inputs(model, x):
    """What each BN layer sees on ``x`` (train mode, buffers untouched)."""
    from bnlib.probes import capture, frozen_batchnorm_buffers
    layers = bnn.batchnorm_layers(model)
    was = model.training
    model.train()
    with frozen_batchnorm_buffers(model), capture({str(i): m for i, m in enumerate(layers)}) as seen:
        model(x)
    model.train(was)
    return [seen[str(i)] for i in range(len(layers))]


def _eval_bn_inputs(model, x):
    """Every BN's input on ``x`` in one eval-mode pass (what inference will feed it)."""
    seen = []
    hooks = [bn.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().double()))
             for bn in bnn.batchnorm_layers(model)]
    model.eval()(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("impl", ["bnlib", "torch"])
def test_precise_bn_is_exact_over_the_data(impl):
    """Pooled over chunks of 16 (a short last chunk included) = computed on all of x at once."""
    model = _net(impl)
    model.blocks[0].norm.momentum = 0.3
    x = torch.randn(70, 5) * 3 + 2
    for _ in range(3):  # stale, lagging running statistics
        model.train()(torch.randn(16, 5))
    tracked = [int(bn.num_batches_tracked) for bn in bnn.batchnorm_layers(model)]
    out = recompute_batchnorm_stats(model, x, batch_size=16)
    assert out is model and not model.training
    assert model.blocks[0].norm.momentum == 0.3 and model.blocks[1].norm.momentum == 0.1
    assert [int(bn.num_batches_tracked) for bn in bnn.batchnorm_layers(model)] == tracked
    # each BN's statistics are the mean and unbiased variance of the input it sees in eval
    # mode, over the whole of x: the spread of the chunk means is included, the last chunk
    # of 6 weighs 6/70
    for bn, h in zip(bnn.batchnorm_layers(model), _eval_bn_inputs(model, x)):
        torch.testing.assert_close(bn.running_mean, h.mean(0).float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, h.var(0).float(), rtol=1e-5, atol=1e-5)


def test_precise_bn_max_samples():
    model = _net()
    x = torch.randn(50, 5)
    recompute_batchnorm_stats(model, x, batch_size=16, max_samples=33)
    h = _eval_bn_inputs(model, x[:33])[0]
    torch.testing.assert_close(model.blocks[0].norm.running_mean, h.mean(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.blocks[0].norm.running_var, h.var(0).float(), rtol=1e-5, atol=1e-5)


def test_precise_bn_errors():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recompute_batchnorm_stats(models.mlp(5, 3), torch.randn(8, 5))
    with pytest.raises(ValueError, match="batch_size"):
        recompute_batchnorm_stats(_net(), torch.randn(8, 5), batch_size=1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        recompute_batchnorm_stats(_net(), torch.randn(8, 5), max_samples=1)
    model = nn.Sequential(nn.Linear(5, 4), bnn.BatchNorm1d(4), nn.ReLU(),
                          bnn.BatchNorm1d(4, track_running_stats=False))
    model.train()(torch.randn(8, 5) + 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="track_running_stats=False"):
        recompute_batchnorm_stats(model, torch.randn(8, 5))
    for k, v in model.state_dict().items():  # nothing was reset before the error
        assert torch.equal(v, before[k]), k
    assert model[1].momentum == 0.1


def test_precise_bn_improves_a_stale_model():
    """Running statistics from another input distribution: precise BN fixes eval outputs."""
    model = _net()
    x = torch.randn(256, 5) * 4 + 3
    model.train()(torch.randn(32, 5))  # statistics of N(0, 1) inputs
    model.eval()
    with batch_statistics(model):
        target = model(x)  # whole-batch statistics of x
    stale = (model(x) - target).abs().max()
    recompute_batchnorm_stats(model, x, batch_size=256)
    fixed = (model(x) - target).abs().max()
    assert fixed < 1e-2 * stale


@pytest.mark.parametrize("impl", ["bnlib", "torch"])
def test_batch_statistics_normalises_with_the_batch(impl):
    model = _net(impl, dropout=0.5)
    model.train()(torch.randn(16, 5))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(20, 5) + 1
    with batch_statistics(model) as m:
        assert m is model and not model.training  # eval mode: dropout is off
        out = model(x)
        out2 = model(x)
    torch.testing.assert_close(out, out2)  # deterministic: no dropout
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics untouched, still there
    # the same as a train-mode pass without dropout and without moving the buffers
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    ref.train()
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), ref(x))
    # and different from the eval-mode output with running statistics
    model.eval()
    assert not torch.allclose(out, model(x))


def test_batch_statistics_restores_on_error():
    model = _net()
    model.eval()
    with pytest.raises(RuntimeError, match="boom"):
        with batch_statistics(model):
            raise RuntimeError("boom")
    assert not model.training
    assert all(bn.running_mean is not None for bn in bnn.batchnorm_layers(model))
    assert "blocks.0.norm.running_mean" in model.state_dict()


@pytest.mark.cuda
def test_precise_bn_on_cuda():
    model = _net().cuda()
    x = torch.randn(64, 5, device="cuda")
    recompute_batchnorm_stats(model, x, batch_size=16)
    assert model.blocks[0].norm.running_mean.is_cuda
    inp = _bn_inputs(model, x)[0]
    torch.testing.assert_close(model.blocks[0].norm.running_mean, inp.mean(0), rtol=1e-4, atol=1e-4)


# --- running averages and their error ---------------------------------------------------

def test_ema_conventions_agree():
    v = np.arange(10.0)
    assert np.allclose(ema(v, 0.1, convention="torch"), ema(v, 0.9, convention="keras"))
    assert ema([5.0], 1.0)[-1] == 5.0
    with pytest.raises(ValueError):
        ema(v, 0.1, convention="jax")
    with pytest.raises(ValueError):
        ema(v, 1.5)


def test_statistics_error_is_zero_against_itself_and_sees_a_shifted_mean():
    net = _net()
    net.train()
    with torch.no_grad():
        net(torch.randn(64, 5) * 2 + 1)   # non-trivial running statistics
    err = statistics_error(net, net)
    assert list(err["layer"]) == [1, 2] and (err[["mean_error", "var_log_ratio"]] == 0).all().all()
    other = copy.deepcopy(net)
    other.blocks[0].norm.running_mean += 1.0
    assert statistics_error(other, net).loc[0, "mean_error"] > 0
    with pytest.raises(ValueError):
        statistics_error(net, nn.Linear(2, 2))


@torch.no_grad()
def test_recompute_in_train_mode_is_a_cumulative_average_of_batch_statistics():
    net = _net()
    x = torch.randn(96, 5) * 3 - 1
    recompute_in_train_mode(net, x, batch_size=32)
    assert not net.training and all(bn.momentum == 0.1 for bn in bnn.batchnorm_layers(net))
    # the first BN's input does not depend on any earlier BN: its recomputed mean is the mean
    # of the three batch means
    first = net.blocks[0]
    pre = first.layer(x)
    torch.testing.assert_close(first.norm.running_mean, pre.mean(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no batch-norm"):
        recompute_in_train_mode(nn.Linear(2, 2), x)


# --- test-time statistics ----------------------------------------------------------------

def _conv_net(seed: int = 0) -> nn.Module:
    """Two (Conv1d → BatchNorm1d → ReLU) blocks and a linear head, whose running statistics
    differ from the batch statistics of new data."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv1d(1, 4, 5, stride=2, padding=2, bias=False), bnn.BatchNorm1d(4), nn.ReLU(),
                        nn.Conv1d(4, 4, 5, stride=2, padding=2, bias=False), bnn.BatchNorm1d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 10, 10))
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(16, 1, 40) * 2 + 1)
    return net.eval()


def _outputs_with_hooks(net, x, group, w):
    handles = [bn.register_forward_hook(_mixed_hook(group, w)) for bn in bnn.batchnorm_layers(net)]
    try:
        return net(x)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def test_grouped_batch_statistics_equal_a_loop_over_batches():
    net = _conv_net()
    x = torch.randn(24, 1, 40) * 1.5 + 0.3
    for b in (1, 2, 8):
        with batch_statistics(net):
            ref = torch.cat([net(x[i:i + b]) for i in range(0, len(x), b)])
        torch.testing.assert_close(_outputs_with_hooks(net, x, b, 0.0), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_outputs_with_hooks(net, x, 8, 1.0), net(x), atol=1e-5, rtol=1e-5)
    # accuracies, including a ragged last batch (24 = 2·10 + 4), and the running statistics
    y = torch.randint(0, 10, (24,))
    with batch_statistics(net):
        ref = sum((net(x[i:i + 10]).argmax(1) == y[i:i + 10]).sum().item() for i in (0, 10, 20))
    assert grouped_accuracy(net, x, y, batch_size=10) == ref / 24
    assert grouped_accuracy(net, x, y, batch_size=5, prior=math.inf) == (net(x).argmax(1) == y).float().mean().item()
    assert not net.training
    with pytest.raises(ValueError):
        grouped_accuracy(net, x, y, batch_size=0)
    with pytest.raises(ValueError, match="prior"):
        grouped_accuracy(net, x, y, batch_size=2, prior=-1.0)


@torch.no_grad()
def test_prior_mixes_source_and_batch_statistics():
    bn = bnn.BatchNorm1d(3).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(8, 3, 5) * 3 + 2
    w = 16 / (16 + 8)                                   # N = 16, n = 8
    mean = w * bn.running_mean + (1 - w) * x.mean(dim=(0, 2))
    var = w * bn.running_var + (1 - w) * x.var(dim=(0, 2), unbiased=False)
    want = (x - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn.eps)
    torch.testing.assert_close(_outputs_with_hooks(bn, x, 8, w), want)


@torch.no_grad()
def test_adapt_batchnorm_stats_mixes_with_the_recomputed_statistics():
    net = _conv_net()
    x = torch.randn(64, 1, 40) + 0.7
    target = recompute_batchnorm_stats(copy.deepcopy(net), x)
    adapted = adapt_batchnorm_stats(copy.deepcopy(net), x, prior=0.0)
    for a, t in zip(bnn.batchnorm_layers(adapted), bnn.batchnorm_layers(target)):
        torch.testing.assert_close(a.running_mean, t.running_mean)
        torch.testing.assert_close(a.running_var, t.running_var)
    kept = adapt_batchnorm_stats(copy.deepcopy(net), x, prior=math.inf)
    for a, s in zip(bnn.batchnorm_layers(kept), bnn.batchnorm_layers(net)):
        torch.testing.assert_close(a.running_mean, s.running_mean)
    mixed = adapt_batchnorm_stats(copy.deepcopy(net), x, prior=64.0)   # N = n: half and half
    for a, s, t in zip(bnn.batchnorm_layers(mixed), bnn.batchnorm_layers(net), bnn.batchnorm_layers(target)):
        torch.testing.assert_close(a.running_var, (s.running_var + t.running_var) / 2)
    assert not mixed.training
