"""Timing and memory of bnlib's batch norm against torch's kernel and two teaching versions.

Four implementations of the same layer, timed on the same inputs in the same run:

* ``native`` — ``torch.nn.BatchNorm1d/2d`` (one fused C++ kernel each way);
* ``bnlib`` — :class:`bnlib.nn.BatchNorm1d/2d` (tensor operations, closed-form backward);
* ``d2l-style`` — :class:`AutogradBatchNorm`, the textbook layer that lets autograd
  differentiate through its mean and variance (written here for the comparison);
* ``CS231n NumPy`` — :class:`NumpyBatchNorm`, forward and closed-form backward in
  NumPy (:mod:`bnlib.reference`), images reshaped to ``(N·H·W, C)`` as that course does;
  timed twice: ``raw`` (arrays in, arrays out: no autograd, no ``.grad``, so it skips
  work every PyTorch layer does) and ``layer`` (wrapped in an ``autograd.Function``,
  :class:`NumpyBatchNormLayer`, as a PyTorch model would use it).

:func:`compare` returns one row per (input, pass, implementation) with the median time,
its interquartile range and the ratio to ``native``; :func:`comparison_table` is the same
at a tiny size, quick enough for a notebook cell. :func:`saved_bytes` counts what a
training step keeps for the backward pass. The timing harness (:func:`time_interleaved`)
calls the implementations in a fresh random order in every repeat and reads CPU time on
the CPU (wall time between synchronisations on a GPU), so that a shared machine's slow
spells hit every implementation alike.
"""
from __future__ import annotations

import statistics
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from . import nn as bnn
from . import reference

__all__ = ["AutogradBatchNorm", "NumpyBatchNorm", "NumpyBatchNormLayer", "IMPLEMENTATIONS", "SHAPES", "TINY_SHAPES",
           "PASSES", "time_interleaved", "compare", "comparison_table", "saved_bytes",
           "memory_table", "op_count", "cost_breakdown"]

SHAPES: dict[str, tuple[int, ...]] = {
    "MLP (256, 512)": (256, 512),
    "CNN (64, 64, 32, 32)": (64, 64, 32, 32),
}
TINY_SHAPES: dict[str, tuple[int, ...]] = {
    "MLP (128, 256)": (128, 256),
    "CNN (16, 16, 16, 16)": (16, 16, 16, 16),
}
PASSES = ("train fwd", "train fwd+bwd", "eval fwd", "eval fwd+bwd")


