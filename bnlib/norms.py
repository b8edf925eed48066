"""Normalisers other than batch norm, from scratch (chapter 19 compares them).

Drop-ins for torch's layers, tested against them: :class:`GroupNorm` (``nn.GroupNorm``) and
:class:`LayerNorm` (``nn.LayerNorm``). Layers torch does not have, each documented with the
choices it makes: :class:`BatchRenorm1d`/:class:`BatchRenorm2d` (Ioffe, 2017),
:class:`~bnlib.nn.GhostBatchNorm` (Hoffer et al., 2017; its home is :mod:`bnlib.nn`, re-exported
here), :class:`WSConv1d`/:class:`WSConv2d` (weight standardisation, Qiao et al., 2019) and
:class:`SkipInit` (De & Smith, 2020).

Group Normalization
-------------------

Group Normalization (Wu & He, 2018) splits the ``C`` channels of every example into ``G``
groups of ``C/G`` channels and standardises each group with its *own* mean and variance,
computed over the group's channels and all spatial positions of that one example::

    x of shape (N, C, *)  →  view (N, G, C/G · prod(*))  →  mean, var over the last axis
    y = (x − mean) / √(var + ε) · γ + β        (γ, β per channel)

No statistic crosses the batch axis, so the layer computes the same thing in training and
in evaluation, for a batch of 2 as for a batch of 2,000, and keeps no running buffers.
``G = 1`` is LayerNorm over ``(C, *)``; ``G = C`` is InstanceNorm (with per-channel affine).

:class:`GroupNorm` is a drop-in replacement for :class:`torch.nn.GroupNorm`: same
constructor (including the keyword-only ``bias``), same parameters and ``state_dict`` keys,
same initialisation (γ = 1, β = 0), same errors, same output up to float rounding.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .nn import GhostBatchNorm, _BatchNorm  # noqa: F401  (GhostBatchNorm's home is bnlib.nn)

__all__ = ["GroupNorm", "group_norm", "LayerNorm", "layer_norm", "BatchRenorm1d",
           "BatchRenorm2d", "GhostBatchNorm", "WSConv1d", "WSConv2d", "standardize_weight",
           "SkipInit"]


class GroupNormInputError(ValueError, RuntimeError):
    """A bad input to :func:`group_norm`. It is both a ``ValueError`` (the book's rule for bad
    input) and a ``RuntimeError`` (what ``torch.nn.functional.group_norm`` raises), so code
    written against either catches it."""


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Group-normalise ``x`` of shape ``(N, C, *)``: the arithmetic of :class:`GroupNorm`.

    Numerically careful: the variance is the mean of squared deviations from the group mean
    (two passes, no ``E[x²] − E[x]²`` cancellation), and half-precision inputs are
    normalised in float32 and cast back.
    """
    if x.dim() < 2:
        raise GroupNormInputError(
            f"Expected at least 2 dimensions for input tensor but received {x.dim()}")
    n, c = x.shape[0], x.shape[1]
    if c % num_groups != 0:
        raise GroupNormInputError(
            f"Expected number of channels in input to be divisible by num_groups, but got "
            f"input of shape {list(x.shape)} and num_groups={num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.numel() != c):
            raise GroupNormInputError(
                f"Expected {name} to be a vector of size equal to the number of channels in "
                f"input, but got {name} of shape {list(p.shape)} and input of shape {list(x.shape)}")
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    g = x.to(compute).reshape(n, num_groups, (c // num_groups) * math.prod(x.shape[2:]))
    mean = g.mean(dim=-1, keepdim=True)
    centred = g - mean
    var = centred.pow(2).mean(dim=-1, keepdim=True)          # biased, as in torch
    y = (centred * torch.rsqrt(var + eps)).reshape(x.shape)
    if weight is not None or bias is not None:
        shape = (1, c) + (1,) * (x.dim() - 2)                 # per-channel γ, β
        if weight is not None:
            y = y * weight.to(compute).reshape(shape)
        if bias is not None:
            y = y + bias.to(compute).reshape(shape)
    return y.to(x.dtype)


class _AffineNorm(nn.Module):
    """The learned scale γ (``weight``, init 1) and shift β (``bias``, init 0) that GroupNorm
    and LayerNorm apply after normalising, registered as ``None`` when switched off."""

    def _affine(self, shape: tuple[int, ...], eps: float, affine: bool, bias: bool, device,
                dtype) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", nn.Parameter(torch.empty(shape, **factory)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.empty(shape, **factory))
                                if affine and bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1 and β = 0: a fresh layer is a pure normalisation."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class GroupNorm(_AffineNorm):
    """Group Normalization over ``(N, C, *)`` inputs: a drop-in for ``torch.nn.GroupNorm``.

    ``num_channels`` must be divisible by ``num_groups`` (``ValueError`` otherwise, with
    torch's message). ``affine=True`` learns per-channel ``weight`` (γ, init 1) and
    ``bias`` (β, init 0; ``bias=False`` drops it). Training and evaluation modes compute
    the same function: there are no running statistics.
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine"]

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("num_groups", num_groups), ("num_channels", num_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.affine = affine
        self._affine((num_channels,), eps, affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine}, bias={self.bias is not None}")


# --- Layer Normalization ----------------------------------------------------------------

def layer_norm(x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Standardise ``x`` over its last ``len(normalized_shape)`` dimensions (one mean and
    variance per example, biased variance, two passes), then scale and shift elementwise.
    Half-precision inputs are normalised in float32 and cast back."""
    shape = tuple(normalized_shape)
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise GroupNormInputError(
            f"Given normalized_shape={list(shape)}, expected input with shape "
            f"[*, {', '.join(map(str, shape))}], but got input of size{list(x.shape)}")
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    h = x.to(compute)
    centred = h - h.mean(dim=dims, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


class LayerNorm(_AffineNorm):
    """Layer Normalization (Ba et al., 2016): a drop-in for ``torch.nn.LayerNorm``.

    Each example is standardised over its trailing ``normalized_shape`` dimensions; with
    ``elementwise_affine`` the layer learns ``weight`` (init 1) and ``bias`` (init 0;
    ``bias=False`` drops it) of shape ``normalized_shape``. No running statistics: the
    training and evaluation modes compute the same function. A wrong input shape raises
    torch's message as an error that is both a ``ValueError`` and a ``RuntimeError``.
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
            raise ValueError(f"normalized_shape must be positive ints, got {normalized_shape!r}")
        self.normalized_shape = shape
        self.elementwise_affine = elementwise_affine
        self._affine(shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}")


# --- Batch Renormalization -------------------------------------------------------------

class _BatchRenorm(_BatchNorm):
    """Batch Renormalization (Ioffe, 2017); see :class:`BatchRenorm2d`."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, bias: bool = True, r_max: float = 3.0, d_max: float = 5.0,
                 warmup_steps: int = 1000, ramp_steps: int = 4000) -> None:
        if not track_running_stats:
            raise ValueError("Batch Renormalization corrects towards the running statistics: "
                             "track_running_stats must be True")
        if not r_max >= 1 or not d_max >= 0:
            raise ValueError(f"need r_max ≥ 1 and d_max ≥ 0, got r_max={r_max}, d_max={d_max}")
        if warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(f"warmup_steps and ramp_steps must be ≥ 0, got {warmup_steps}, {ramp_steps}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.ramp_steps = int(warmup_steps), int(ramp_steps)

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """``(r_max, d_max)`` in force at training ``step`` (default: the layer's current step,
        ``num_batches_tracked``): 1 and 0 for ``warmup_steps`` steps, then linear in the step
        to the final ``r_max``, ``d_max`` over ``ramp_steps`` steps."""
        t = int(self.num_batches_tracked) if step is None else step
        if t <= self.warmup_steps:
            frac = 0.0
        elif self.ramp_steps == 0:
            frac = 1.0
        else:
            frac = min((t - self.warmup_steps) / self.ramp_steps, 1.0)
        return 1.0 + (self.r_max - 1.0) * frac, self.d_max * frac

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)            # inference: exactly batch norm's
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        r_max, d_max = self.limits()
        dims = tuple(i for i in range(input.dim()) if i != 1)
        count = input.numel() // input.shape[1]
        if count < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {list(input.shape)}")
        compute = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        x = input.to(compute)
        view = (1, -1) + (1,) * (x.dim() - 2)
        mu_b = x.mean(dim=dims)
        var_b = (x - mu_b.view(view)).pow(2).mean(dim=dims)     # biased, as BN normalises
        sigma_b = torch.sqrt(var_b + self.eps)
        sigma = torch.sqrt(self.running_var.to(compute) + self.eps)
        # r and d are constants for backprop: the gradient flows as in batch norm
        r = (sigma_b / sigma).detach().clamp(1.0 / r_max, r_max)
        d = ((mu_b - self.running_mean.to(compute)) / sigma).detach().clamp(-d_max, d_max)
        y = (x - mu_b.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
        if self.weight is not None:
            y = y * self.weight.to(compute).view(view)
        if self.bias is not None:
            y = y + self.bias.to(compute).view(view)
        with torch.no_grad():                        # running statistics: as batch norm does
            self.running_mean.lerp_(mu_b.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var_b * count / (count - 1)).to(self.running_var.dtype), momentum)
        return y.to(input.dtype)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}")


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over ``(N, C)`` or ``(N, C, L)``; see :class:`BatchRenorm2d`."""

    _expected_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization (Ioffe, 2017) over ``(N, C, H, W)`` inputs.

    In training, with batch statistics ``μ_B``, ``σ_B = √(var_B + ε)`` and running ones
    ``μ``, ``σ = √(running_var + ε)``::

        r = clip(σ_B / σ, 1/r_max, r_max)      d = clip((μ_B − μ) / σ, −d_max, d_max)
        y = γ · ((x − μ_B) / σ_B · r + d) + β  with r and d detached (constants in backprop)

    When neither clip is active, ``y = γ (x − μ)/σ + β``: training computes what inference
    computes, which is the point. With ``r_max = 1`` and ``d_max = 0`` it *is* batch norm
    (values, gradients and running statistics). Inference uses the running statistics,
    exactly like batch norm.

    Choices (ours, not verified against the paper's exact numbers):

    * the running statistics are batch norm's (``running_var`` is the unbiased variance,
      ``momentum`` as in torch), so the ``state_dict`` has batch norm's keys and a BN
      checkpoint loads; ``num_batches_tracked`` is the layer's own step counter;
    * the schedule: plain BN (``r_max = 1``, ``d_max = 0``) for ``warmup_steps`` training
      steps, then both limits move linearly to their final values ``r_max`` (default 3) and
      ``d_max`` (default 5) over ``ramp_steps`` steps (defaults 1,000 and 4,000: pick them to
      fit your run length; :meth:`limits` tells the values in force).
    """

    _expected_dims = (4,)


# --- Weight Standardization -------------------------------------------------------------

def standardize_weight(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Each output filter ``weight[o]`` standardised over its fan-in ``(C_in, *kernel)``:
    ``(W − mean) / √(var + ε)`` with the biased variance (our choice; other implementations
    divide by ``std + ε``, or use the unbiased std, which rescales every filter by the same
    ``√(n/(n−1))``, a factor a following normaliser removes)."""
    flat = weight.reshape(weight.shape[0], -1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    return (centred * torch.rsqrt(centred.pow(2).mean(dim=1, keepdim=True) + eps)).reshape(weight.shape)


class _WSConv:
    """Mixin: standardise the weight before every convolution (Qiao et al., 2019)."""

    ws_eps: float = 1e-5

    def standardized_weight(self) -> Tensor:
        """The weight the convolution actually uses."""
        return standardize_weight(self.weight, self.ws_eps)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)


class WSConv1d(_WSConv, nn.Conv1d):
    """``nn.Conv1d`` with Weight Standardization: same constructor, parameters and
    ``state_dict``; the stored ``weight`` is standardised per output filter (mean 0,
    variance 1 over ``(C_in, k)``; :func:`standardize_weight`) before each convolution,
    and the gradient flows through the standardisation. Meant to be followed by a
    GroupNorm (the paper's pairing): WS alone leaves the activations unnormalised."""


class WSConv2d(_WSConv, nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization; see :class:`WSConv1d`."""


# --- SkipInit ---------------------------------------------------------------------------

class SkipInit(nn.Module):
    """A residual block ``x ↦ x + α · branch(x)`` with a learnable scalar ``α`` that starts
    at ``init`` (0 by default; De & Smith, 2020): at initialisation the block is the
    identity, so a deep residual stack without normalisation starts as the identity map
    and its signal neither explodes nor vanishes with depth."""

    def __init__(self, branch: nn.Module, init: float = 0.0) -> None:
        super().__init__()
        self.branch = branch
        self.alpha = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * self.branch(x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha.item():.4g}"
