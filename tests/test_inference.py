"""bnlib.inference: precise BN (recompute_batchnorm_stats) and batch_statistics."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnlib import models
from bnlib import nn as bnn
from bnlib.inference import batch_statistics, recompute_batchnorm_stats


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
