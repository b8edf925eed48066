"""Probes: what the chapters look inside a network for.

* :func:`activation_stats` — mean, variance and percentiles of chosen modules' *inputs*
  (or outputs) on a fixed probe batch, without changing the model;
* :class:`PercentileTracker` — a training callback that records those percentiles for one
  unit every ``every`` steps (the BN paper's Figure 1(b, c));
* :func:`gradient_norms` / :func:`weight_norms` — per-layer norms, input layer first.

Probes never change the model's training state: running statistics are saved and
restored around every probe forward pass.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import batchnorm_layers

__all__ = ["activation_stats", "PercentileTracker", "gradient_norms", "weight_norms",
           "frozen_batchnorm_buffers", "capture"]


@contextlib.contextmanager
def frozen_batchnorm_buffers(model: nn.Module):
    """Run train-mode forward passes without moving any BN's running statistics."""
    layers = batchnorm_layers(model)
    saved = [{k: v.clone() for k, v in bn.state_dict().items()
              if k in ("running_mean", "running_var", "num_batches_tracked")} for bn in layers]
    try:
        yield model
    finally:
        with torch.no_grad():
            for bn, state in zip(layers, saved):
                for k, v in state.items():
                    getattr(bn, k).copy_(v)


@contextlib.contextmanager
def capture(modules: Mapping[str, nn.Module], what: str = "input"):
    """Collect the input (or output) tensor of each named module during the block."""
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', got {what!r}")
    seen: dict[str, Tensor] = {}

    def hook(name: str) -> Callable:
        def fn(module, inputs, output):
            seen[name] = (inputs[0] if what == "input" else output).detach()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_stats(model: nn.Module, x: Tensor, modules: Mapping[str, nn.Module], *,
                     what: str = "input", percentiles: Sequence[float] = (15, 50, 85),
                     train_mode: bool | None = None) -> pd.DataFrame:
    """One row per module: mean and variance over all units, and the given percentiles.

    ``train_mode`` picks the mode of the probe pass (default: the model's current mode);
    BN buffers are left untouched either way.
    """
    was = model.training
    model.train(was if train_mode is None else train_mode)
    with frozen_batchnorm_buffers(model), capture(modules, what) as seen:
        model(x)
    model.train(was)
    rows = []
    for name in modules:
        t = seen[name].float()
        q = torch.quantile(t.flatten(), torch.tensor([p / 100 for p in percentiles],
                                                     device=t.device)).tolist()
        rows.append({"module": name, "mean": t.mean().item(), "var": t.var().item(),
                     **{f"p{p:g}": v for p, v in zip(percentiles, q)}})
    return pd.DataFrame(rows)


class PercentileTracker:
    """Training callback: percentiles of one unit's input to ``module`` on a fixed batch.

    ``tracker = PercentileTracker(model.blocks[-1].act, probe_x, unit=0, every=50)``;
    pass it in ``train(..., callbacks=[tracker])`` and read ``tracker.frame()``.
    The probe pass runs in training mode (what the network computes while it learns) and
    leaves BN running statistics untouched.
    """

    def __init__(self, module: nn.Module, probe_x: Tensor, *, unit: int = 0, every: int = 50,
                 percentiles: Sequence[float] = (15, 50, 85), what: str = "input") -> None:
        self.module, self.probe_x, self.unit, self.every = module, probe_x, unit, every
        self.percentiles, self.what = tuple(percentiles), what
        self.rows: list[dict] = []

    @torch.no_grad()
    def record(self, step: int, model: nn.Module) -> None:
        was = model.training
        model.train()
        x = self.probe_x.to(next(model.parameters()).device)
        with frozen_batchnorm_buffers(model), capture({"m": self.module}, self.what) as seen:
            model(x)
        model.train(was)
        values = seen["m"][:, self.unit].flatten().float().cpu().numpy()
        q = np.percentile(values, self.percentiles)
        self.rows.append({"step": step, **{f"p{p:g}": float(v) for p, v in zip(self.percentiles, q)}})

    def on_train_start(self, model: nn.Module) -> None:
        self.record(0, model)  # the untrained network

    def __call__(self, info) -> None:
        if info.step % self.every == 0:
            self.record(info.step, info.model)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def gradient_norms(model: nn.Module, x: Tensor, y: Tensor, layers: Sequence[nn.Module] | None = None,
                   loss: Callable = F.cross_entropy) -> np.ndarray:
    """‖∂L/∂W‖ for each weight layer (default ``model.weight_layers()``), input side first.

    One train-mode forward/backward on ``(x, y)``; BN buffers and existing ``.grad`` are
    left as they were."""
    layers = list(layers if layers is not None else model.weight_layers())
    weights = [layer.weight for layer in layers]
    was = model.training
    model.train()
    with frozen_batchnorm_buffers(model):
        grads = torch.autograd.grad(loss(model(x), y), weights)
    model.train(was)
    return np.array([g.norm().item() for g in grads])


def weight_norms(model: nn.Module, layers: Sequence[nn.Module] | None = None) -> np.ndarray:
    """‖W‖ (Frobenius) of each weight layer, input side first."""
    layers = list(layers if layers is not None else model.weight_layers())
    return np.array([layer.weight.detach().norm().item() for layer in layers])
