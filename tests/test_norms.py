"""bnlib.norms.GroupNorm is a drop-in replacement for torch.nn.GroupNorm."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlib.models import make_norm, mlp, cnn
from bnlib.norms import GroupNorm, group_norm

SHAPES = [(5, 6), (4, 6, 7), (3, 6, 4, 5)]
GROUPS = [1, 2, 3, 6]


def _pair(groups: int, channels: int, affine: bool = True, dtype=torch.float32, bias: bool = True):
    ours = GroupNorm(groups, channels, affine=affine, dtype=dtype, bias=bias)
    ref = nn.GroupNorm(groups, channels, affine=affine, dtype=dtype, bias=bias)
    if affine:  # non-trivial γ, β so the affine part is tested too
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if bias:
                ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_and_backward_match_torch(shape, groups, affine):
    torch.manual_seed(0)
    ours, ref = _pair(groups, shape[1], affine)
    x = (torch.randn(*shape) * 3 + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x2)
    # A group of ONE value has variance 0: 1/√ε ≈ 316 amplifies float rounding (torch's
    # fused kernel computes x·r − μ·r, we compute (x − μ)·r), so allow more there.
    single = shape[1] // groups * math.prod(shape[2:]) == 1
    atol = 1e-3 if single else 1e-5
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=max(atol, 1e-4), rtol=1e-4)
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-4)


def test_train_and_eval_modes_compute_the_same_thing():
    torch.manual_seed(0)
    m = GroupNorm(2, 4)
    x = torch.randn(2, 4, 3)
    y_train = m.train()(x)
    torch.testing.assert_close(m.eval()(x), y_train)
    # each example is normalised on its own: the rest of the batch does not matter
    torch.testing.assert_close(m(x[:1]), y_train[:1])


def test_groups_have_zero_mean_unit_variance():
    torch.manual_seed(1)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 7 - 3
    y = GroupNorm(3, 6, affine=False, dtype=torch.float64)(x).reshape(4, 3, -1)
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(4, 3, dtype=torch.float64),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(affine):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    if affine:
        w = torch.rand(4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: group_norm(x, 2, w, b), (x, w, b))
        assert torch.autograd.gradgradcheck(lambda x, w, b: group_norm(x, 2, w, b), (x, w, b))
    else:
        assert torch.autograd.gradcheck(lambda x: group_norm(x, 2), (x,))


def test_parameters_state_dict_and_repr_match_torch():
    for affine in (True, False):
        for bias in (True, False):
            ours, ref = GroupNorm(2, 4, affine=affine, bias=bias), nn.GroupNorm(2, 4, affine=affine, bias=bias)
            assert list(ours.state_dict()) == list(ref.state_dict())
            assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
            assert repr(ours) == repr(ref)
            assert list(ours.buffers()) == []
    ours, ref = GroupNorm(2, 4), nn.GroupNorm(2, 4)
    torch.testing.assert_close(ours.weight, torch.ones(4))
    torch.testing.assert_close(ours.bias, torch.zeros(4))
    with torch.no_grad():
        ref.weight.fill_(2.0)
        ref.bias.fill_(-1.0)
    ours.load_state_dict(ref.state_dict())   # torch → bnlib
    ref2 = nn.GroupNorm(2, 4)
    ref2.load_state_dict(ours.state_dict())  # bnlib → torch
    x = torch.randn(3, 4)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ref2(x), ref(x))


def test_device_and_dtype_are_honoured():
    m = GroupNorm(2, 4, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.weight.device.type == "cpu"
    x = torch.randn(2, 4, dtype=torch.float64)
    assert m(x).dtype == torch.float64


def test_half_precision_is_computed_in_float32():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6) * 50 + 100
    y = GroupNorm(2, 8).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ref = nn.GroupNorm(2, 8)(x)
    assert (y.float() - ref).abs().max() < 0.05


def test_stable_for_large_offsets():
    """Two-pass variance: no catastrophic cancellation when |mean| ≫ std."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, dtype=torch.float64) + 1e3
    ref = nn.GroupNorm(2, 8, affine=False).double()(x)
    y = GroupNorm(2, 8, affine=False)(x.float()).double()
    assert torch.isfinite(y).all()
    assert (y - ref).abs().max() < 1e-2


def test_constant_group_gives_zero_not_nan():
    y = GroupNorm(2, 4)(torch.full((2, 4, 3), 5.0))
    assert torch.isfinite(y).all() and y.abs().max() == 0


def test_empty_batch():
    assert GroupNorm(2, 4)(torch.randn(0, 4, 3)).shape == (0, 4, 3)


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(3, 8)
    with pytest.raises(ValueError, match="divisible"):
        nn.GroupNorm(3, 8)  # the same error type as torch
    with pytest.raises(ValueError, match="positive"):
        GroupNorm(0, 4)
    with pytest.raises(ValueError, match="positive"):
        GroupNorm(2, -4)
    with pytest.raises(ValueError, match="eps"):
        GroupNorm(2, 4, eps=0.0)


def test_input_errors_are_both_value_and_runtime_errors():
    m = GroupNorm(2, 4)
    for bad in (torch.randn(4), torch.randn(3, 6, 2)):
        with pytest.raises(ValueError):
            m(bad)
        with pytest.raises(RuntimeError):  # what torch raises for the same inputs
            m(bad)
        with pytest.raises(RuntimeError):
            nn.GroupNorm(2, 4)(bad)
    with pytest.raises(ValueError, match="divisible"):
        group_norm(torch.randn(2, 5), 2)


def test_make_norm_group_builds_bnlib_groupnorm_in_models():
    norm = make_norm("group", 12, conv=False)
    assert isinstance(norm, GroupNorm) and norm.num_groups == 4  # gcd(8, 12)
    net = mlp(10, 3, depth=2, width=16, norm="group")
    assert isinstance(net.blocks[0].norm, GroupNorm)
    assert net(torch.randn(2, 10)).shape == (2, 3)
    conv = cnn(1, 3, channels=(8, 16), norm="group")
    assert conv(torch.randn(2, 1, 8, 8)).shape == (2, 3)
