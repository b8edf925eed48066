"""Batch-norm layers that are drop-in replacements for ``torch.nn.BatchNorm1d/2d``.

Same constructor, same parameters and buffers (so a ``state_dict`` moves between the two
implementations in both directions), same train/eval semantics, same errors. The
arithmetic is :func:`bnlib.functional.batch_norm`.

The conventions, spelled out because teaching code often gets them wrong:

* ``momentum`` weighs the *new* batch: ``running = (1 - momentum) * running + momentum * batch``
  (Keras' ``momentum=0.99`` is PyTorch's ``momentum=0.01``);
* ``momentum=None`` makes the running statistics a cumulative average over
  ``num_batches_tracked`` batches (used for "precise" statistics);
* the batch is normalised with the biased variance; ``running_var`` stores the unbiased one;
* ``track_running_stats=False`` keeps no buffers and always normalises with the batch;
* the mode is the module's ``training`` flag (``model.train()`` / ``model.eval()``),
  never whether gradients are enabled.

Also here: :class:`ShiftNoise`, Santurkar et al.'s injected distributional shift, a layer that
perturbs its input in training mode only (:func:`bnlib.models.add_shift_noise` places it).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "GhostBatchNorm", "GhostBatchNorm1d", "use_ghost_batchnorm",
           "convert", "batchnorm_layers", "SyncBatchNorm", "ShiftNoise"]


class _BatchNorm(nn.Module):
    """Shared state and forward of the batch-norm layers (mirrors torch's ``_BatchNorm``)."""

    _version = 2  # the state_dict version torch uses since num_batches_tracked was added
    _expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.register_parameter(
            "weight", nn.Parameter(torch.empty(num_features, **factory)) if affine else None)
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(num_features, **factory)) if affine and bias else None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Forget the running statistics: mean 0, variance 1, no batches seen."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """γ = 1 and β = 0, so a fresh layer is a pure normalisation."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._expected_dims:
            want = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"expected {want} input (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise RuntimeError(
                f"{type(self).__name__}({self.num_features}) got an input with "
                f"{x.shape[1]} channels (shape {tuple(x.shape)}): running_mean should "
                f"contain {x.shape[1]} elements not {self.num_features}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average of every batch seen so far
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        update = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        # Old checkpoints (version < 2) have no num_batches_tracked; default it to 0 as torch does.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


class BatchNorm1d(_BatchNorm):
    """Batch norm over ``(N, C)`` or ``(N, C, L)`` inputs; statistics per channel ``C``."""

    _expected_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over ``(N, C, H, W)`` inputs; statistics per channel over N, H and W."""

    _expected_dims = (4,)


_PAIRS = {
    "bnlib": {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d},
    "torch": {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d},
}


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every batch-norm layer of ``model`` (bnlib's or torch's), in module order."""
    kinds = (_BatchNorm, nn.modules.batchnorm._BatchNorm)
    return [m for m in model.modules() if isinstance(m, kinds)]


def convert(model: nn.Module, to: Literal["bnlib", "torch"] = "bnlib") -> nn.Module:
    """Swap every BatchNorm1d/2d of ``model`` for the other implementation, in place.

    Constructor options, parameters, running statistics, device, dtype and train/eval
    mode are kept, so the converted model computes the same function. Returns ``model``
    (or the new layer when ``model`` itself is a batch-norm layer).
    """
    if to not in _PAIRS:
        raise ValueError(f"to must be 'bnlib' or 'torch', got {to!r}")
    table = _PAIRS[to]

    def swap(layer: nn.Module) -> nn.Module:
        cls = table[type(layer)]
        ref = layer.weight if layer.weight is not None else layer.running_mean
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = cls(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                  affine=layer.affine, track_running_stats=layer.track_running_stats,
                  bias=layer.bias is not None or not layer.affine, **factory)
        new.load_state_dict(layer.state_dict())
        for name, p in layer.named_parameters(recurse=False):  # frozen stays frozen
            getattr(new, name).requires_grad_(p.requires_grad)
        new.train(layer.training)
        return new

    if type(model) in table:
        return swap(model)
    for name, child in model.named_children():
        if type(child) in table:
            setattr(model, name, swap(child))
        else:
            convert(child, to)
    return model



# --- ghost batch norm (Hoffer et al., 2017) ---------------------------------------

