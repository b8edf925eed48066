"""Probes: what the chapters look inside a network for.

* :func:`activation_stats` — mean, variance and percentiles of chosen modules' *inputs*
  (or outputs) on a fixed probe batch, without changing the model;
* :class:`PercentileTracker` — a training callback that records those percentiles for one
  unit every ``every`` steps (the BN paper's Figure 1(b, c));
* :func:`gradient_norms` / :func:`weight_norms` — per-layer norms, input layer first;
* :class:`LossRecorder` — every step's mini-batch loss;
* :class:`SetBNMomentum` — sets every BN's running-average momentum before training;
* :func:`frozen_batchnorm_buffers` / :func:`dropout_disabled` — context managers for probe
  passes that must not move BN's running statistics / must run without dropout.

Probes never change the model's training state: running statistics are saved and
restored around every probe forward pass.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import batchnorm_layers

if TYPE_CHECKING:
    from .train import StepInfo

__all__ = ["Probe", "LossRecorder", "WeightNormTracker", "activation_stats", "PercentileTracker", "gradient_norms", "weight_norms",
           "frozen_batchnorm_buffers", "dropout_disabled", "capture", "SetBNMomentum"]


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
def dropout_disabled(model: nn.Module):
    """Inside this block every dropout layer of ``model`` is the identity, even in training
    mode (its probability is set to 0, then restored)."""
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    saved = [m.p for m in drops]
    try:
        for m in drops:
            m.p = 0.0
        yield model
    finally:
        for m, p in zip(drops, saved):
            m.p = p


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


class Probe:
    """Base of the training callbacks that measure something while a network trains.

    :func:`bnlib.train.fit` (and ``train``) calls ``on_train_start(model)`` once with the
    untrained network, then the probe with a :class:`bnlib.train.StepInfo` after every
    optimiser step; a probe appends dicts to ``self.rows`` and :meth:`frame` returns them as
    a tidy table. A probe must leave the model's mode and batch-norm buffers as it found them
    (:func:`frozen_batchnorm_buffers` helps).
    """

    rows: list[dict]

    def on_train_start(self, model: nn.Module) -> None:
        """Called once before the first step (default: nothing)."""

    def __call__(self, info) -> None:  # pragma: no cover - subclasses implement it
        raise NotImplementedError

    def frame(self) -> pd.DataFrame:
        """One row per recorded measurement."""
        return pd.DataFrame(self.rows)


class SetBNMomentum(Probe):
    """Sets every BN layer's running-average momentum (PyTorch convention) before training."""

    def __init__(self, momentum: float) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"bn momentum must be in (0, 1], got {momentum}")
        self.momentum, self.rows = momentum, []

    def on_train_start(self, model: nn.Module) -> None:
        for bn in batchnorm_layers(model):
            bn.momentum = self.momentum

    def __call__(self, info: StepInfo) -> None:  # sets, never measures
        pass


class LossRecorder(Probe):
    """Training callback: the mini-batch loss of every optimiser step (``frame()``: ``step,
    loss``), the training trajectory step by step (chapter 10 compares two of them)."""

    name = "loss"

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def __call__(self, info) -> None:
        self.rows.append({"step": info.step, "loss": info.loss.item()})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["step", "loss"])


class PercentileTracker(Probe):
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


class WeightNormTracker(Probe):
    """Training callback: how the norms of some weight matrices evolve, and whether each
    gradient is orthogonal to its weight.

    Every ``every`` steps it records, per layer: ``w_norm`` = ‖W_t‖ (Frobenius),
    ``w_ratio`` = ‖W_t‖/‖W_0‖, ``eff_lr`` = η·(‖W_0‖/‖W_t‖)² (the learning rate that, at
    the initial weight scale, would make the same *angular* step: for a scale-invariant
    weight this is the step that matters) and ``cos_wg`` = cos(W_{t−1}, ∇L(W_{t−1})), the
    cosine between the weight *before* step t and the gradient taken there (0 for a
    weight followed by batch norm, up to BN's ε and rounding).

    ``tracker = WeightNormTracker([b.layer for b in net.blocks], lr=0.1, every=10)``;
    pass it to ``train(..., callbacks=[tracker])``; read ``tracker.frame()`` (per layer)
    or ``tracker.summary()`` (one row per recorded step, averaged over layers).
    """

    def __init__(self, layers: Sequence[nn.Module], *, lr: float, every: int = 1) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("give at least one layer to track")
        if not all(isinstance(getattr(m, "weight", None), torch.Tensor) for m in layers):
            raise ValueError("every tracked layer needs a .weight tensor")
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr}")
        self.layers, self.lr, self.every = layers, float(lr), int(every)
        self.w0 = [m.weight.detach().norm().item() for m in layers]
        self._prev = [m.weight.detach().clone() for m in layers]   # W before step 1
        self._prev_step = 0
        self.rows: list[dict] = [
            {"step": 0, "layer": i, "w_norm": n, "w_ratio": 1.0, "eff_lr": self.lr,
             "lr_over_w2": self.lr / n ** 2 if n > 0 else math.nan, "cos_wg": math.nan}
            for i, n in enumerate(self.w0)]

    @torch.no_grad()
    def __call__(self, info: StepInfo) -> None:
        step = info.step
        if step % self.every == 0:
            have_prev = self._prev_step == step - 1
            for i, m in enumerate(self.layers):
                w, g = m.weight.detach(), m.weight.grad
                norm = w.norm().item()
                cos = math.nan
                if have_prev and g is not None:
                    prev = self._prev[i]
                    denom = prev.norm().item() * g.norm().item()
                    cos = (prev * g).sum().item() / denom if denom > 0 else math.nan
                ratio = norm / self.w0[i] if self.w0[i] > 0 else math.nan
                self.rows.append({"step": step, "layer": i, "w_norm": norm, "w_ratio": ratio,
                                  "eff_lr": self.lr / ratio ** 2 if ratio > 0 else math.nan,
                                  "lr_over_w2": self.lr / norm ** 2 if norm > 0 else math.nan,
                                  "cos_wg": cos})
        if (step + 1) % self.every == 0:    # keep W_t: the weight before the next recorded step
            self._prev = [m.weight.detach().clone() for m in self.layers]
            self._prev_step = step

    def summary(self) -> pd.DataFrame:
        """One row per recorded step: ``w_ratio`` and ``eff_lr`` averaged over layers and
        ``cos_wg`` as the largest |cosine| over layers."""
        f = self.frame()
        f["abs_cos"] = f["cos_wg"].abs()
        out = f.groupby("step").agg(w_ratio=("w_ratio", "mean"), eff_lr=("eff_lr", "mean"),
                                    cos_wg=("abs_cos", "max")).reset_index()
        return out
