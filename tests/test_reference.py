"""The NumPy reference (bnlib.reference): forward against torch, both backward passes against
autograd and against centred finite differences with a random upstream gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from bnlib import reference as ref


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    n, d = 6, 4
    x = rng.normal(size=(n, d)) * 2 + 1
    gamma = rng.uniform(0.5, 1.5, size=d)
    beta = rng.normal(size=d)
    dout = rng.normal(size=(n, d))
    return x, gamma, beta, dout


def _torch_grads(x, gamma, beta, dout, eps=1e-5):
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    out = TF.batch_norm(xt, None, None, gt, bt, training=True, eps=eps)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()


def test_forward_matches_torch(batch):
    x, gamma, beta, dout = batch
    out, cache = ref.batchnorm_forward(x, gamma, beta)
    np.testing.assert_allclose(out, _torch_grads(x, gamma, beta, dout)[0], rtol=1e-12, atol=1e-12)
    xhat = cache["xhat"]
    np.testing.assert_allclose(xhat.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(xhat.var(0), x.var(0) / (x.var(0) + 1e-5), rtol=1e-12)


@pytest.mark.parametrize("backward", [ref.batchnorm_backward, ref.batchnorm_backward_naive],
                         ids=["closed-form", "naive"])
def test_backward_matches_autograd(batch, backward):
    x, gamma, beta, dout = batch
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = backward(dout, cache)
    _, tdx, tdgamma, tdbeta = _torch_grads(x, gamma, beta, dout)
    np.testing.assert_allclose(dx, tdx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dgamma, tdgamma, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dbeta, tdbeta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backward", [ref.batchnorm_backward, ref.batchnorm_backward_naive],
                         ids=["closed-form", "naive"])
def test_backward_matches_finite_differences(batch, backward):
    x, gamma, beta, dout = batch
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = backward(dout, cache)
    num_dx = ref.numerical_gradient(lambda a: ref.batchnorm_forward(a, gamma, beta)[0], x.copy(), dout)
    num_dgamma = ref.numerical_gradient(lambda g: ref.batchnorm_forward(x, g, beta)[0], gamma.copy(), dout)
    num_dbeta = ref.numerical_gradient(lambda b: ref.batchnorm_forward(x, gamma, b)[0], beta.copy(), dout)
    for analytic, numeric in ((dx, num_dx), (dgamma, num_dgamma), (dbeta, num_dbeta)):
        rel = np.abs(analytic - numeric).max() / max(np.abs(numeric).max(), 1e-12)
        assert rel < 1e-6


def test_both_backward_versions_agree(batch):
    x, gamma, beta, dout = batch
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    for a, b in zip(ref.batchnorm_backward(dout, cache), ref.batchnorm_backward_naive(dout, cache)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_all_ones_upstream_gradient_gives_zero_dx(batch):
    """Why the checks use a random dout: with dout = 1 the true dx is exactly zero."""
    x, gamma, beta, _ = batch
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    dx, _, _ = ref.batchnorm_backward(np.ones_like(x), cache)
    np.testing.assert_allclose(dx, 0, atol=1e-12)


def test_numerical_gradient_of_a_known_function():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    dout = np.array([[1.0, 2.0], [-1.0, 0.5]])
    grad = ref.numerical_gradient(lambda a: a ** 2, x, dout)
    np.testing.assert_allclose(grad, 2 * x * dout, rtol=1e-8)
    np.testing.assert_array_equal(x, [[1.0, -2.0], [0.5, 3.0]])  # restored after perturbing


def test_integer_input_is_promoted_and_bad_shapes_raise():
    out, _ = ref.batchnorm_forward(np.array([[1, 2], [3, 5]]), np.ones(2), np.zeros(2))
    assert out.dtype == np.float64
    np.testing.assert_allclose(np.abs(out), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        ref.batchnorm_forward(np.ones(4), np.ones(4), np.zeros(4))
    with pytest.raises(ValueError, match="at least 2 examples"):
        ref.batchnorm_forward(np.ones((1, 3)), np.ones(3), np.zeros(3))


def test_matches_bnlib_functional(batch):
    """The NumPy reference and bnlib's torch implementation compute the same numbers."""
    from bnlib.functional import batch_norm
    x, gamma, beta, dout = batch
    out, cache = ref.batchnorm_forward(x, gamma, beta)
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    ot = batch_norm(xt, None, None, gt, bt, training=True)
    ot.backward(torch.tensor(dout))
    np.testing.assert_allclose(ot.detach().numpy(), out, rtol=1e-12, atol=1e-12)
    for a, b in zip((xt.grad, gt.grad, bt.grad), ref.batchnorm_backward(dout, cache)):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-9, atol=1e-12)


def _problem(n=6, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = 4 * rng.standard_normal((n, d)) + 3
    gamma, beta = rng.standard_normal(d), rng.standard_normal(d)
    out, cache = ref.batchnorm_forward(x, gamma, beta)
    return x, gamma, beta, rng.standard_normal((n, d)), cache


def test_relative_error():
    a = np.array([1.0, 2.0])
    assert ref.relative_error(a, a) == 0.0
    assert ref.relative_error(a, -a) == pytest.approx(1.0)
    assert ref.relative_error(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError):
        ref.relative_error(a, np.ones(3))
    with pytest.raises(ValueError):
        ref.relative_error(a, np.array([1.0, np.nan]))


def test_autograd_matches_closed_form_and_buggy_backward_is_caught_only_by_random_dout():
    x, gamma, beta, dout, cache = _problem()
    ours = ref.batchnorm_backward(dout, cache)
    auto = ref.autograd_batchnorm_grads(x, gamma, beta, dout)
    for a, b in zip(ours, auto):
        assert ref.relative_error(a, b) < 1e-12
    ones = np.ones_like(dout)
    good = ref.batchnorm_backward(ones, cache)[0]
    bad = ref.backward_without_variance_path(ones, cache)[0]
    assert np.abs(good).max() < 1e-12 and np.abs(bad).max() < 1e-12   # the trap: both zero
    assert ref.relative_error(ref.backward_without_variance_path(dout, cache)[0], ours[0]) > 1e-2
    with pytest.raises(ValueError):
        ref.autograd_batchnorm_grads(x, gamma, beta, dout[:2])


def test_backward_peak_memory_and_bad_impl():
    assert ref.backward_peak_memory(512, 64, "closed form") < ref.backward_peak_memory(512, 64, "naive")
    with pytest.raises(ValueError):
        ref.backward_peak_memory(8, 4, "fast")
