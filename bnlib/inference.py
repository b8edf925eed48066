"""Batch norm at inference time: recomputing the population statistics ("precise BN")
and evaluating with batch statistics instead of running ones."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .nn import batchnorm_layers

__all__ = ["recompute_batchnorm_stats", "batch_statistics", "fold_batchnorm", "evaluate"]


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
