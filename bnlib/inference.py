"""Batch norm at inference time: recomputing the population statistics ("precise BN")
and evaluating with batch statistics instead of running ones.

Also: the running averages themselves in PyTorch's and Keras' momentum conventions
(:func:`ema`) and how far a model's are from precise ones (:func:`statistics_error`); the
swa_utils-style recompute in training mode (:func:`recompute_in_train_mode`); test-time
adaptation of the statistics to unlabelled inputs (:func:`adapt_batchnorm_stats`) and
per-test-batch statistics mixed with the running ones (:func:`grouped_accuracy`); and
folding BN into the layer before it (:func:`fold_batchnorm`)."""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .nn import batchnorm_layers

__all__ = ["recompute_batchnorm_stats", "batch_statistics", "fold_batchnorm", "evaluate", "ema",
           "statistics_error", "recompute_in_train_mode", "adapt_batchnorm_stats", "grouped_accuracy"]


@torch.no_grad()
def recompute_batchnorm_stats(model: nn.Module, x: Tensor, *, batch_size: int = 256,
                              max_samples: int | None = None) -> nn.Module:
    """Replace every BN's running statistics by the exact statistics of ``x`` ("precise BN").

    The weights are fixed. Layer by layer, in the order the network uses them, each BN's
    input is collected in eval mode (the earlier layers already hold their new statistics,
    so this is the input the BN will see at inference) and its mean and unbiased variance
    are pooled over all of ``x`` in float64 (Chan's merge of per-chunk counts, means and
    sums of squares: exact, including the spread of the chunk means and a short last
    chunk). The statistics then describe *these* weights rather than a lagging moving
    average. The model is returned in eval mode; ``num_batches_tracked`` is left as it was.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("the model has no batch-norm layer to recompute")
    if batch_size < 2:
        raise ValueError("batch_size must be at least 2")
    x = x[:max_samples] if max_samples is not None else x
    if len(x) < 2:  # no statistics to pool: they would be silently reset to 0 and 1
        raise ValueError(f"need at least 2 samples to recompute BN statistics, got {len(x)}")
    if any(not bn.track_running_stats for bn in layers):  # check all before changing any
        raise ValueError("a BN layer with track_running_stats=False has no statistics to recompute")
    model.eval()
    dev = next(model.parameters()).device
    for bn in _in_call_order(model, layers, x[:2].to(dev)):
        n, mean, m2 = 0, None, None

        def hook(module, inputs):
            nonlocal n, mean, m2
            h = inputs[0].detach().double().transpose(0, 1).reshape(bn.num_features, -1)
            nb, mb = h.shape[1], h.mean(1)
            m2b = ((h - mb[:, None]) ** 2).sum(1)
            if mean is None:
                n, mean, m2 = nb, mb, m2b
            else:
                delta, tot = mb - mean, n + nb
                mean = mean + delta * nb / tot
                m2 = m2 + m2b + delta ** 2 * n * nb / tot
                n = tot

        handle = bn.register_forward_pre_hook(hook)
        try:
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size].to(dev))
        finally:
            handle.remove()
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_((m2 / max(n - 1, 1)).to(bn.running_var.dtype))
    return model


def _in_call_order(model: nn.Module, layers: list[nn.Module], x: Tensor) -> list[nn.Module]:
    """The BN layers in the order a forward pass calls them (module order can differ)."""
    order: list[nn.Module] = []
    handles = [bn.register_forward_pre_hook(lambda m, i: order.append(m) if m not in order else None)
               for bn in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order + [bn for bn in layers if bn not in order]


@torch.no_grad()
def evaluate(model: nn.Module, split, *, statistics: str = "running", batch_size: int = 2048,
             order: str = "given", seed: int = 0, loss=None) -> tuple[float, float]:
    """Loss and accuracy of ``model`` on ``split`` (a :class:`bnlib.data.Split`): the one
    evaluator of the book.

    ``statistics="running"``: eval mode, each BN uses its stored statistics, so how the
    split is cut into batches does not matter. ``statistics="batch"``: each BN normalises
    with the statistics of the batch of ``batch_size`` it is given (running statistics
    untouched), so the answer depends on the batches: ``order="given"``, ``"shuffled"`` (a
    seeded random order) or ``"class_sorted"`` (batches of mostly one class); a last batch
    of one example is skipped (it has no batch statistics). Classification targets give
    cross-entropy and accuracy; regression targets mean squared error and NaN. The model's
    mode is restored.
    """
    import torch.nn.functional as F
    if statistics not in ("running", "batch"):
        raise ValueError(f"statistics must be 'running' or 'batch', got {statistics!r}")
    if order not in ("shuffled", "class_sorted", "given"):
        raise ValueError(f"order must be 'shuffled', 'class_sorted' or 'given', got {order!r}")
    if batch_size < 1 or (statistics == "batch" and batch_size < 2):
        raise ValueError(f"batch_size must be at least {2 if statistics == 'batch' else 1}")
    x, y = split.x, split.y
    classification = not y.is_floating_point()
    loss = loss or (F.cross_entropy if classification else F.mse_loss)
    if order == "shuffled":
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(y.device)
        x, y = x[idx], y[idx]
    elif order == "class_sorted":
        idx = torch.argsort(y.cpu(), stable=True).to(y.device)
        x, y = x[idx], y[idx]
    was = model.training
    model.eval()
    ctx = batch_statistics(model) if statistics == "batch" else contextlib.nullcontext()
    total, correct, seen = 0.0, 0, 0
    try:
        with ctx:
            for i in range(0, len(y), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                if statistics == "batch" and len(yb) < 2:
                    continue
                out = model(xb)
                total += loss(out, yb, reduction="sum").item()
                if classification:
                    correct += (out.argmax(1) == yb).sum().item()
                seen += len(yb)
    finally:
        model.train(was)
    if not classification:
        return total / (seen * y[0].numel()), float("nan")
    return total / seen, correct / seen


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


# --- running averages and how far they are from precise statistics -----------------------

def ema(values: Sequence[float] | np.ndarray, momentum: float, *, convention: str = "torch",
        start: float = 0.0) -> np.ndarray:
    """The running averages after each value, in PyTorch's or in Keras' momentum convention.

    * ``"torch"``: ``new = (1 − momentum)·old + momentum·value`` (momentum weighs the new value;
      default 0.1);
    * ``"keras"``: ``new = momentum·old + (1 − momentum)·value`` (momentum weighs the old value;
      default 0.99).

    So Keras' momentum ``m`` is PyTorch's ``1 − m``. ``values`` may be scalars or arrays
    stacked along the first axis.
    """
    if convention not in ("torch", "keras"):
        raise ValueError(f"convention must be 'torch' or 'keras', got {convention!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    w_new = momentum if convention == "torch" else 1.0 - momentum
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    running = np.full(values.shape[1:], start, dtype=np.float64)
    for i, v in enumerate(values):
        running = (1.0 - w_new) * running + w_new * v
        out[i] = running
    return out


def statistics_error(model: nn.Module, reference_model: nn.Module) -> pd.DataFrame:
    """How far each BN's running statistics are from those of ``reference_model`` (same
    architecture, e.g. a copy with precise statistics), one row per BN layer (1-based):

    * ``mean_error``: mean over units of ``|μ − μ_ref| / σ_ref`` (in reference std units);
    * ``var_log_ratio``: mean over units of ``|log(σ² / σ²_ref)|`` (0.1 ≈ 10 % off).
    """
    a, b = batchnorm_layers(model), batchnorm_layers(reference_model)
    if not a or len(a) != len(b):
        raise ValueError(f"models need the same, non-zero number of BN layers (got {len(a)} and {len(b)})")
    rows = []
    for i, (bn, ref) in enumerate(zip(a, b), start=1):
        if bn.running_mean is None or ref.running_mean is None:
            raise ValueError("both models need running statistics (track_running_stats=True)")
        sd = ref.running_var.clamp_min(1e-12).sqrt()
        rows.append(dict(layer=i,
                         mean_error=((bn.running_mean - ref.running_mean).abs() / sd).mean().item(),
                         var_log_ratio=(bn.running_var.clamp_min(1e-12) / ref.running_var.clamp_min(1e-12))
                         .log().abs().mean().item()))
    return pd.DataFrame(rows)


@torch.no_grad()
def recompute_in_train_mode(model: nn.Module, x: Tensor, *, batch_size: int = 256) -> nn.Module:
    """Recompute every BN's running statistics the way ``torch.optim.swa_utils.update_bn``
    does: reset them, then average the batch statistics of passes over ``x`` in *training*
    mode (a cumulative average). Training mode also switches every dropout layer on, so the
    statistics again describe the noisy training-time activations. (bnlib's
    :func:`~bnlib.inference.recompute_batchnorm_stats` collects them in eval mode.)
    Returns the model in eval mode."""
    layers = [m for m in model.modules() if getattr(m, "running_var", None) is not None]
    if not layers:
        raise ValueError("the model has no batch-norm layer to recompute")
    saved = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        for i in range(0, len(x) - 1, batch_size):
            model(x[i:i + batch_size])
    finally:
        for bn, m in zip(layers, saved):
            bn.momentum = m
    return model.eval()


# --- test-time statistics: adapted to the test inputs, or per test batch -----------------

def _weight(prior: float, n: int) -> float:
    """Schneider et al.'s weight of the source statistics, ``N / (N + n)``."""
    if prior < 0:
        raise ValueError(f"prior N must be ≥ 0 (math.inf for the running statistics), got {prior}")
    return 1.0 if math.isinf(prior) else prior / (prior + n)


