"""bnlib.functional.batch_norm against torch.nn.functional.batch_norm, gradcheck, numerics, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

from bnlib import functional as F

SHAPES = [(16, 5), (8, 5, 7), (4, 5, 3, 6)]
SHAPE_IDS = ["NC", "NCL", "NCHW"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _inputs(shape, dtype=torch.float32, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5 + offset).to(dtype)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    rm = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, rm, rv, dy


def _run(fn, x, w, b, rm, rv, dy, training, momentum=0.1, eps=1e-5):
    """Forward + backward of ``fn``; returns output, grads and the (updated) buffers."""
    x = x.clone().requires_grad_(True)
    w = None if w is None else w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    out = fn(x, rm, rv, w, b, training, momentum, eps)
    out.backward(dy)
    grads = [t.grad if t is not None else None for t in (x, w, b)]
    return out.detach(), grads, rm, rv


def _close(a, b, **tol):
    if a is None or b is None:
        assert a is None and b is None
    else:
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_matches_torch(shape, dtype, training, affine):
    x, w, b, rm, rv, dy = _inputs(shape, dtype)
    w = None if affine == "none" else w
    b = b if affine == "wb" else None
    ours = _run(F.batch_norm, x, w, b, rm, rv, dy, training, momentum=0.3, eps=1e-3)
    ref = _run(TF.batch_norm, x, w, b, rm, rv, dy, training, momentum=0.3, eps=1e-3)
    _close(ours[0], ref[0], **TOL[dtype])
    for g_ours, g_ref in zip(ours[1], ref[1]):
        _close(g_ours, g_ref, **TOL[dtype])
    _close(ours[2], ref[2], **TOL[dtype])  # running_mean, updated in place in training
    _close(ours[3], ref[3], **TOL[dtype])  # running_var (unbiased)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_training_without_running_stats_matches_torch(shape):
    x, w, b, _, _, dy = _inputs(shape)
    ours = _run(F.batch_norm, x, w, b, None, None, dy, True)
    ref = _run(TF.batch_norm, x, w, b, None, None, dy, True)
    _close(ours[0], ref[0], **TOL[torch.float32])
    for g_ours, g_ref in zip(ours[1], ref[1]):
        _close(g_ours, g_ref, **TOL[torch.float32])


def test_running_stats_update_convention():
    """new = (1 − momentum)·old + momentum·batch, with the *unbiased* batch variance."""
    x = torch.randn(10, 3, dtype=torch.float64)
    rm, rv = torch.full((3,), 2.0, dtype=torch.float64), torch.full((3,), 3.0, dtype=torch.float64)
    F.batch_norm(x, rm, rv, training=True, momentum=0.25)
    torch.testing.assert_close(rm, 0.75 * 2.0 + 0.25 * x.mean(0))
    torch.testing.assert_close(rv, 0.75 * 3.0 + 0.25 * x.var(0, unbiased=True))


def test_training_output_is_normalised_with_biased_variance():
    x = torch.randn(6, 4, 5, dtype=torch.float64) * 3 + 1
    out = F.batch_norm(x, None, None, training=True, eps=0.0 + 1e-12)
    dims = (0, 2)
    torch.testing.assert_close(out.mean(dims), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.var(dims, unbiased=False), torch.ones(4, dtype=torch.float64))


def test_eval_is_a_fixed_affine_map_and_leaves_buffers():
    x, w, b, rm, rv, _ = _inputs((8, 5), torch.float64)
    rm0, rv0 = rm.clone(), rv.clone()
    out = F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
    torch.testing.assert_close(out, (x - rm) / torch.sqrt(rv + 1e-5) * w + b)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_only_weight_needs_grad():
    """The input gradient is skipped when the input does not need one."""
    x, w, b, _, _, dy = _inputs((12, 4), torch.float64)
    w = w.clone().requires_grad_(True)
    F.batch_norm(x, None, None, w, b, training=True).backward(dy)
    w_ref = w.detach().clone().requires_grad_(True)
    TF.batch_norm(x, None, None, w_ref, b, training=True).backward(dy)
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_memory_layouts_and_expanded_upstream_gradient():
    """channels_last and transposed inputs; an upstream gradient that is an expanded scalar."""
    x, w, b, _, _, _ = _inputs((4, 3, 5, 6), torch.float64)
    layouts = {"channels_last": x.to(memory_format=torch.channels_last),
               "transposed": x.transpose(2, 3).contiguous().transpose(2, 3)}
    for name, xin in layouts.items():
        for fn in (F.batch_norm, TF.batch_norm):
            xi = xin.clone().requires_grad_(True)
            wi = w.clone().requires_grad_(True)
            out = fn(xi, None, None, wi, b, True)
            (out * torch.arange(6.0, dtype=torch.float64)).sum().backward()
            if fn is F.batch_norm:
                ours = (out.detach(), xi.grad, wi.grad)
            else:
                for a, r in zip(ours, (out.detach(), xi.grad, wi.grad)):
                    torch.testing.assert_close(a, r, **TOL[torch.float64], msg=name)
    # dy = 1 everywhere (an expanded scalar): the true input gradient is exactly zero
    xi = x.clone().requires_grad_(True)
    F.batch_norm(xi, None, None, w, b, True).sum().backward()
    assert xi.grad.abs().max() < 1e-10


def test_nc_path_non_contiguous_input_and_expanded_gradient():
    """The written-out (N, C) path on a transposed (non-contiguous) input and an upstream
    gradient that is an expanded scalar, against torch."""
    x, w, b, rm, rv, _ = _inputs((5, 12), torch.float64)
    xt = x.t().contiguous().t()  # same values, column-major strides
    for fn in (F.batch_norm, TF.batch_norm):
        xi, wi = xt.clone().t().contiguous().t().requires_grad_(True), w.clone().requires_grad_(True)
        rmi, rvi = rm.clone(), rv.clone()
        out = fn(xi, rmi, rvi, wi, b, True)
        (out * torch.arange(12.0, dtype=torch.float64)).sum().backward()
        if fn is F.batch_norm:
            assert not xi.is_contiguous()
            ours = (out.detach(), xi.grad, wi.grad, rmi, rvi)
        else:
            for a, r in zip(ours, (out.detach(), xi.grad, wi.grad, rmi, rvi)):
                torch.testing.assert_close(a, r, **TOL[torch.float64])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_twice_with_retain_graph_and_no_double_backward(shape, training):
    """The saved tensors survive a backward pass (retain_graph=True gives the same
    gradients twice), and differentiating the closed-form gradient again raises a clear
    error instead of returning a silently wrong (zero) second derivative."""
    x, w, b, rm, rv, dy = _inputs(shape, torch.float64)
    xi = x.clone().requires_grad_(True)
    out = F.batch_norm(xi, rm.clone(), rv.clone(), w, b, training)
    g1, = torch.autograd.grad(out, xi, dy, retain_graph=True)
    g2, = torch.autograd.grad(out, xi, dy)
    assert torch.equal(g1, g2)
    out = F.batch_norm(xi, rm.clone(), rv.clone(), w, b, training)
    dyg = dy.clone().requires_grad_(True)  # as in a network, where dy depends on the input
    gx, = torch.autograd.grad(out, xi, dyg, create_graph=True)  # first order still works
    torch.testing.assert_close(gx.detach(), g1)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_constant_channel_gives_zeros_not_nan():
    x = torch.full((8, 3), 0.1)
    x[:, 1] = torch.arange(8.0)
    out = F.batch_norm(x, None, None, training=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 0], torch.zeros(8))


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 3, 4)], ids=SHAPE_IDS)
def test_gradcheck_float64(shape):
    torch.manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) + 2.0).requires_grad_(True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(c, dtype=torch.float64).requires_grad_(True)
    fn = lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6)


def test_gradcheck_eval_mode():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=False), (x, w, b))


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("spread", [1.0, 0.05])
@pytest.mark.parametrize("shape", [(64, 6, 5), (64, 6)], ids=["NCL", "NC"])
def test_large_common_offset_still_normalises(offset, spread, shape):
    """A float32 batch x = offset + small spread: E[x²] − E[x]² would cancel to garbage;
    the shifted computation must agree with float64 arithmetic on the same numbers
    (the (N, C) shape takes the written-out path, the (N, C, L) one the general path)."""
    g = torch.Generator().manual_seed(1)
    x = (offset + spread * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    dy = torch.randn(shape, generator=g)
    x64 = x.double()  # the truth: float64 arithmetic on exactly the float32 inputs
    dims = F.channel_dims(x)
    mean = x64.mean(dims, keepdim=True)
    var = x64.var(dims, unbiased=False, keepdim=True)
    truth = (x64 - mean) / torch.sqrt(var + 1e-5)
    rm, rv = torch.zeros(6), torch.ones(6)
    xg = x.clone().requires_grad_(True)
    out = F.batch_norm(xg, rm, rv, training=True, momentum=1.0)
    assert (out.double() - truth).abs().max() < 1e-4
    # the moments the running buffers receive are accurate too
    torch.testing.assert_close(rm.double(), mean.flatten(), rtol=1e-7, atol=0)
    n = x.numel() // 6
    torch.testing.assert_close(rv.double(), var.flatten() * n / (n - 1), rtol=1e-4, atol=0)
    # and so is the input gradient (against float64 autograd on the same inputs)
    out.backward(dy)
    x64g = x64.clone().requires_grad_(True)
    TF.batch_norm(x64g, None, None, training=True).backward(dy.double())
    rel = (xg.grad.double() - x64g.grad).abs().max() / x64g.grad.abs().max()
    assert rel < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("shape", [(32, 4), (8, 4, 5, 5)], ids=["NC", "NCHW"])
def test_half_precision_matches_torch_loosely(dtype, shape):
    """Half inputs are normalised in float32 and cast back (as torch does on CPU)."""
    x, w, b, rm, rv, dy = _inputs(shape, torch.float32)
    x, dy = x.to(dtype), dy.to(dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    for training in (True, False):
        ours = _run(F.batch_norm, x, w, b, rm, rv, dy, training)
        ref = _run(TF.batch_norm, x, w, b, rm, rv, dy, training)
        assert ours[0].dtype == dtype
        _close(ours[0], ref[0], **tol)
        for g_ours, g_ref in zip(ours[1], ref[1]):
            _close(g_ours, g_ref, **tol)
        _close(ours[2], ref[2], **tol)
        _close(ours[3], ref[3], **tol)


def test_channel_dims():
    assert F.channel_dims(torch.zeros(2, 3)) == (0,)
    assert F.channel_dims(torch.zeros(2, 3, 4)) == (0, 2)
    assert F.channel_dims(torch.zeros(2, 3, 4, 5)) == (0, 2, 3)


# --- errors: the same exception type as torch, with a clear message -----------------------

def _raises_like_torch(call, exc, match):
    with pytest.raises(exc, match=match):
        call(F.batch_norm)
    with pytest.raises(exc):
        call(TF.batch_norm)


def test_error_wrong_channel_count():
    _raises_like_torch(lambda f: f(torch.randn(4, 3), torch.zeros(5), torch.ones(5), training=True),
                       RuntimeError, "running_mean should contain 3 elements not 5")
    _raises_like_torch(lambda f: f(torch.randn(4, 3), torch.zeros(3), torch.ones(3), torch.ones(4),
                                   training=True), RuntimeError, "weight")


def test_error_one_value_per_channel_in_training():
    _raises_like_torch(lambda f: f(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True),
                       ValueError, "more than 1 value per channel")
    _raises_like_torch(lambda f: f(torch.randn(1, 3, 1, 1), None, None, training=True),
                       ValueError, "more than 1 value per channel")
    # one example is fine in eval mode
    out = F.batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=False)
    assert out.shape == (1, 3)


def test_error_eval_without_running_stats():
    _raises_like_torch(lambda f: f(torch.randn(4, 3), None, None, training=False),
                       RuntimeError, "running_mean must be defined")


def test_error_non_float_input():
    x = torch.ones(4, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="floating-point.*int64"):
        F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
    with pytest.raises((NotImplementedError, RuntimeError)):  # torch's own: less clear
        TF.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
    with pytest.raises(TypeError, match="expects a Tensor"):
        F.batch_norm([[1.0, 2.0]], None, None, training=True)


def test_error_wrong_rank():
    with pytest.raises(ValueError, match=r"\(N, C, \.\.\.\)"):
        F.batch_norm(torch.randn(5), None, None, training=True)


def test_error_momentum_none_points_to_modules():
    with pytest.raises(TypeError, match="momentum"):
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)
    with pytest.raises(TypeError):
        TF.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)


# --- CUDA (run on a GPU machine) ------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_on_cuda(shape, training):
    x, w, b, rm, rv, dy = (t.cuda() for t in _inputs(shape, torch.float32))
    ours = _run(F.batch_norm, x, w, b, rm, rv, dy, training)
    ref = _run(TF.batch_norm, x, w, b, rm, rv, dy, training)
    tol = dict(rtol=1e-4, atol=1e-4)
    assert ours[0].device.type == "cuda"
    _close(ours[0], ref[0], **tol)
    for g_ours, g_ref in zip(ours[1], ref[1]):
        _close(g_ours, g_ref, **tol)
    _close(ours[2], ref[2], **tol)
    _close(ours[3], ref[3], **tol)


@pytest.mark.cuda
def test_large_offset_on_cuda():
    x = (1e5 + torch.randn(256, 8, dtype=torch.float64)).float().cuda()
    x64 = x.double()
    truth = (x64 - x64.mean(0)) / torch.sqrt(x64.var(0, unbiased=False) + 1e-5)
    out = F.batch_norm(x, None, None, training=True)
    assert (out.double() - truth).abs().max() < 1e-3
