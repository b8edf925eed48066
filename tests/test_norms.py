"""bnlib.norms: GroupNorm and LayerNorm are drop-ins for torch's; Batch Renorm, ghost BN,
weight standardisation and SkipInit are checked against batch norm and hand-derived values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlib.models import make_norm, mlp, cnn
from bnlib.nn import BatchNorm1d, BatchNorm2d
from bnlib.norms import (BatchRenorm1d, BatchRenorm2d, GhostBatchNorm, GroupNorm, LayerNorm,
                         SkipInit, WSConv1d, WSConv2d, group_norm, layer_norm, standardize_weight)

SHAPES = [(5, 6), (4, 6, 7), (3, 6, 4, 5)]
GROUPS = [1, 2, 3, 6]


def _same_forward_backward(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """``ours`` and ``ref`` give the same output and the same gradients (input and parameters)."""
    x = x.detach().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, getattr(ref, name).grad, atol=1e-4, rtol=1e-4)


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


# --- LayerNorm ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,normalized", [((5, 6), 6), ((4, 3, 7), (3, 7)), ((2, 3, 4, 5), (4, 5)),
                                              ((2, 3, 4, 5), [3, 4, 5])], ids=str)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
def test_layernorm_matches_torch(shape, normalized, affine, bias):
    torch.manual_seed(0)
    ours = LayerNorm(normalized, elementwise_affine=affine, bias=bias)
    ref = nn.LayerNorm(normalized, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if bias:
                ours.bias.normal_()
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours) == repr(ref)
    ref.load_state_dict(ours.state_dict())
    _same_forward_backward(ours, ref, torch.randn(*shape) * 3 + 2)


def test_layernorm_state_dict_round_trip_and_eval_mode():
    ref = nn.LayerNorm((3, 4))
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = LayerNorm((3, 4))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(ours.eval()(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.train()(x[:1]), ref(x)[:1], atol=1e-5, rtol=1e-5)
    assert list(ours.buffers()) == []


def test_layernorm_gradcheck_and_errors():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: layer_norm(x, (4, 5), w), (x, w))
    m = LayerNorm(4)
    for err in (ValueError, RuntimeError):
        with pytest.raises(err, match="normalized_shape"):
            m(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="normalized_shape"):
        nn.LayerNorm(4)(torch.randn(2, 3))  # torch's type, torch's words
    with pytest.raises(ValueError):
        LayerNorm(0)
    with pytest.raises(ValueError, match="eps"):
        LayerNorm(4, eps=0)


# --- Batch Renormalization ---------------------------------------------------------------

@pytest.mark.parametrize("cls,ref_cls,shape", [(BatchRenorm1d, BatchNorm1d, (8, 3)),
                                                (BatchRenorm1d, BatchNorm1d, (6, 3, 5)),
                                                (BatchRenorm2d, BatchNorm2d, (4, 3, 3, 2))])
def test_batchrenorm_with_rmax1_dmax0_is_batchnorm(cls, ref_cls, shape):
    torch.manual_seed(0)
    ours = cls(3, r_max=1.0, d_max=0.0, warmup_steps=0, ramp_steps=0)
    ref = ref_cls(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
        ref.running_var.fill_(0.3)  # running stats far from the batch's: clipping is what keeps r = 1
    ours.load_state_dict(ref.state_dict())
    for _ in range(3):
        ours.zero_grad(), ref.zero_grad()
        _same_forward_backward(ours, ref, torch.randn(*shape) * 2 + 1)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    x = torch.randn(*shape)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


def test_batchrenorm_after_the_ramp_matches_the_hand_derivation():
    # x = [0, 0, 3, 3], one channel: μ_B = 1.5, σ_B = 1.5. Running μ = 0, var = 0.5625: σ = 0.75.
    # r = clip(σ_B/σ = 2, 1/1.5, 1.5) = 1.5;  d = clip((μ_B − μ)/σ = 2, −1, 1) = 1
    # x̂ = (x − μ_B)/σ_B · r + d = [−1.5 + 1, ..., 1.5 + 1] = [−0.5, −0.5, 2.5, 2.5]  (BN: ±1)
    m = BatchRenorm1d(1, eps=1e-12, r_max=1.5, d_max=1.0, warmup_steps=0, ramp_steps=0,
                      dtype=torch.float64)
    with torch.no_grad():
        m.running_var.fill_(0.5625)
    x = torch.tensor([[0.0], [0.0], [3.0], [3.0]], dtype=torch.float64, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, torch.tensor([[-0.5], [-0.5], [2.5], [2.5]], dtype=torch.float64))
    # r, d are constants in backprop: the gradient is r times batch norm's
    g = torch.tensor([[1.0], [2.0], [3.0], [5.0]], dtype=torch.float64)
    y.backward(g)
    xb = x.detach().clone().requires_grad_()
    BatchNorm1d(1, eps=1e-12, dtype=torch.float64)(xb).backward(g)
    assert xb.grad.abs().max() > 0.1
    torch.testing.assert_close(x.grad, 1.5 * xb.grad)
    # running statistics move as batch norm's do: mean 0.1·1.5, var 0.9·0.5625 + 0.1·3 (unbiased)
    torch.testing.assert_close(m.running_mean, torch.tensor([0.15], dtype=torch.float64))
    torch.testing.assert_close(m.running_var, torch.tensor([0.80625], dtype=torch.float64))
    assert int(m.num_batches_tracked) == 1


def test_batchrenorm_schedule_counts_its_own_steps():
    m = BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=2, ramp_steps=4)
    seen = []
    for _ in range(7):
        m(torch.randn(4, 2))
        seen.append(m.limits())
    assert seen[:2] == [(1.0, 0.0)] * 2
    assert seen[3] == pytest.approx((2.0, 2.5))
    assert seen[-1] == (3.0, 5.0)
    m.eval()(torch.randn(4, 2))
    assert int(m.num_batches_tracked) == 7   # evaluation does not count
    assert "num_batches_tracked" in m.state_dict()


def test_batchrenorm_errors():
    with pytest.raises(ValueError, match="track_running_stats"):
        BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="r_max"):
        BatchRenorm2d(3, r_max=0.5)
    with pytest.raises(ValueError):
        BatchRenorm2d(3, warmup_steps=-1)
    with pytest.raises(ValueError, match="4D"):
        BatchRenorm2d(3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchRenorm1d(3)(torch.randn(1, 3))


# --- Ghost batch norm (bnlib.nn.GhostBatchNorm, re-exported by bnlib.norms) ---------------

@pytest.mark.parametrize("policy", ["each", "first"])
@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5), (8, 3, 2, 2)], ids=str)
def test_ghost_bn_with_one_ghost_is_torch_batchnorm(shape, policy):
    torch.manual_seed(0)
    ours = GhostBatchNorm(3, virtual_batch_size=8, running_stats=policy)
    ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(3)
    x = torch.randn(*shape)
    _same_forward_backward(ours, ref, x)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("policy", ["each", "first"])
def test_ghost_bn_normalises_each_ghost_like_torch_and_updates_by_policy(policy):
    torch.manual_seed(0)
    x = torch.randn(12, 3, 5) * 4 + 2
    ours = GhostBatchNorm(3, virtual_batch_size=4, running_stats=policy)
    ref = nn.BatchNorm1d(3)
    y = ours(x)
    chunks = x.split(4)
    for i, (cx, cy) in enumerate(zip(chunks, y.split(4))):
        if policy == "each" or i == 0:       # torch's BN sees the ghosts that update the buffers
            torch.testing.assert_close(cy, ref(cx))
        else:
            torch.testing.assert_close(cy, nn.BatchNorm1d(3)(cx))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == (3 if policy == "each" else 1)
    assert ours(torch.randn(10, 3, 5)).shape == (10, 3, 5)   # ragged: 2 ghosts of 5
    with pytest.raises(ValueError, match="at least 2 examples"):
        GhostBatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match="running_stats"):
        GhostBatchNorm(3, running_stats="mean")


def test_use_ghost_batchnorm_keeps_state_and_is_bn_with_one_ghost():
    from bnlib.nn import GhostBatchNorm1d, use_ghost_batchnorm
    torch.manual_seed(0)
    net = mlp(5, 3, depth=2, width=6, norm="batch").double()
    ref = mlp(5, 3, depth=2, width=6, norm="batch").double()
    ref.load_state_dict(net.state_dict())
    use_ghost_batchnorm(net, virtual_batch_size=16, running_stats="first")
    assert all(type(b.norm) is GhostBatchNorm1d and b.norm.running_mean.dtype == torch.float64
               for b in net.blocks)
    x = torch.randn(16, 5, dtype=torch.float64)
    torch.testing.assert_close(net(x), ref(x))
    with pytest.raises(ValueError, match="no bnlib BatchNorm1d"):
        use_ghost_batchnorm(nn.Linear(3, 3))


# --- Weight Standardization --------------------------------------------------------------

@pytest.mark.parametrize("cls,shape", [(WSConv1d, (2, 3, 9)), (WSConv2d, (2, 3, 6, 6))])
def test_ws_filters_are_standardised_and_state_dict_is_convs(cls, shape):
    torch.manual_seed(0)
    conv = cls(3, 5, 3)
    with torch.no_grad():
        conv.weight.mul_(7).add_(2)
    w = conv.standardized_weight().reshape(5, -1).double()
    torch.testing.assert_close(w.mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.std(1, unbiased=False), torch.ones(5, dtype=torch.float64), atol=1e-4, rtol=0)
    plain = (nn.Conv1d if cls is WSConv1d else nn.Conv2d)(3, 5, 3)
    assert list(conv.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(conv.state_dict())
    with torch.no_grad():
        plain.weight.copy_(conv.standardized_weight())
    x = torch.randn(*shape)
    torch.testing.assert_close(conv(x), plain(x))
    conv(x).sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_ws_gradcheck_float64():
    torch.manual_seed(0)
    w = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(standardize_weight, (w,))
    conv = WSConv1d(2, 4, 3, dtype=torch.float64)
    x = torch.randn(2, 2, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: torch.nn.functional.conv1d(x, standardize_weight(w)),
                                    (x, conv.weight))


# --- SkipInit ----------------------------------------------------------------------------

def test_skipinit_block_is_the_identity_at_init_and_learns_alpha():
    torch.manual_seed(0)
    block = SkipInit(nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1)))
    x = torch.randn(3, 4, 10)
    torch.testing.assert_close(block(x), x)
    deep = nn.Sequential(*[SkipInit(nn.Linear(6, 6)) for _ in range(50)])
    z = torch.randn(5, 6)
    torch.testing.assert_close(deep(z), z)
    block(x).pow(2).sum().backward()
    assert block.alpha.grad is not None and block.alpha.grad != 0   # α is trained away from 0
    assert "alpha" in dict(block.named_parameters())
