"""Batch normalization as a function, built from tensor operations.

`batch_norm` has the same contract as :func:`torch.nn.functional.batch_norm`, but every
number it produces comes from code you can read here:

* the forward pass normalises each channel with the biased batch variance and then
  applies the learned scale and shift;
* the backward pass is the hand-derived closed form (chapter 2 of the book derives it),
  wired in through :class:`torch.autograd.Function`, not autograd's own graph;
* in training mode the running statistics are updated in place, with PyTorch's momentum
  convention (``new = (1 - momentum) * old + momentum * batch``) and the *unbiased*
  variance, exactly like torch.

Numerics: the variance is computed as the mean of squared deviations from the mean (never
``E[x²] − E[x]²``, which cancels catastrophically when the features share a large
offset), and half-precision inputs are normalised in float32 and cast back.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_norm", "channel_dims"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def channel_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions a batch norm averages over: every one except the channel dim 1."""
    return (0,) + tuple(range(2, x.dim()))


def _broadcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` so it broadcasts against ``x`` ``(N, C, ...)``."""
    return v.view((1, -1) + (1,) * (x.dim() - 2))


class _BatchNormFunction(torch.autograd.Function):
    """Normalise with batch statistics; backward is the closed form of chapter 2."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float):
        dims = channel_dims(x)
        var, mean = torch.var_mean(x, dim=dims, correction=0)  # two-moment, stable
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight
        shift = bias - mean * scale
        out = torch.addcmul(_broadcast(shift, x), x, _broadcast(scale, x))
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor, _dmean, _dvar):
        x, mean, invstd, weight = ctx.saved_tensors
        dims = channel_dims(x)
        n = x.numel() // x.shape[1]
        xhat = (x - _broadcast(mean, x)) * _broadcast(invstd, x)
        dbias = dout.sum(dims)
        dweight = (dout * xhat).sum(dims)
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy · x̂))
            k = _broadcast(weight * invstd, x)
            dx = k * (dout - _broadcast(dbias / n, x) - xhat * _broadcast(dweight / n, x))
        return dx, dweight, dbias, None


def _check(x: Tensor, running_mean, running_var, weight, bias, training, momentum) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"batch_norm expects a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"batch_norm needs a floating-point input, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects an input of shape (N, C, ...), got {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training and x.numel() // c <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}")
    if momentum is None:
        raise TypeError("momentum must be a float; the cumulative average (momentum=None) "
                        "is a module-level option, see bnlib.nn.BatchNorm1d")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch-normalise ``input`` of shape ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)``.

    Training mode normalises with the statistics of this batch and, when running buffers
    are given, moves them towards the batch statistics in place. Evaluation mode
    normalises with the running buffers. The signature and behaviour match
    :func:`torch.nn.functional.batch_norm`.
    """
    _check(input, running_mean, running_var, weight, bias, training, momentum)
    c = input.shape[1]
    x = input.float() if input.dtype in _LOW_PRECISION else input
    opts = dict(dtype=x.dtype, device=x.device)
    w = weight.to(x.dtype) if weight is not None else torch.ones(c, **opts)
    b = bias.to(x.dtype) if bias is not None else torch.zeros(c, **opts)

    if training:
        out, mean, var = _BatchNormFunction.apply(x, w, b, eps)
        if running_mean is not None and running_var is not None:
            n = x.numel() // c
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
                unbiased = var.detach() * (n / (n - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    else:
        # Inference: a fixed affine map per channel (which is why it can be folded away).
        scale = torch.rsqrt(running_var.to(x.dtype) + eps) * w
        shift = b - running_mean.to(x.dtype) * scale
        out = torch.addcmul(_broadcast(shift, x), x, _broadcast(scale, x))
    return out.to(input.dtype)
