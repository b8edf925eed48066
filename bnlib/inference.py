"""Batch norm at inference time: recomputing the population statistics ("precise BN")
and evaluating with batch statistics instead of running ones."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .nn import batchnorm_layers

__all__ = ["recompute_batchnorm_stats", "batch_statistics"]


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
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        if not bn.track_running_stats:
            raise ValueError("a BN layer with track_running_stats=False has no statistics to recompute")
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