class AutogradBatchNorm(nn.Module):
    """Batch norm the way textbooks first write it (the pattern of d2l.ai's layer):
    per-channel mean and biased variance of the batch, normalise, scale and shift, and
    let autograd work out the backward pass through every one of those operations.
    Running statistics are moving averages with PyTorch's momentum convention."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)   # a per-channel vector, broadcastable
        dims = [0] + list(range(2, x.dim()))
        if self.training:
            mu = x.mean(dim=dims, keepdim=True)
            var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mu.flatten())
                self.running_var.mul_(1 - m).add_(m * n / (n - 1) * var.flatten())
        else:
            mu, var = self.running_mean.view(shape), self.running_var.view(shape)
        x_hat = (x - mu) / torch.sqrt(var + self.eps)
        return self.weight.view(shape) * x_hat + self.bias.view(shape)


class NumpyBatchNorm:
    """The CS231n pattern in NumPy: ``forward`` keeps a cache (the same arithmetic as
    :func:`bnlib.reference.batchnorm_forward`, plus the running statistics), ``backward``
    is the closed form :func:`bnlib.reference.batchnorm_backward`. An
    ``(N, C, H, W)`` input is transposed and reshaped to ``(N·H·W, C)`` and back, as the
    course's spatial batch norm does. Works on float32 arrays."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        self.eps, self.momentum = eps, momentum
        self.gamma = np.ones(num_features, dtype=np.float32)
        self.beta = np.zeros(num_features, dtype=np.float32)
        self.running_mean = np.zeros(num_features, dtype=np.float32)
        self.running_var = np.ones(num_features, dtype=np.float32)

    @staticmethod
    def _flat(x: np.ndarray) -> np.ndarray:
        return x if x.ndim == 2 else np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])

    @staticmethod
    def _unflat(y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 2:
            return y
        return np.moveaxis(y.reshape((shape[0],) + shape[2:] + (shape[1],)), -1, 1)

    def forward(self, x: np.ndarray, training: bool = True):
        """``(out, cache)``; in training mode the running statistics move too."""
        flat = self._flat(x)
        if not training:
            out = (flat - self.running_mean) / np.sqrt(self.running_var + self.eps) * self.gamma + self.beta
            return self._unflat(out, x.shape), None
        mu = flat.mean(axis=0)
        xc = flat - mu
        var = (xc ** 2).mean(axis=0)
        inv_std = 1.0 / np.sqrt(var + self.eps)
        xhat = xc * inv_std
        out = self.gamma * xhat + self.beta
        cache = {"xhat": xhat, "inv_std": inv_std, "gamma": self.gamma}
        n, m = flat.shape[0], self.momentum
        self.running_mean = (1 - m) * self.running_mean + m * mu
        self.running_var = (1 - m) * self.running_var + m * var * (n / (n - 1))
        return self._unflat(out, x.shape), cache

    def backward(self, dout: np.ndarray, cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(dx, dgamma, dbeta)`` by the closed form."""
        dx, dgamma, dbeta = reference.batchnorm_backward(self._flat(dout), cache)
        return self._unflat(dx, dout.shape), dgamma, dbeta


class _NumpyFunction(torch.autograd.Function):
    """Runs a :class:`NumpyBatchNorm` inside autograd: tensors in, NumPy arrays inside."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, layer: "NumpyBatchNorm",
                training: bool) -> Tensor:
        layer.gamma, layer.beta = weight.detach().numpy(), bias.detach().numpy()
        out, ctx.cache = layer.forward(x.detach().numpy(), training)
        ctx.layer = layer
        return torch.from_numpy(np.ascontiguousarray(out))

    @staticmethod
    def backward(ctx, dout: Tensor):
        dx, dgamma, dbeta = ctx.layer.backward(dout.contiguous().numpy(), ctx.cache)
        return (torch.from_numpy(np.ascontiguousarray(dx)), torch.from_numpy(dgamma),
                torch.from_numpy(dbeta), None, None)


class NumpyBatchNormLayer(nn.Module):
    """:class:`NumpyBatchNorm` wrapped as a PyTorch layer (CPU, float32, training mode
    differentiable): what using the CS231n code inside a PyTorch model takes."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.numpy = NumpyBatchNorm(num_features)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            return _NumpyFunction.apply(x, self.weight, self.bias, self.numpy, True)
        self.numpy.gamma, self.numpy.beta = self.weight.detach().numpy(), self.bias.detach().numpy()
        out, _ = self.numpy.forward(x.detach().numpy(), self.training)
        return torch.from_numpy(np.ascontiguousarray(out))


IMPLEMENTATIONS = ("native", "bnlib", "d2l-style", "CS231n NumPy layer", "CS231n NumPy raw")
_NUMPY = ("CS231n NumPy layer", "CS231n NumPy raw")


def _layer(impl: str, shape: tuple[int, ...], device: torch.device):
    c = shape[1]
    if impl == "native":
        return (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(c).to(device)
    if impl == "bnlib":
        return (bnn.BatchNorm1d if len(shape) < 4 else bnn.BatchNorm2d)(c).to(device)
    if impl == "d2l-style":
        return AutogradBatchNorm(c).to(device)
    if impl == "CS231n NumPy layer":
        return NumpyBatchNormLayer(c)
    if impl == "CS231n NumPy raw":
        return NumpyBatchNorm(c)
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLEMENTATIONS}")


def _step(impl: str, shape: tuple[int, ...], pass_: str, device: torch.device) -> Callable[[], None]:
    """A zero-argument callable doing one ``pass_`` of ``impl`` on a fixed random input."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    dy = torch.randn(shape, generator=g).to(device)
    training = pass_.startswith("train")
    backward = pass_.endswith("bwd")
    layer = _layer(impl, shape, device)
    if impl in _NUMPY and device.type != "cpu":
        raise ValueError("the NumPy implementations run on the CPU only")
    if impl in _NUMPY and pass_ == "eval fwd+bwd":
        raise ValueError("the NumPy implementations have no evaluation-mode backward pass")
    if impl == "CS231n NumPy raw":
        xn, dyn = x.numpy(), dy.numpy()

        def step() -> None:
            out, cache = layer.forward(xn, training)
            if backward:
                layer.backward(dyn, cache)
        return step
    layer.train(training)
    if not backward:
        def step() -> None:
            with torch.no_grad():
                layer(x)
        return step
    xg = x.clone().requires_grad_(True)

    def step() -> None:
        layer(xg).backward(dy)
        xg.grad = None
        layer.weight.grad = None
        layer.bias.grad = None
    return step


def time_interleaved(fns: Mapping[str, Callable[[], None]], *, repeats: int = 20,
                     warmup: int = 3, seed: int = 0,
                     device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` times each, interleaved: the book's
    timing harness (:func:`bnlib.timing.time_interleaved`: a fresh seeded order in every
    repeat, CPU time on the CPU, wall time between synchronisations on a GPU), as lists."""
    from .timing import time_interleaved as _harness
    df = _harness(fns, repeats=repeats, number=1, warmup=warmup, seed=seed,
                  device=torch.device(device))
    return {name: df.loc[df["name"] == name, "seconds"].tolist() for name in fns}


def compare(shapes: Mapping[str, tuple[int, ...]] | None = None, *,
            passes: tuple[str, ...] = PASSES,
            implementations: tuple[str, ...] = IMPLEMENTATIONS,
            repeats: int = 20, warmup: int = 3, threads: int | None = None,
            device: torch.device | str = "cpu", seed: int = 0) -> pd.DataFrame:
    """Time every implementation on every input and pass, interleaved per (input, pass).

    Returns one row per (``input``, ``pass``, ``implementation``) with ``median_us``,
    ``iqr_us`` (interquartile range) and ``ratio`` = median / the native median (below 1:
    faster than torch's kernel). ``threads`` sets ``torch.set_num_threads`` for the run
    (restored afterwards). The NumPy implementation is skipped off the CPU.
    """
    shapes = SHAPES if shapes is None else shapes
    device = torch.device(device)
    for p in passes:
        if p not in PASSES:
            raise ValueError(f"unknown pass {p!r}; choose from {PASSES}")
    impls = [i for i in implementations if device.type == "cpu" or i not in _NUMPY]
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    try:
        for label, shape in shapes.items():
            for p in passes:
                fns = {impl: _step(impl, shape, p, device) for impl in impls
                       if not (impl in _NUMPY and p == "eval fwd+bwd")}
                times = time_interleaved(fns, repeats=repeats, warmup=warmup, seed=seed,
                                         device=device)
                for impl in fns:
                    us = [t * 1e6 for t in times[impl]]
                    q1, med, q3 = statistics.quantiles(us, n=4, method="inclusive")
                    rows.append({"input": label, "pass": p, "implementation": impl,
                                 "median_us": med, "iqr_us": q3 - q1})
    finally:
        torch.set_num_threads(old_threads)
    df = pd.DataFrame(rows)
    if "native" in impls:
        native = df[df["implementation"] == "native"].set_index(["input", "pass"])["median_us"]
        df["ratio"] = [m / native[(i, p)] for i, p, m in
                       zip(df["input"], df["pass"], df["median_us"])]
    return df


def comparison_table(repeats: int = 15, threads: int = 1, seed: int = 0) -> pd.DataFrame:
    """The four implementations at a tiny size (:data:`TINY_SHAPES`), training forward +
    backward and evaluation forward: median µs, one column per implementation, plus the
    ratio of each to the native kernel. A couple of seconds on one CPU thread."""
    df = compare(TINY_SHAPES, passes=("train fwd+bwd", "eval fwd"), repeats=repeats,
                 threads=threads, seed=seed)
    wide = df.pivot_table(index=["input", "pass"], columns="implementation",
                          values="median_us", sort=False)[list(IMPLEMENTATIONS)]
    return wide.round(1)


def saved_bytes(layer: nn.Module, x: Tensor) -> dict[str, int]:
    """Bytes a training step of ``layer`` on ``x`` keeps for its backward pass, counted
    with :func:`torch.autograd.graph.saved_tensors_hooks` (each storage once).

    Returns ``total`` (every saved storage) and ``beyond_input`` (storages other than
    ``x``'s own: what the step adds to memory when nothing else holds ``x``).
    """
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    xg = x.detach().requires_grad_(True)
    layer.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(xg)
    own = xg.untyped_storage().data_ptr()
    return {"total": sum(storages.values()),
            "beyond_input": sum(b for p, b in storages.items() if p != own)}


def op_count(impl: str, shape: tuple[int, ...], training: bool = True) -> dict[str, int]:
    """How many ATen operations one step of ``impl`` dispatches (views included): the
    ``forward`` pass and the ``backward`` pass of a step on a random input. With tensors
    small enough that arithmetic is free, time per step grows with these counts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    layer = _layer(impl, shape, torch.device("cpu")).train(training)
    x = torch.randn(shape).requires_grad_(True)
    dy = torch.randn(shape)
    with _Count():
        out = layer(x)
        fwd = _Count.n
        out.backward(dy)
    return {"forward": fwd, "backward": _Count.n - fwd}


def memory_table(shapes: Mapping[str, tuple[int, ...]] | None = None) -> pd.DataFrame:
    """:func:`saved_bytes` of the three PyTorch implementations for each input shape,
    with ``ratio`` = total / the native total."""
    shapes = SHAPES if shapes is None else shapes
    rows = []
    for label, shape in shapes.items():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for impl in ("native", "bnlib", "d2l-style"):
            b = saved_bytes(_layer(impl, shape, torch.device("cpu")), x)
            rows.append({"input": label, "implementation": impl, "saved_bytes": b["total"],
                         "beyond_input_bytes": b["beyond_input"]})
    df = pd.DataFrame(rows)
    native = df[df["implementation"] == "native"].set_index("input")["saved_bytes"]
    df["ratio"] = df["saved_bytes"] / df["input"].map(native)
    return df


class _Ctx:
    """Stands in for autograd's ``ctx`` so that :func:`cost_breakdown` can call bnlib's
    forward and backward bodies directly, without the autograd machinery around them."""

    needs_input_grad = (True, True, True, False, False, False, False)

    def save_for_backward(self, *tensors: Tensor) -> None:
        self.saved_tensors = tensors


def cost_breakdown(shape: tuple[int, ...] = (256, 512), *, repeats: int = 60,
                   warmup: int = 5, seed: int = 0) -> pd.DataFrame:
    """Where a training forward + backward step's CPU time goes, native against bnlib.

    Times, interleaved (:func:`time_interleaved`, one thread as set by the caller), with
    a fixed random input and upstream gradient of ``shape``:

    * ``native step`` / ``bnlib step``: the layer's forward and backward through autograd
      (the ``train fwd+bwd`` entry of :func:`compare`);
    * ``native kernels``: ``torch.native_batch_norm`` and its backward, called directly;
    * ``bnlib arithmetic``: bnlib's forward and backward bodies (statistics, output,
      running statistics, closed-form gradients) called directly, no autograd, no module;
    * ``bnlib data passes``: only the operations of those bodies that touch data-sized
      tensors (centring, the two moments, the output, ``Σ dy``, ``dy · xk`` and its sum,
      the two passes for ``dx``), with γ and β standing in for every per-channel
      coefficient: ``bnlib arithmetic`` minus this is what the per-channel arithmetic and
      the running statistics cost;
    * ``bnlib arithmetic, batch of 2``: the same calls on a ``(2, C, ...)`` input, where the
      data is too small to cost anything: what bnlib's sequence of tensor operations costs
      in dispatch alone.

    Returns one row per entry with the median CPU µs.
    """
    from . import functional as bf

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    dy = torch.randn(shape, generator=g)
    small = torch.randn((2,) + tuple(shape[1:]), generator=g)
    c = shape[1]
    w, b = torch.ones(c), torch.zeros(c)
    rm, rv = torch.zeros(c), torch.ones(c)

    def kernels() -> None:
        out, mean, invstd = torch.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
        torch.ops.aten.native_batch_norm_backward(dy, x, w, rm, rv, mean, invstd, True, 1e-5,
                                                  [True, True, True])

    def bodies(inp: Tensor, grad: Tensor) -> Callable[[], None]:
        def run() -> None:
            ctx = _Ctx()
            bf._BatchNormFunction.forward(ctx, inp, w, b, rm, rv, 0.1, 1e-5)
            bf._BatchNormFunction.backward(ctx, grad)
        return run

    def passes() -> None:
        if x.dim() == 2:  # as bf._normalize_2d
            xk = x - x[0]
            xk.mean(0)
            sq = xk * xk
            sq.mean(0)
        else:
            xk, sq, *_ = bf._moments(x)
        bf._affine(xk, w, b, out=sq)
        prod = dy * xk  # as bf._backward
        bf._channel_sum(dy), bf._channel_sum(prod)
        bf._affine(dy, w, b, out=prod).addcmul_(xk, bf._broadcast(w, xk))

    fns = {"native step": _step("native", shape, "train fwd+bwd", torch.device("cpu")),
           "native kernels": kernels,
           "bnlib step": _step("bnlib", shape, "train fwd+bwd", torch.device("cpu")),
           "bnlib arithmetic": bodies(x, dy),
           "bnlib data passes": passes,
           "bnlib arithmetic, batch of 2": bodies(small, torch.randn_like(small))}
    times = time_interleaved(fns, repeats=repeats, warmup=warmup, seed=seed)
    return pd.DataFrame([{"entry": k, "median_us": statistics.median(v) * 1e6}
                         for k, v in times.items()])
