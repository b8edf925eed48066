"""Normalisers that do not use the batch: a from-scratch Group Normalization.

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

import torch
from torch import Tensor, nn

__all__ = ["GroupNorm", "group_norm"]


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


class GroupNorm(nn.Module):
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
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.register_parameter(
            "weight", nn.Parameter(torch.empty(num_channels, **factory)) if affine else None)
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(num_channels, **factory)) if affine and bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1 and β = 0: a fresh layer is a pure normalisation."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine}, bias={self.bias is not None}")
