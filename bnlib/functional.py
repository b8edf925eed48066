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

Numerics: the statistics are *shifted* moments. Each channel is first moved by a value
``K`` taken from the batch itself (the first example), ``xk = x − K``; the mean is
``K + mean(xk)`` and the variance ``mean(xk²) − mean(xk)²``. On ``x`` itself that formula
(``E[x²] − E[x]²``) cancels catastrophically when the features share a large offset; on
``xk``, whose values are of the order of the spread, it does not, and the output and the
backward pass scale ``xk`` too, never ``x``. A float32 batch at an offset of 1e5 is
normalised to float32 precision (torch's native kernel loses about 1e-2 there).
Half-precision inputs are normalised in float32 and cast back.

Speed: every step is a plain tensor operation, chosen to touch memory as few times as
that allows: one centring pass, one or two reductions for the moments, one fused
multiply-add for the output (the affine folded into ``x · scale + shift``), two
reductions and two passes for the closed-form backward, and the running statistics in
one fused call. The per-channel arithmetic between them (a dozen operations on ``(C,)``
vectors) is shared by every input shape (:func:`_scale_shift`, :func:`_dx_coefficients`);
``(N, C)`` batches, where each operation's fixed cost is of the order of its arithmetic,
take a path written out operation by operation (:func:`_normalize_2d`,
:func:`_backward_2d`) instead of the layout-aware helpers images need.
``benchmarks/bench_batchnorm.py`` measures what is left of the gap to torch's fused kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_norm", "channel_dims", "eval_scale_shift", "apply_scale_shift"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_REPEAT_MIN = 1 << 16  # elements from which _affine repeats the vectors to (C, L)


def channel_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions a batch norm averages over: every one except the channel dim 1."""
    return (0,) + tuple(range(2, x.dim()))


def _broadcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` so it broadcasts against ``x`` ``(N, C, ...)``."""
    return v if x.dim() == 2 else v.view((1, -1) + (1,) * (x.dim() - 2))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """``v`` of shape ``(C,)`` repeated along the trailing dims of a contiguous ``x``
    ``(N, C, ...)``: a ``(C, L)`` tensor (one example's worth of memory), so that it
    broadcasts against ``x`` viewed as ``(N, C, L)`` along the *outer* dimension only."""
    c = x.shape[1]
    return v.view(c, 1).expand(c, x[0].numel() // c).contiguous()


def _affine(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """``x · scale + shift`` with per-channel ``scale`` and ``shift`` of shape ``(C,)``,
    in one fused pass (``addcmul``), written into ``out`` when given (a spent temporary of
    ``x``'s shape: reusing it keeps the memory, and the cache, a pass needs smaller).

    For ``(N, C)`` and channels-last inputs the two vectors broadcast along outer
    dimensions, which PyTorch's CPU kernels vectorise. For contiguous ``(N, C, L)`` and
    ``(N, C, H, W)`` inputs they would broadcast along the contiguous last dimension, where
    a three-operand kernel with two broadcast operands falls back to scalar code; so they
    are first repeated to ``(C, L)`` (:func:`_per_channel`, small) and ``x`` is viewed as
    ``(N, C, L)``. Small inputs (where the two extra calls cost more than the pass they
    save) and other layouts: a multiply and an in-place add.
    """
    if x.dim() == 2 or x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        return torch.addcmul(_broadcast(shift, x), x, _broadcast(scale, x), out=out)
    if x.numel() >= _REPEAT_MIN and x.is_contiguous() and (out is None or out.is_contiguous()):
        n, c = x.shape[:2]
        res = torch.addcmul(_per_channel(shift, x), x.view(n, c, -1), _per_channel(scale, x),
                            out=None if out is None else out.view(n, c, -1))
        return res.view(x.shape)
    return torch.mul(x, _broadcast(scale, x), out=out).add_(_broadcast(shift, x))


def _channel_sum(t: Tensor, mean: bool = False) -> Tensor:
    """The sum (or mean) of ``t`` over every dimension except the channel dim 1.

    For contiguous ``(N, C, L)`` / ``(N, C, H, W)`` inputs it first reduces each
    ``(example, channel)`` row, which is contiguous, then the ``N`` rows of each channel:
    on the CPU that takes half the time of one reduction over ``(0, 2, 3)``."""
    if t.dim() > 2 and t.is_contiguous() and t.numel() > 0:
        n, c = t.shape[:2]
        rows = t.view(n * c, -1)
        t = (rows.mean(1) if mean else rows.sum(1)).view(n, c)
    return t.mean(channel_dims(t)) if mean else t.sum(channel_dims(t))


def _reference_point(x: Tensor) -> Tensor:
    """A cheap per-channel value ``K`` near the batch mean: the first example (for
    ``(N, C, ...)`` inputs, the mean over its positions). It costs nothing (a view) or
    one small reduction over 1/N of the data; only its closeness to the mean matters,
    since it is a shift that :func:`_moments` corrects exactly."""
    if x.dim() == 2:
        return x[0]
    return x[0].mean(tuple(range(1, x.dim() - 1)))


def _moments(x: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """Shifted moments: ``(xk, sq, d, var, k)`` with ``xk = x − K`` (``K`` from
    :func:`_reference_point`), ``d = mean(xk)``, the biased variance and ``K`` (the mean
    is ``K + d``); ``sq`` is a spent buffer of ``x``'s shape the caller may reuse, or None.

    ``var = mean(xk²) − d²`` is exact algebra; it cancels badly only when ``d`` is large
    next to the spread, and ``K`` close to the mean keeps ``d`` small. Computed on ``x``
    itself (``K = 0``: the textbook ``E[x²] − E[x]²``) a float32 batch at an offset of 1e5
    would lose every digit; shifted, it keeps float32 precision, and ``x − K`` is what the
    output and the backward pass scale, so no large offset cancels there either.

    For contiguous ``(N, C, ...)`` inputs the sum of squares of each ``(example, channel)``
    row is read as a squared Euclidean norm (``vector_norm`` along the contiguous last
    dimension: one pass, no temporary); ``(N, C)`` inputs square into a buffer and average.
    """
    k = _reference_point(x)
    xk = x - _broadcast(k, x)
    d = _channel_sum(xk, mean=True)
    if x.dim() > 2 and xk.is_contiguous() and xk.numel() > 0:
        n, c = x.shape[:2]
        rows = torch.linalg.vector_norm(xk.view(n * c, -1), dim=1)     # √Σ xk² per row
        msq, sq = rows.square_().view(n, c).sum(0).div_(xk.numel() // c), None
    else:
        sq = xk.square()
        msq = sq.mean(channel_dims(x))
    var = torch.addcmul(msq, d, d, value=-1).clamp_min_(0)   # − d²
    return xk, sq, d, var, k


def _scale_shift(d: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """The per-channel ``(invstd, scale, shift)`` of the training output: ``invstd = 1/σ``
    and ``out = xk · scale + shift``, i.e. ``γ · x̂ + β`` with ``x̂ = (xk − d) · invstd``,
    folded into one multiply-add per element: ``scale = γ/σ``, ``shift = β − d · scale``.
    (Scaling ``xk``, not ``x``, keeps a large offset from cancelling.)"""
    invstd = torch.add(var, eps).rsqrt_()
    scale = invstd * weight
    return invstd, scale, torch.addcmul(bias, d, scale, value=-1)


def _normalize_2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """:func:`_normalize` for an ``(N, C)`` batch (an MLP's), written out operation by
    operation: every per-channel vector broadcasts along the batch dimension as it is, so
    none of the layout helpers is needed (their shape tests and views were a measurable
    share of an MLP-sized step)."""
    k = x[0]                          # K: the first example (a view, no copy)
    xk = x - k
    d = xk.mean(0)                    # mean(xk); the batch mean is k + d
    sq = xk * xk                      # its memory is reused for the output
    var = torch.addcmul(sq.mean(0), d, d, value=-1).clamp_min_(0)   # mean(xk²) − d²
    invstd, scale, shift = _scale_shift(d, var, weight, bias, eps)
    out = torch.addcmul(shift, xk, scale, out=sq)
    return out, (k, d), var, (xk, d, invstd, scale)


def _normalize(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """The training-mode forward pass: ``(out, (k, d), var, saved)``: the batch mean is
    ``k + d``, ``var`` the biased variance, ``saved`` what the backward pass needs.
    ``(N, C)`` batches take :func:`_normalize_2d`, the same arithmetic written out."""
    if x.dim() == 2:
        return _normalize_2d(x, weight, bias, eps)
    xk, sq, d, var, k = _moments(x)
    invstd, scale, shift = _scale_shift(d, var, weight, bias, eps)
    out = _affine(xk, scale, shift, out=sq)
    return out, (k, d), var, (xk, d, invstd, scale)


def _update_running(running_mean: Tensor | None, running_var: Tensor | None,
                    mean: tuple[Tensor, Tensor], var: Tensor, n: int, momentum: float) -> None:
    """``running ← (1 − momentum) · running + momentum · batch``, in place, with the batch
    mean ``k + d`` and the unbiased batch variance; both buffers in one fused call.

    Called where autograd records nothing (inside :class:`_BatchNormFunction`'s forward,
    or on :func:`batch_norm`'s path where nothing requires a gradient), so it needs no
    ``torch.no_grad()`` of its own."""
    if running_mean is None or running_var is None:
        return
    k, d = mean
    unbiased = var.mul_(n / (n - 1))  # var is not needed after this
    torch._foreach_lerp_([running_mean, running_var],
                         [_as(k + d, running_mean), _as(unbiased, running_var)], momentum)


def _dx_coefficients(dbias: Tensor, dweight: Tensor, d: Tensor, invstd: Tensor,
                     scale: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The per-channel ``(c1, c0)`` of the input gradient ``dx = scale · dy + c1 · xk + c0``.

    ``dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy · x̂))``; expanding ``x̂ = (xk − d)/σ`` gives
    ``c1 = −(γ/σ)/σ · mean(dy · x̂)`` and ``c0 = −(γ/σ) · mean(dy) − d · c1``, with
    ``Σ dy = dbias`` and ``Σ dy · x̂ = dweight``: two passes over the big tensors."""
    k_n = scale * (-1.0 / n)                                              # −(γ/σ) / n
    c1 = (k_n * invstd).mul_(dweight)
    return c1, torch.addcmul(k_n * dbias, d, c1, value=-1)


def _backward_2d(dout: Tensor, xk: Tensor, d: Tensor, invstd: Tensor, scale: Tensor,
                 needs_dx: bool):
    """The closed-form backward pass of an ``(N, C)`` batch, written out (as
    :func:`_normalize_2d`): ``(dx, dweight, dbias)``, ``dx`` None unless ``needs_dx``."""
    dbias = dout.sum(0)                                                     # Σ dy
    prod = dout * xk
    dweight = torch.addcmul(prod.sum(0), d, dbias, value=-1).mul_(invstd)  # Σ dy · x̂
    if not needs_dx:
        return None, dweight, dbias
    c1, c0 = _dx_coefficients(dbias, dweight, d, invstd, scale, len(xk))
    dx = torch.addcmul(c0, dout, scale, out=prod).addcmul_(xk, c1)  # prod is spent
    return dx, dweight, dbias


def _backward(dout: Tensor, xk: Tensor, d: Tensor, invstd: Tensor, scale: Tensor,
              needs_dx: bool):
    """The closed-form backward pass (chapter 2): ``(dx, dweight, dbias)`` from what
    :func:`_normalize` saved, with ``x̂ = (xk − d) · invstd`` and ``scale = γ · invstd``."""
    if xk.dim() == 2:
        return _backward_2d(dout, xk, d, invstd, scale, needs_dx)
    dbias = _channel_sum(dout)                                                # Σ dy
    prod = dout * xk
    dweight = torch.addcmul(_channel_sum(prod), d, dbias, value=-1).mul_(invstd)  # Σ dy·x̂
    if not needs_dx:
        return None, dweight, dbias
    c1, c0 = _dx_coefficients(dbias, dweight, d, invstd, scale, xk.numel() // xk.shape[1])
    dx = _affine(dout, scale, c0, out=prod)   # prod is spent: reuse its memory
    dx.addcmul_(xk, _broadcast(c1, xk))
    return dx, dweight, dbias


class _BatchNormFunction(torch.autograd.Function):
    """Normalise with batch statistics (and update the running ones); backward is the
    closed form of chapter 2."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, running_mean, running_var,
                momentum: float, eps: float):
        out, mean, var, saved = _normalize(x, weight, bias, eps)
        _update_running(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        dx, dweight, dbias = _backward(dout, *ctx.saved_tensors, ctx.needs_input_grad[0])
        return dx, dweight, dbias, None, None, None, None


class _FrozenBatchNormFunction(torch.autograd.Function):
    """Evaluation mode: the fixed per-channel affine map ``γ (x − μ) / σ + β`` with the
    running ``μ`` and ``σ``; its backward is the closed form too (nothing depends on the
    batch, so ``dx = γ/σ · dy``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor):
        scale = invstd * weight
        ctx.save_for_backward(x, mean, invstd, scale)
        return _affine(x, scale, torch.addcmul(bias, mean, scale, value=-1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        x, mean, invstd, scale = ctx.saved_tensors
        dims = channel_dims(x)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = dout * _broadcast(scale, x)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dbias = dout.sum(dims)                                             # Σ dy
            dweight = torch.addcmul((dout * x).sum(dims), mean, dbias, value=-1).mul_(invstd)
        return dx, dweight, dbias, None, None


def eval_scale_shift(running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                     bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """The per-channel ``(scale, shift)`` of evaluation mode: ``y = x · scale + shift`` with
    ``scale = γ / √(running_var + ε)`` and ``shift = β − running_mean · scale``.

    A layer can compute them once and reuse them while its parameters and buffers do not
    change (:class:`bnlib.nn.BatchNorm1d` does); :func:`apply_scale_shift` applies them.
    """
    scale = torch.add(running_var, eps).rsqrt_()
    if weight is not None:
        scale.mul_(weight)
    shift = torch.mul(running_mean, scale).neg_() if bias is None else \
        torch.addcmul(bias, running_mean, scale, value=-1)
    return scale, shift


def apply_scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x · scale + shift`` per channel, in one pass (half precision computed in float32)."""
    if x.dtype in _LOW_PRECISION:
        return _affine(x.float(), scale.float(), shift.float()).to(x.dtype)
    return _affine(x, scale.to(x.dtype), shift.to(x.dtype))


def _as(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in ``x``'s dtype (itself, without a dispatch, when it already is)."""
    return t if t.dtype == x.dtype else t.to(x.dtype)


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
    w = _as(weight, x) if weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
    b = _as(bias, x) if bias is not None else torch.zeros(c, dtype=x.dtype, device=x.device)

    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad)
    if training:
        if needs_grad:
            out = _BatchNormFunction.apply(x, w, b, running_mean, running_var, momentum, eps)
        else:  # nothing to differentiate: skip the autograd.Function machinery
            out, mean, var, _ = _normalize(x, w, b, eps)
            _update_running(running_mean, running_var, mean, var, x.numel() // c, momentum)
    else:
        # Inference: a fixed affine map per channel (which is why it can be folded away).
        if needs_grad:
            mean, invstd = _as(running_mean, x), torch.add(_as(running_var, x), eps).rsqrt_()
            out = _FrozenBatchNormFunction.apply(x, w, b, mean, invstd)
        else:
            scale, shift = eval_scale_shift(_as(running_mean, x), _as(running_var, x), w, b, eps)
            out = _affine(x, scale, shift)
    return out if out.dtype == input.dtype else out.to(input.dtype)
