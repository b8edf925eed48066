"""Batch norm in NumPy, float64, written to be read (chapters 1 and 2).

The pattern is CS231n's: ``forward`` returns the output and a *cache* of what the
backward pass needs; ``backward`` turns the upstream gradient into gradients for the
input and the two learned vectors. Inputs are ``(N, D)`` arrays: N examples, D features.

Two backward passes are given. :func:`batchnorm_backward_naive` walks the computation
graph node by node (mean, centring, variance, inverse std, normalise, scale, shift);
:func:`batchnorm_backward` is the closed form that the graph collapses to. The book
checks both against centred finite differences (:func:`numerical_gradient`) and
against autograd.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["batchnorm_forward", "batchnorm_backward", "batchnorm_backward_naive",
           "numerical_gradient"]

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
