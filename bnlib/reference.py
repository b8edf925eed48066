"""Batch norm in NumPy, float64, written to be read (chapters 1 and 2).

The pattern is CS231n's: ``forward`` returns the output and a *cache* of what the
backward pass needs; ``backward`` turns the upstream gradient into gradients for the
input and the two learned vectors. Inputs are ``(N, D)`` arrays: N examples, D features.

Two backward passes are given. :func:`batchnorm_backward_naive` walks the computation
graph node by node (mean, centring, variance, inverse std, normalise, scale, shift);
:func:`batchnorm_backward` is the closed form that the graph collapses to. The book
checks both against centred finite differences (:func:`numerical_gradient`) and
against autograd (:func:`autograd_batchnorm_grads`), measuring agreement with
:func:`relative_error`; :func:`backward_without_variance_path` is a deliberately wrong
backward for teaching, and :func:`backward_peak_memory` measures what each backward allocates.
"""
from __future__ import annotations

import tracemalloc
from typing import Callable

import numpy as np

__all__ = ["batchnorm_forward", "batchnorm_backward", "batchnorm_backward_naive",
           "numerical_gradient", "relative_error", "autograd_batchnorm_grads",
           "backward_without_variance_path", "backward_peak_memory", "BACKWARDS", "random_problem"]

Cache = dict


def _as_2d_float(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return x


def batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                      eps: float = 1e-5) -> tuple[np.ndarray, Cache]:
    """Normalise each column of ``x`` with its batch mean and (biased) variance, then scale and shift.

    Returns ``(out, cache)``; ``out = gamma * (x - mean) / sqrt(var + eps) + beta``.
    """
    x = _as_2d_float(x, "x")
    if x.shape[0] < 2:
        raise ValueError(f"batch norm needs at least 2 examples per feature, got N={x.shape[0]}")
    mu = x.mean(axis=0)
    xc = x - mu                       # centre
    var = (xc ** 2).mean(axis=0)      # biased variance: divide by N
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = xc * inv_std               # normalised: mean 0, variance ≈ 1 per feature
    out = gamma * xhat + beta         # learned scale and shift
    cache = {"xc": xc, "var": var, "inv_std": inv_std, "xhat": xhat, "gamma": gamma, "eps": eps}
    return out, cache


