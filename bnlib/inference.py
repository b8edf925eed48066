"""Batch norm at inference time: recomputing the population statistics ("precise BN")
and evaluating with batch statistics instead of running ones."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .nn import batchnorm_layers

__all__ = ["recompute_batchnorm_stats", "batch_statistics", "fold_batchnorm"]


@torch.no_grad()
def recompute_batchnorm_stats(model: nn.Module, x: Tensor, *, batch_size: int = 256,
                              max_samples: int | None = None) -> nn.Module:
    """Replace every BN's running statistics by an exact average over ``x`` ("precise BN").

    The weights are fixed; each BN's buffers are reset and rebuilt as a cumulative average
    (``momentum=None``) over the batches of ``x``, so the statistics describe *these*
    weights rather than a lagging moving average. A few thousand samples suffice. The
    model is returned in eval mode; BN momenta are restored.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("the model has no batch-norm layer to recompute")
    if batch_size < 2:
        raise ValueError("batch_size must be at least 2")
    x = x[:max_samples] if max_samples is not None else x
    if len(x) < 2:  # no batch to average: the statistics would be silently reset to 0 and 1
        raise ValueError(f"need at least 2 samples to recompute BN statistics, got {len(x)}")
    if any(not bn.track_running_stats for bn in layers):  # check all before changing any
        raise ValueError("a BN layer with track_running_stats=False has no statistics to recompute")
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        dev = next(model.parameters()).device
        for i in range(0, len(x) - 1, batch_size):
            chunk = x[i:i + batch_size]
            if len(chunk) >= 2:
                model(chunk.to(dev))
    finally:
        for bn, m in zip(layers, momenta):
            bn.momentum = m
        model.eval()
    return model


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Inside this block the model runs in eval mode except that every BN normalises with
    the statistics of the batch it is given (running statistics untouched)."""
    layers = batchnorm_layers(model)
    was = model.training
    saved = [(bn.running_mean, bn.running_var, bn.track_running_stats) for bn in layers]
    model.eval()
    try:
        for bn in layers:
            # With no buffers, an eval-mode BN uses batch statistics (torch's rule too).
            bn.running_mean, bn.running_var = None, None
        yield model
    finally:
        for bn, (m, v, t) in zip(layers, saved):
            bn.running_mean, bn.running_var = m, v
        model.train(was)


# --- folding BN into the layer before it ------------------------------------------------

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_foldable_bn(bn: nn.Module, where: str) -> None:
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold the batch norm at {where!r}: it has no running statistics "
            "(track_running_stats=False, or they were removed), so in eval mode it still "
            "normalises with the statistics of each batch and is not a fixed affine map")


def _fold_pair(layer: nn.Module, bn: nn.Module, where: str) -> None:
    """Fold ``bn`` (eval mode, running statistics) into ``layer`` in place."""
    _check_foldable_bn(bn, where)
    if type(layer) not in _FOLDABLE:
        raise ValueError(f"cannot fold the batch norm at {where!r}: it follows a "
                         f"{type(layer).__name__}, not a Linear or Conv layer")
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out:
        raise ValueError(f"cannot fold the batch norm at {where!r}: it has {bn.num_features} "
                         f"features but the {type(layer).__name__} before it has {out} outputs")
    w = layer.weight
    with torch.no_grad():
        # Compute in float64, store in the layer's dtype: the fold adds no rounding of its own.
        mean = bn.running_mean.double()
        invstd = torch.rsqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if getattr(bn, "weight", None) is not None else torch.ones_like(mean)
        beta = bn.bias.double() if getattr(bn, "bias", None) is not None else torch.zeros_like(mean)
        scale = gamma * invstd
        b = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
        new_w = w.double() * scale.view((-1,) + (1,) * (w.dim() - 1))
        new_b = (b - mean) * scale + beta
        layer.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=w.requires_grad)
        layer.bias = nn.Parameter(new_b.to(device=w.device, dtype=w.dtype),
                                  requires_grad=w.requires_grad)


def _is_bn(m: nn.Module) -> bool:
    from .nn import _BatchNorm
    return isinstance(m, (_BatchNorm, nn.modules.batchnorm._BatchNorm))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An equivalent copy of an eval-mode ``model`` with every batch norm folded away.

    At inference a BN with running statistics is the fixed affine map
    ``y = γ (x − μ) / √(σ² + ε) + β``; when it directly follows a Linear or Conv layer
    ``x = W u + b``, the two compose into one layer with ``W' = W · s`` and
    ``b' = (b − μ) · s + β``, where ``s = γ / √(σ² + ε)`` per output channel
    (Ioffe & Szegedy 2015, §3.1). Returns a deep copy, in eval mode, in which every BN is
    replaced by ``nn.Identity`` and the layer before it carries ``W'`` and ``b'`` (a bias
    is added if it had none); ``model`` itself is not changed. Works for bnlib's models
    (:class:`bnlib.models.Net` of ``Block`` s with ``placement="before"``) and for
    ``nn.Sequential`` models (nested ones too), with bnlib's or torch's BN layers.

    Raises ``ValueError`` when the model is in training mode (a BN then uses batch
    statistics, which no fixed layer can reproduce), when a BN has no running statistics
    (``track_running_stats=False``), or when a BN does not directly follow a Linear/Conv
    layer (e.g. ``placement="after"``, where it follows the activation, or a BN inside a
    custom module whose data flow this function cannot see). ``nn.Identity`` modules between
    the layer and the BN are skipped over. A model without BN gives an unchanged copy.
    """
    import copy

    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm needs an nn.Module, got {type(model).__name__}")
    if _is_bn(model):
        raise ValueError("cannot fold a lone batch-norm layer: there is no Linear/Conv layer "
                         "before it to fold it into")
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            "fold_batchnorm needs a model in eval mode (call model.eval() first): in "
            f"training mode a BN normalises with batch statistics; modules in training mode: "
            f"{', '.join(training[:5])}{' ...' if len(training) > 5 else ''}")
    # A module used at two places cannot be folded for one of them only.
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1

    folded = copy.deepcopy(model)
    from .models import Block  # local import: models does not depend on inference

    done: set[int] = set()

    def shared(m: nn.Module, where: str) -> None:
        if counts.get(id(orig_of[id(m)]), 1) > 1:
            raise ValueError(f"cannot fold the batch norm at {where!r}: the layer or the BN is "
                             "used at more than one place in the model")

    # map copies back to originals (same traversal order) to look up how often each is used
    orig_of = {id(c): o for (_, c), (_, o) in zip(folded.named_modules(remove_duplicate=False),
                                                  model.named_modules(remove_duplicate=False))}

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, Block) and _is_bn(module.norm):
            where = f"{prefix}norm" if prefix else "norm"
            if module.placement == "after" and not isinstance(module.act, nn.Identity):
                raise ValueError(
                    f"cannot fold the batch norm at {where!r}: the block has placement='after', "
                    "so the BN follows the activation, not the Linear/Conv layer")
            shared(module.layer, where)
            shared(module.norm, where)
            _fold_pair(module.layer, module.norm, where)
            done.add(id(module.norm))
            module.norm = nn.Identity()
        elif isinstance(module, nn.Sequential):
            names = list(module._modules)
            prev: tuple[str, nn.Module] | None = None
            for name in names:
                child = module._modules[name]
                where = f"{prefix}{name}"
                if child is not None and _is_bn(child):
                    if prev is None:
                        raise ValueError(
                            f"cannot fold the batch norm at {where!r}: nothing before it in its "
                            "nn.Sequential, so it does not directly follow a Linear/Conv layer")
                    if type(prev[1]) not in _FOLDABLE:
                        raise ValueError(
                            f"cannot fold the batch norm at {where!r}: it follows "
                            f"{prev[0]!r} ({type(prev[1]).__name__}), not a Linear or Conv layer")
                    shared(prev[1], where)
                    shared(child, where)
                    _fold_pair(prev[1], child, where)
                    done.add(id(child))
                    module._modules[name] = nn.Identity()
                    prev = (prev[0], prev[1])  # an Identity now: the layer still precedes
                    continue
                if not isinstance(child, nn.Identity):
                    prev = (where, child)
        for name, child in list(module.named_children()):
            if child is not None and not _is_bn(child):
                visit(child, f"{prefix}{name}.")

    visit(folded, "")
    left = [m for m in batchnorm_layers(folded) if id(m) not in done]
    if left:
        names = [n for n, m in folded.named_modules() if any(m is x for x in left)]
        raise ValueError(
            f"cannot fold the batch norm at {names[0]!r}: it sits inside a "
            f"{type(_parent(folded, names[0])).__name__}, whose forward this function cannot "
            "read, so it cannot tell which layer feeds the BN (use nn.Sequential or bnlib's models)")
    folded.eval()
    return folded


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent = model
    for part in name.split(".")[:-1]:
        parent = getattr(parent, part)
    return parent