class GhostBatchNorm(_BatchNorm):
    """Batch norm whose training-mode statistics come from *ghost* (virtual) batches.

    In training mode the batch is cut into ``max(N // virtual_batch_size, 1)`` consecutive
    chunks of (nearly) equal size, each of at least ``virtual_batch_size`` examples (or the
    whole batch), and every chunk is normalised with its own mean and variance by
    :func:`bnlib.functional.batch_norm`. Inputs ``(N, C)``, ``(N, C, L)`` or
    ``(N, C, H, W)``; evaluation mode is an ordinary batch norm with the running statistics.
    With ``virtual_batch_size ≥ N / 2`` the layer is exactly batch norm.

    ``running_stats`` picks who updates the running statistics:

    * ``"each"`` (default; Hoffer et al., 2017): every ghost batch in turn, as if it were a
      training step (``num_batches_tracked`` counts ghost batches);
    * ``"first"``: ghost batch 0 only. That is what ``k`` data-parallel devices with a plain
      batch norm each compute when ``virtual_batch_size = B / k``: each device normalises its
      slice, and rank 0's buffers are the ones DDP broadcasts and a checkpoint holds
      (chapter 21).

    Parameters, buffers and ``state_dict`` are those of :class:`BatchNorm1d`; torch has no
    such layer.
    """

    _expected_dims = (2, 3, 4)

    def __init__(self, num_features: int, virtual_batch_size: int = 8, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, running_stats: Literal["each", "first"] = "each") -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) \
                or virtual_batch_size < 2:
            raise ValueError(f"virtual_batch_size must be an int ≥ 2 (a batch norm needs two "
                             f"examples), got {virtual_batch_size!r}")
        if running_stats not in ("each", "first"):
            raise ValueError(f"running_stats must be 'each' or 'first', got {running_stats!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.virtual_batch_size = virtual_batch_size
        self.running_stats = running_stats

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        if len(input) < 2:
            raise ValueError(f"ghost batch norm needs at least 2 examples in training mode, "
                             f"got input size {tuple(input.shape)}")
        track = self.track_running_stats and self.running_mean is not None
        outs = []
        for i, chunk in enumerate(input.tensor_split(max(len(input) // self.virtual_batch_size, 1))):
            update = track and (i == 0 or self.running_stats == "each")
            momentum = 0.0 if self.momentum is None else self.momentum
            if update:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / float(self.num_batches_tracked)
            outs.append(F.batch_norm(chunk, self.running_mean if update else None,
                                     self.running_var if update else None, self.weight,
                                     self.bias, True, momentum, self.eps))
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}, "
                f"running_stats={self.running_stats}")


class GhostBatchNorm1d(GhostBatchNorm):
    """:class:`GhostBatchNorm` over ``(N, C)`` or ``(N, C, L)`` inputs (what
    :func:`use_ghost_batchnorm` puts in place of a :class:`BatchNorm1d`)."""

    _expected_dims = (2, 3)


def use_ghost_batchnorm(model: nn.Module, virtual_batch_size: int = 8,
                        running_stats: Literal["each", "first"] = "each") -> nn.Module:
    """Replace every :class:`bnlib.nn.BatchNorm1d` of ``model`` by a
    :class:`GhostBatchNorm1d` with the same options, state, device and dtype, in place;
    returns ``model``. ``running_stats="first"`` with ``virtual_batch_size = B / k`` is
    per-device batch norm on ``k`` data-parallel devices (see :class:`GhostBatchNorm`)."""
    replaced = 0

    def swap(parent: nn.Module) -> None:
        nonlocal replaced
        for name, child in parent.named_children():
            if type(child) is BatchNorm1d:
                ghost = GhostBatchNorm1d(child.num_features, virtual_batch_size, eps=child.eps,
                                         momentum=child.momentum, affine=child.affine,
                                         track_running_stats=child.track_running_stats,
                                         bias=child.bias is not None or not child.affine,
                                         running_stats=running_stats)
                ref = child.running_mean if child.running_mean is not None else child.weight
                if ref is not None:  # the same device and dtype as the layer it replaces
                    ghost.to(device=ref.device, dtype=ref.dtype)
                ghost.load_state_dict(child.state_dict())
                ghost.train(child.training)
                setattr(parent, name, ghost)
                replaced += 1
            else:
                swap(child)

    swap(model)
    if not replaced:
        raise ValueError("the model has no bnlib BatchNorm1d layer to turn into ghost batch norm")
    return model


# --- injected noise (Santurkar et al., 2018) ---------------------------------------

class ShiftNoise(nn.Module):
    """Santurkar et al.'s time-varying distributional shift (their Algorithm 1).

    In training mode every forward call draws fresh noise. Per unit ``j`` (per channel for
    images): a mean shift ``μ_j ~ U(−n_mu, n_mu)`` and a scale ``σ_j ~ U(1, n_sigma)``;
    then per example (and position) ``m ~ U(μ_j − r_mu, μ_j + r_mu)`` and
    ``s ~ N(σ_j, r_sigma)``; the output is ``s·a + m``. In eval mode it is the identity.
    """

    def __init__(self, n_mu: float = 0.5, n_sigma: float = 1.25, r_mu: float = 0.1,
                 r_sigma: float = 0.1) -> None:
        super().__init__()
        if n_mu < 0 or r_mu < 0 or r_sigma < 0:
            raise ValueError(f"n_mu, r_mu and r_sigma must be ≥ 0, got {n_mu}, {r_mu}, {r_sigma}")
        if n_sigma < 1:
            raise ValueError(f"n_sigma must be ≥ 1 (σ ~ U(1, n_sigma)), got {n_sigma}")
        self.n_mu, self.n_sigma, self.r_mu, self.r_sigma = n_mu, n_sigma, r_mu, r_sigma

    def forward(self, a: Tensor) -> Tensor:
        if not self.training:
            return a
        if a.dim() not in (2, 4):
            raise ValueError(f"ShiftNoise expects (N, C) or (N, C, H, W) inputs, got shape {tuple(a.shape)}")
        c = a.shape[1]
        shape = (1, c) + (1,) * (a.dim() - 2)
        opts = dict(device=a.device, dtype=a.dtype)
        mu = ((torch.rand(c, **opts) * 2 - 1) * self.n_mu).view(shape)
        sigma = (1 + torch.rand(c, **opts) * (self.n_sigma - 1)).view(shape)
        m = mu + (torch.rand(a.shape, **opts) * 2 - 1) * self.r_mu
        s = sigma + torch.randn(a.shape, **opts) * self.r_sigma
        return s * a + m


def __getattr__(name: str):
    """``bnlib.nn.SyncBatchNorm``, imported lazily (bnlib.distributed imports this module)."""
    if name == "SyncBatchNorm":
        from .distributed import SyncBatchNorm
        return SyncBatchNorm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
