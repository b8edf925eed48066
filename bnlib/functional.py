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
offset), with the corrected two-pass refinement of the mean, and the output scales the
centred values rather than ``x`` itself: a float32 batch at an offset of 1e5 is normalised
to float32 precision (torch's native kernel loses about 1e-2 there). Half-precision inputs
are normalised in float32 and cast back.

Speed: every step is a plain tensor operation, so bnlib does a few more passes over memory
than torch's fused kernel; ``benchmarks/bench_batchnorm.py`` measures the difference.
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


def _affine(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """``x · scale + shift`` with per-channel ``scale`` and ``shift`` of shape ``(C,)``,
    written into ``out`` when given (a spent temporary of ``x``'s shape: reusing it keeps
    the memory, and the cache, a pass needs smaller).

    For ``(N, C)`` inputs this is one fused pass (``addcmul``). For ``(N, C, L)`` and
    ``(N, C, H, W)`` it is a multiply and an in-place add: there both vectors are
    broadcast along the contiguous last dimension, where PyTorch's CPU ``addcmul``
    kernel (three operands, two of them broadcast) falls back to scalar code and is
    slower than two vectorised passes.
    """
    if x.dim() == 2:
        return torch.addcmul(shift, x, scale, out=out)
    return torch.mul(x, _broadcast(scale, x), out=out).add_(_broadcast(shift, x))


def _normalize(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """The training-mode forward pass: ``(out, mean, var, saved)``, where ``mean`` and ``var``
    (biased) are the batch statistics and ``saved`` is what the backward pass needs."""
    dims = channel_dims(x)
    # Centre first, then average squared deviations (two passes, never E[x²] − E[x]²).
    # The float32 mean of values with a large common offset is off by about an ulp of the
    # offset; ``r``, the mean of the centred values, measures that residue, and
    # mean((xc − r)²) = mean(xc²) − r² is exact algebra on *centred* data, where r is
    # tiny: the "corrected two-pass" algorithm (Chan, Golub & LeVeque, 1983).
    mean0 = x.mean(dims)
    xc = x - _broadcast(mean0, x)
    r = xc.mean(dims)
    sq = xc.square()
    var = torch.addcmul(sq.mean(dims), r, r, value=-1).clamp_(min=0)  # − r²
    invstd = torch.rsqrt(var + eps)
    # out = γ · x̂ + β with x̂ = (xc − r) · invstd, i.e. xc · scale + (β − r · scale)
    # (x̂ is never stored). Scaling the centred xc, not x, keeps a large offset from
    # cancelling.
    scale = invstd * weight
    out = _affine(xc, scale, torch.addcmul(bias, r, scale, value=-1), out=sq)
    return out, mean0 + r, var, (xc, r, invstd)


class _BatchNormFunction(torch.autograd.Function):
    """Normalise with batch statistics; backward is the closed form of chapter 2."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float):
        out, mean, var, (xc, r, invstd) = _normalize(x, weight, bias, eps)
        ctx.save_for_backward(xc, r, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor, _dmean, _dvar):
        xc, r, invstd, weight = ctx.saved_tensors   # x̂ = (xc − r) · invstd
        dims = channel_dims(xc)
        n = xc.numel() // xc.shape[1]
        dbias = dout.sum(dims)                                                    # Σ dy
        prod = dout * xc
        dweight = torch.addcmul(prod.sum(dims), r, dbias, value=-1).mul_(invstd)  # Σ dy·x̂
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy · x̂)). Expanding x̂ makes it
            # k·dy + c0 + c1·xc with per-channel k = γ/σ, c1 = −k/σ · mean(dy·x̂) and
            # c0 = −k · mean(dy) − r · c1: two passes over the big tensors.
            k = weight * invstd
            k_n = k / -n
            c1 = k_n * invstd * dweight
            c0 = torch.addcmul(k_n * dbias, r, c1, value=-1)
            dx = _affine(dout, k, c0, out=prod).addcmul_(xc, _broadcast(c1, xc))
        return dx, dweight, dbias, None


class _FrozenBatchNormFunction(torch.autograd.Function):
    """Evaluation mode: the fixed per-channel affine map ``γ (x − μ) / σ + β`` with the
    running ``μ`` and ``σ``; its backward is the closed form too (nothing depends on the
    batch, so ``dx = γ/σ · dy``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor):
        scale = invstd * weight
        ctx.save_for_backward(x, mean, invstd, weight)
        return _affine(x, scale, torch.addcmul(bias, mean, scale, value=-1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        x, mean, invstd, weight = ctx.saved_tensors
        dims = channel_dims(x)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = dout * _broadcast(weight * invstd, x)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dbias = dout.sum(dims)                                             # Σ dy
            dweight = torch.addcmul((dout * x).sum(dims), mean, dbias, value=-1).mul_(invstd)
        return dx, dweight, dbias, None, None


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

    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad)
    if training:
        if needs_grad:
            out, mean, var = _BatchNormFunction.apply(x, w, b, eps)
        else:  # nothing to differentiate: skip the autograd.Function machinery
            out, mean, var, _ = _normalize(x, w, b, eps)
        if running_mean is not None and running_var is not None:
            n = x.numel() // c
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(var, alpha=momentum * n / (n - 1))  # unbiased
    else:
        # Inference: a fixed affine map per channel (which is why it can be folded away).
        mean, invstd = running_mean.to(x.dtype), torch.rsqrt(running_var.to(x.dtype) + eps)
        if needs_grad:
            out = _FrozenBatchNormFunction.apply(x, w, b, mean, invstd)
        else:
            scale = invstd * w
            out = _affine(x, scale, torch.addcmul(b, mean, scale, value=-1))
    return out.to(input.dtype)