def batchnorm_backward_naive(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backpropagate through every node of the forward graph, one local derivative at a time."""
    xc, var, inv_std, xhat, gamma, eps = (cache[k] for k in ("xc", "var", "inv_std", "xhat", "gamma", "eps"))
    n = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dxhat = dout * gamma
    # xhat = xc * inv_std
    dxc = dxhat * inv_std
    dinv_std = (dxhat * xc).sum(axis=0)
    # inv_std = (var + eps) ** -1/2
    dvar = dinv_std * -0.5 * (var + eps) ** -1.5
    # var = mean(xc ** 2)
    dxc += dvar * 2.0 * xc / n
    # xc = x - mu, mu = mean(x)
    dmu = -dxc.sum(axis=0)
    dx = dxc + dmu / n
    return dx, dgamma, dbeta


def batchnorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The closed form: ``dx = gamma * inv_std * (dout - mean(dout) - xhat * mean(dout * xhat))``.

    One expression instead of seven nodes, and no intermediate the size of ``x`` is kept
    apart from ``xhat``.
    """
    xhat, inv_std, gamma = cache["xhat"], cache["inv_std"], cache["gamma"]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dx = gamma * inv_std * (dout - dout.mean(axis=0) - xhat * (dout * xhat).mean(axis=0))
    return dx, dgamma, dbeta


def numerical_gradient(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                       dout: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Centred finite differences of ``sum(f(x) * dout)`` with respect to ``x``.

    ``f`` maps an array to an array; ``dout`` is the upstream gradient (use a random one:
    with an all-ones ``dout`` the true ``dx`` of batch norm is exactly zero and the check
    proves nothing). ``x`` is perturbed in place and restored.
    """
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = np.sum(f(x) * dout)
        x[i] = old - h
        minus = np.sum(f(x) * dout)
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """``‖a − b‖ / (‖a‖ + ‖b‖)``: 0 for equal arrays, 1 for opposite ones (0 when both are 0).

    A norm-wise relative error, so a few entries that are almost zero in both arrays
    cannot blow it up (an element-wise ratio would).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("relative_error got a NaN or infinite entry")
    den = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if den == 0 else float(np.linalg.norm(a - b) / den)


def autograd_batchnorm_grads(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dout: np.ndarray,
                             eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx, dgamma, dbeta)`` of ``sum(BN(x) * dout)`` computed by torch autograd, float64.

    The forward is written with plain tensor operations (mean, centring, biased variance,
    ``rsqrt``, scale, shift), so autograd differentiates its *own* graph: an independent
    check of the hand-derived backward passes in this module.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be an (N, D) array, got shape {x.shape}")
    if np.shape(dout) != x.shape:
        raise ValueError(f"dout must have the shape of x {x.shape}, got {np.shape(dout)}")
    import torch  # the one function here that needs it: the module stays NumPy for readers
    xt = torch.tensor(x, requires_grad=True)
    g = torch.tensor(np.asarray(gamma, dtype=np.float64), requires_grad=True)
    b = torch.tensor(np.asarray(beta, dtype=np.float64), requires_grad=True)
    mu = xt.mean(0)
    xc = xt - mu
    var = (xc ** 2).mean(0)
    out = g * xc * torch.rsqrt(var + eps) + b
    out.backward(torch.tensor(np.asarray(dout, dtype=np.float64)))
    return xt.grad.numpy(), g.grad.numpy(), b.grad.numpy()


def backward_without_variance_path(dout: np.ndarray, cache: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A deliberately WRONG batch-norm backward, for teaching: it forgets that the batch
    variance depends on ``x`` (the ``x̂ · mean(dout · x̂)`` term of the closed form).

    With an all-ones upstream gradient it returns the same ``dx`` (zero) as the correct
    backward, so a gradient check run with ``dout = 1`` cannot tell them apart; a random
    ``dout`` exposes it at once.
    """
    xhat, inv_std, gamma = cache["xhat"], cache["inv_std"], cache["gamma"]
    dx = gamma * inv_std * (dout - dout.mean(axis=0))
    return dx, (dout * xhat).sum(axis=0), dout.sum(axis=0)


#: The two backward passes by name, as chapter 2 times and compares them.
BACKWARDS: dict[str, Callable] = {
    "naive": batchnorm_backward_naive,
    "closed form": batchnorm_backward,
}


def random_problem(n: int, d: int, seed: int) -> tuple[np.ndarray, dict]:
    """A random batch-norm problem of shape ``(n, d)``: the upstream gradient and the cache."""
    if n < 2 or d < 1:
        raise ValueError(f"need n ≥ 2 and d ≥ 1, got n={n}, d={d}")
    rng = np.random.default_rng(seed)
    x = 3.0 * rng.standard_normal((n, d)) + 5.0
    gamma, beta = rng.standard_normal(d), rng.standard_normal(d)
    _, cache = batchnorm_forward(x, gamma, beta)
    return rng.standard_normal((n, d)), cache


def backward_peak_memory(n: int, d: int, impl: str, seed: int = 0) -> int:
    """Peak bytes NumPy allocates (``tracemalloc``) during one backward call of ``impl``
    (``"naive"`` or ``"closed form"``) on an ``(n, d)`` float64 problem."""
    if impl not in BACKWARDS:
        raise ValueError(f"impl must be one of {list(BACKWARDS)}, got {impl!r}")
    dout, cache = random_problem(n, d, seed)
    fn = BACKWARDS[impl]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn(dout, cache)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    del result
    return int(peak)