@torch.no_grad()
def adapt_batchnorm_stats(model: nn.Module, x: Tensor, *, prior: float = 0.0,
                          batch_size: int = 256) -> nn.Module:
    """Re-estimate every BN's statistics on unlabelled inputs ``x`` (Schneider et al. 2020).

    The target statistics are recomputed on ``x`` by :func:`bnlib.inference.recompute_batchnorm_stats`
    and mixed with the current (source) running statistics: ``N/(N+n)·source + n/(N+n)·target``
    with ``N = prior`` and ``n = len(x)``, for the means and the variances. ``prior=0`` keeps
    only the target statistics, ``math.inf`` only the source ones. (With ``prior > 0`` each
    layer's target statistics are measured behind earlier layers normalised with target rather
    than mixed statistics; the difference vanishes when ``n ≫ N``.) In place; eval mode.
    """
    layers = batchnorm_layers(model)
    w = _weight(prior, len(x))
    source = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in layers]
    recompute_batchnorm_stats(model, x, batch_size=batch_size)
    for bn, (mean, var) in zip(layers, source):
        bn.running_mean.mul_(1 - w).add_(w * mean)
        bn.running_var.mul_(1 - w).add_(w * var)
    return model


def _mixed_hook(group: int, w: float):
    """A forward hook that renormalises a BN's input per consecutive group of ``group``
    examples with ``w·running + (1 − w)·group`` statistics (biased group variance)."""
    def hook(bn: nn.Module, inputs: tuple, _output: Tensor) -> Tensor:
        x = inputs[0]
        c = x.shape[1]
        xs = x.reshape(x.shape[0] // group, group, c, -1)
        flat = xs.transpose(1, 2).reshape(xs.shape[0], c, -1)  # (groups, C, group·L): fast reduce
        var, mean = torch.var_mean(flat, dim=2, unbiased=False)
        var, mean = var[:, None, :, None], mean[:, None, :, None]
        if w > 0:
            mean = w * bn.running_mean.view(1, 1, c, 1) + (1 - w) * mean
            var = w * bn.running_var.view(1, 1, c, 1) + (1 - w) * var
        out = (xs - mean) / torch.sqrt(var + bn.eps)
        if bn.weight is not None:
            out = out * bn.weight.view(1, 1, c, 1)
        if bn.bias is not None:
            out = out + bn.bias.view(1, 1, c, 1)
        return out.reshape(x.shape)
    return hook


@torch.no_grad()
def grouped_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int,
                     prior: float = 0.0) -> float:
    """Accuracy when ``x`` arrives in consecutive test batches of ``batch_size`` and every BN
    normalises each batch with its own statistics mixed with the running ones by ``prior``
    (``0``: prediction-time BN; ``math.inf``: running statistics). A ragged last batch is
    normalised on its own. Equivalent to a loop over the batches, in one or two passes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    layers = batchnorm_layers(model)
    was = model.training
    model.eval()
    cut = len(x) - len(x) % batch_size
    correct = 0
    for lo, hi in ((0, cut), (cut, len(x))):
        if hi == lo:
            continue
        group = min(batch_size, hi - lo)
        w = _weight(prior, group)
        handles = [bn.register_forward_hook(_mixed_hook(group, w)) for bn in layers] if w < 1 else []
        try:
            correct += (model(x[lo:hi]).argmax(1) == y[lo:hi]).sum().item()
        finally:
            for h in handles:
                h.remove()
    model.train(was)
    return correct / len(x)


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
