"""bnlib.nn.BatchNorm1d/2d as drop-in replacements for torch.nn.BatchNorm1d/2d."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnlib import nn as bnn

CASES = [  # (bnlib class, torch class, input shape)
    (bnn.BatchNorm1d, nn.BatchNorm1d, (12, 4)),
    (bnn.BatchNorm1d, nn.BatchNorm1d, (6, 4, 5)),
    (bnn.BatchNorm2d, nn.BatchNorm2d, (4, 4, 3, 5)),
]
CASE_IDS = ["1d-NC", "1d-NCL", "2d-NCHW"]
OPTIONS = {
    "default": {},
    "momentum0.5": dict(momentum=0.5),
    "momentumNone": dict(momentum=None),
    "no-affine": dict(affine=False),
    "no-bias": dict(bias=False),
    "no-running-stats": dict(track_running_stats=False),
    "eps": dict(eps=1e-2),
}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _pair(ours_cls, torch_cls, num_features, dtype=torch.float32, **opts):
    ours = ours_cls(num_features, dtype=dtype, **opts)
    ref = torch_cls(num_features, dtype=dtype, **opts)
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial γ and β, the same in both
        for name, p in ref.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name == "weight" else torch.randn_like(p))
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _assert_state_equal(ours, ref, **tol):
    s_ours, s_ref = ours.state_dict(), ref.state_dict()
    assert list(s_ours) == list(s_ref)
    for k in s_ref:
        assert s_ours[k].dtype == s_ref[k].dtype, k
        torch.testing.assert_close(s_ours[k], s_ref[k], **tol)


def _steps(ours, ref, shape, dtype, n_steps=3, lr=0.1, tol=None):
    """Several training steps with random inputs and upstream grads (plain SGD on γ, β),
    comparing outputs, all gradients and the buffers after each; then eval."""
    tol = tol or TOL[dtype]
    g = torch.Generator().manual_seed(1)
    for step in range(n_steps):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + step).to(dtype)
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        outs, grads = [], []
        for layer in (ours, ref):
            layer.train()
            xi = x.clone().requires_grad_(True)
            out = layer(xi)
            out.backward(dy)
            outs.append(out.detach())
            grads.append([xi.grad] + [p.grad for p in layer.parameters()])
            with torch.no_grad():
                for p in layer.parameters():
                    p -= lr * p.grad
                    p.grad = None
        torch.testing.assert_close(outs[0], outs[1], **tol)
        assert len(grads[0]) == len(grads[1])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, **tol)
        _assert_state_equal(ours, ref, **tol)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), **tol)
    _assert_state_equal(ours, ref, **tol)


@pytest.mark.parametrize("ours_cls,torch_cls,shape", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("opts", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_training_steps_then_eval_match_torch(ours_cls, torch_cls, shape, opts, dtype):
    ours, ref = _pair(ours_cls, torch_cls, shape[1], dtype, **opts)
    _steps(ours, ref, shape, dtype)
    if ours.track_running_stats:
        assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("ours_cls,torch_cls,shape", [CASES[0], CASES[2]], ids=["1d", "2d"])
def test_half_precision_modules_match_torch_loosely(ours_cls, torch_cls, shape, dtype):
    ours, ref = _pair(ours_cls, torch_cls, shape[1], dtype)
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    _steps(ours, ref, shape, dtype, n_steps=2, tol=tol)
    assert ours.running_mean.dtype == dtype


def test_momentum_none_is_cumulative_average():
    bn = bnn.BatchNorm1d(3, momentum=None)
    batches = [torch.randn(8, 3, dtype=torch.float32) * (i + 1) + i for i in range(4)]
    for x in batches:
        bn(x)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in batches]).mean(0))
    assert int(bn.num_batches_tracked) == 4


def test_mode_is_the_training_flag_not_grad_mode():
    bn = bnn.BatchNorm1d(3)
    x = torch.randn(8, 3) + 5
    with torch.no_grad():
        bn(x)  # training mode under no_grad: still batch stats, buffers move
    assert int(bn.num_batches_tracked) == 1 and bn.running_mean.abs().sum() > 0
    bn.eval()
    before = copy.deepcopy(bn.state_dict())
    out = bn(x)  # eval mode with grad enabled: running stats, buffers fixed
    _assert_state_equal(bn, _loaded(before))
    torch.testing.assert_close(out, (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))


def _loaded(state):
    m = bnn.BatchNorm1d(3)
    m.load_state_dict(state)
    return m


def test_no_running_stats_normalises_with_batch_in_eval_too():
    ours, ref = _pair(bnn.BatchNorm2d, nn.BatchNorm2d, 3, track_running_stats=False)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    ours.eval(), ref.eval()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), ref(x))


# --- state_dict and conversion ---------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, dict(affine=False), dict(bias=False),
                                  dict(track_running_stats=False)],
                         ids=["default", "no-affine", "no-bias", "no-running-stats"])
def test_state_dict_round_trips_both_ways(opts):
    torch.manual_seed(0)
    x = torch.randn(10, 4, 3, 3)
    ref = nn.BatchNorm2d(4, **opts)
    for _ in range(2):
        ref(x * 2 + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p))
    ours = bnn.BatchNorm2d(4, **opts)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())  # torch -> bnlib (strict)
    _assert_state_equal(ours, ref, rtol=0, atol=0)
    ours(x * 3 - 1)                          # move bnlib's state, then bnlib -> torch
    back = nn.BatchNorm2d(4, **opts)
    back.load_state_dict(ours.state_dict())
    _assert_state_equal(ours, back, rtol=0, atol=0)
    ours.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), back(x))


def test_state_dict_version_metadata_and_old_checkpoints():
    ours, ref = bnn.BatchNorm1d(3), nn.BatchNorm1d(3)
    assert ours.state_dict()._metadata[""]["version"] == ref.state_dict()._metadata[""]["version"]
    # a checkpoint from before num_batches_tracked existed (version 1) loads, with 0 batches
    old = ref.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    ours.num_batches_tracked.fill_(7)
    ours.load_state_dict(old)
    assert int(ours.num_batches_tracked) == 0


def _model(norm_cls1, norm_cls2, **opts):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), norm_cls2(4, **opts), nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6), norm_cls1(6, **opts), nn.ReLU()),
        nn.Linear(6, 3))


@pytest.mark.parametrize("opts", [{}, dict(momentum=None, eps=1e-3), dict(affine=False),
                                  dict(bias=False), dict(track_running_stats=False)],
                         ids=["default", "momentumNone-eps", "no-affine", "no-bias", "no-stats"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_keeps_outputs_state_and_mode(opts, training):
    torch.manual_seed(0)
    x = torch.randn(8, 2, 4, 4)
    model = _model(nn.BatchNorm1d, nn.BatchNorm2d, **opts)
    model(x)  # non-trivial running statistics
    model.train(training)
    twin = copy.deepcopy(model)
    converted = bnn.convert(model, to="bnlib")
    assert converted is model
    kinds = [type(m) for m in bnn.batchnorm_layers(model)]
    assert kinds == [bnn.BatchNorm2d, bnn.BatchNorm1d]
    assert all(m.training == training for m in model.modules())
    for a, b in zip(bnn.batchnorm_layers(model), bnn.batchnorm_layers(twin)):
        assert (a.eps, a.momentum, a.affine, a.track_running_stats) == \
               (b.eps, b.momentum, b.affine, b.track_running_stats)
        assert (a.bias is None) == (b.bias is None)
    _assert_state_equal(model, twin, rtol=0, atol=0)
    torch.testing.assert_close(model(x), twin(x))
    _assert_state_equal(model, twin)  # in training mode both moved their buffers alike
    bnn.convert(model, to="torch")
    assert [type(m) for m in bnn.batchnorm_layers(model)] == [nn.BatchNorm2d, nn.BatchNorm1d]
    torch.testing.assert_close(model(x), twin(x))
    _assert_state_equal(model, twin)


def test_convert_single_layer_dtype_and_frozen_parameters():
    layer = nn.BatchNorm1d(5, dtype=torch.float64).eval()
    layer.weight.requires_grad_(False)
    new = bnn.convert(layer)
    assert type(new) is bnn.BatchNorm1d and not new.training
    assert new.weight.dtype == torch.float64 and new.running_var.dtype == torch.float64
    assert not new.weight.requires_grad and new.bias.requires_grad
    assert type(bnn.convert(new, to="torch")) is nn.BatchNorm1d
    with pytest.raises(ValueError, match="'bnlib' or 'torch'"):
        bnn.convert(layer, to="keras")


def test_to_dtype_moves_parameters_and_buffers():
    bn = bnn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    bn = bn.to(torch.float64)
    assert bn.weight.dtype == bn.running_mean.dtype == bn.running_var.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long  # integer buffer untouched
    out = bn(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert set(dict(bn.named_buffers())) == {"running_mean", "running_var", "num_batches_tracked"}


def test_batchnorm_layers_finds_both_kinds_in_order():
    model = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm1d(4)))
    layers = bnn.batchnorm_layers(model)
    assert [type(m) for m in layers] == [bnn.BatchNorm1d, nn.BatchNorm1d]


def test_reset_and_repr():
    bn = bnn.BatchNorm1d(3, momentum=0.2, bias=False)
    bn(torch.randn(5, 3) + 4)
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    assert int(bn.num_batches_tracked) == 0
    with torch.no_grad():
        bn.weight.fill_(3)
    bn.reset_parameters()
    assert torch.equal(bn.weight, torch.ones(3))
    text = repr(bn)
    assert "BatchNorm1d(3" in text and "momentum=0.2" in text and "bias=False" in text


# --- errors: same types as torch -----------------------------------------------------------

@pytest.mark.parametrize("ours_cls,torch_cls,x", [
    (bnn.BatchNorm1d, nn.BatchNorm1d, torch.randn(2, 3, 4, 5)),
    (bnn.BatchNorm1d, nn.BatchNorm1d, torch.randn(3)),
    (bnn.BatchNorm2d, nn.BatchNorm2d, torch.randn(2, 3, 4)),
], ids=["1d-got-4d", "1d-got-1d", "2d-got-3d"])
def test_error_wrong_rank(ours_cls, torch_cls, x):
    with pytest.raises(ValueError, match=r"expected .*D input \(got \d+D input\)"):
        ours_cls(3)(x)
    with pytest.raises(ValueError):
        torch_cls(3)(x)


@pytest.mark.parametrize("training", [True, False])
def test_error_wrong_channel_count(training):
    for cls in (bnn.BatchNorm2d, nn.BatchNorm2d):
        layer = cls(3).train(training)
        with pytest.raises(RuntimeError, match="should contain"):
            layer(torch.randn(4, 5, 2, 2))


def test_error_one_value_per_channel_in_training():
    for cls in (bnn.BatchNorm1d, nn.BatchNorm1d):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            cls(3)(torch.randn(1, 3))
        cls(3).eval()(torch.randn(1, 3))  # fine in eval mode


def test_error_non_float_input_is_clear():
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        bnn.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises((NotImplementedError, RuntimeError)):  # torch: "not implemented for 'Long'"
        nn.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_features"):
        bnn.BatchNorm1d(0)
    with pytest.raises(ValueError, match="momentum"):
        bnn.BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        bnn.BatchNorm1d(3, eps=0)


# --- ShiftNoise (Santurkar et al.'s injected shift) ----------------------------------------

def test_shift_noise_is_identity_in_eval_mode_and_fresh_in_train_mode():
    noise = bnn.ShiftNoise()
    x = torch.randn(32, 5)
    assert torch.equal(noise.eval()(x), x)
    noise.train()
    a, b = noise(x), noise(x)
    assert not torch.allclose(a, x) and not torch.allclose(a, b)  # new noise at every call


def test_shift_noise_follows_santurkar_ranges():
    torch.manual_seed(0)
    noise = bnn.ShiftNoise(n_mu=0.5, n_sigma=1.25, r_mu=0.1, r_sigma=0.0).train()
    zeros = noise(torch.zeros(4000, 3))          # output = m: within μ ± r_mu, |μ| ≤ n_mu
    assert zeros.abs().max() <= 0.6 + 1e-6
    assert (zeros.max(0).values - zeros.min(0).values <= 0.2 + 1e-6).all()  # one μ per unit
    ones = noise(torch.ones(4000, 3))            # s + m with s = σ ∈ [1, 1.25] (r_sigma = 0)
    assert ones.min() >= 1 - 0.6 - 1e-6 and ones.max() <= 1.25 + 0.6 + 1e-6
    images = bnn.ShiftNoise().train()(torch.zeros(2, 3, 4, 4))
    assert images.shape == (2, 3, 4, 4)


def test_shift_noise_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_sigma"):
        bnn.ShiftNoise(n_sigma=0.5)
    with pytest.raises(ValueError, match="≥ 0"):
        bnn.ShiftNoise(n_mu=-1)
    with pytest.raises(ValueError, match="inputs"):
        bnn.ShiftNoise().train()(torch.zeros(2, 3, 4))


# --- CUDA (run on a GPU machine) ------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("ours_cls,torch_cls,shape", CASES, ids=CASE_IDS)
def test_training_steps_match_torch_on_cuda(ours_cls, torch_cls, shape):
    ours, ref = _pair(ours_cls, torch_cls, shape[1])
    ours, ref = ours.cuda(), ref.cuda()
    assert ours.running_mean.is_cuda and ours.num_batches_tracked.is_cuda
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(shape, generator=g).cuda()
        dy = torch.randn(shape, generator=g).cuda()
        outs = []
        for layer in (ours, ref):
            xi = x.clone().requires_grad_(True)
            out = layer(xi)
            out.backward(dy)
            outs.append((out, xi.grad, layer.weight.grad, layer.bias.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        _assert_state_equal(ours, ref, rtol=1e-4, atol=1e-4)
    ours.eval(), ref.eval()
    x = torch.randn(shape, generator=g).cuda()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_convert_and_move_to_cuda():
    model = _model(nn.BatchNorm1d, nn.BatchNorm2d).cuda()
    twin = copy.deepcopy(model)
    bnn.convert(model)
    assert all(b.is_cuda for b in model.buffers())
    x = torch.randn(8, 2, 4, 4, device="cuda")
    torch.testing.assert_close(model(x), twin(x), rtol=1e-4, atol=1e-4)
    model = model.cpu()
    assert all(not b.is_cuda for b in model.buffers())
