"""Builders for the networks the chapters train: an MLP and a small CNN with knobs.

Every hidden layer is a :class:`Block` with three named children, so chapters can hook
into them by name: ``block.layer`` (the Linear or Conv2d), ``block.norm`` (the
normaliser, ``nn.Identity`` when there is none) and ``block.act`` (the activation; its
*input* is "the input of the nonlinearity" that the BN paper plots). The order inside a
block is ``layer → norm → act`` for ``placement="before"`` (BN before the activation, as
in the original paper) and ``layer → act → norm`` for ``placement="after"`` (the
article's advice). A layer that a batch norm directly follows gets no bias: the norm's
β replaces it.

Two fixed networks sit outside that scheme: :class:`CNN1d` (strided 1-D convolutions with BN,
then a linear classifier) and :class:`LogisticRegression` (optionally with a BN on its inputs;
:class:`LogRegSpec` is its spec). :func:`add_shift_noise` puts a :class:`bnlib.nn.ShiftNoise`
after every block's normaliser of a built :class:`Net`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Sequence

import torch
from torch import Tensor, nn

from . import nn as bnn

if TYPE_CHECKING:
    from .data import Dataset

__all__ = ["Block", "Net", "mlp", "cnn", "ACTIVATIONS", "NORMS", "MLPSpec", "CNNSpec", "ModelSpec",
           "CNN1d", "LogisticRegression", "LogRegSpec", "add_shift_noise"]

Activation = Literal["relu", "sigmoid", "tanh", "gelu", "identity"]
Norm = str  # one of NORMS
Placement = Literal["before", "after"]
Init = Literal["kaiming", "xavier", "normal", "default"]

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU,
               "identity": nn.Identity}
NORMS = ("none", "batch", "layer", "group", "ghost", "renorm")
BATCH_NORMS = ("batch", "ghost", "renorm")  # their β replaces the bias of the layer before them


def make_norm(kind: Norm, features: int, *, conv: bool, impl: str = "bnlib",
              groups: int = 8, dims: int = 2, ghost_size: int = 8) -> nn.Module:
    """A normalisation layer for ``features`` channels; ``impl`` picks bnlib's BN or torch's.
    ``dims`` is the convolution's dimensionality (2 for images, 1 for sequences)."""
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        lib = {"bnlib": bnn, "torch": nn}.get(impl)
        if lib is None:
            raise ValueError(f"impl must be 'bnlib' or 'torch', got {impl!r}")
        return lib.BatchNorm2d(features) if conv and dims == 2 else lib.BatchNorm1d(features)
    if kind == "layer":
        # For images, LayerNorm over (C, H, W) is GroupNorm with one group.
        from .norms import GroupNorm, LayerNorm  # bnlib's own, drop-ins for torch's
        return GroupNorm(1, features) if conv else LayerNorm(features)
    if kind == "group":
        g = math.gcd(groups, features)
        from .norms import GroupNorm  # bnlib's from-scratch GroupNorm (chapter 16)
        return GroupNorm(g, features)
    if kind == "ghost":  # ghost batches of ghost_size examples (Hoffer's running statistics)
        from .nn import GhostBatchNorm
        return GhostBatchNorm(features, ghost_size)
    if kind == "renorm":  # Batch Renorm with the layer's default schedule (chapter 19 sets its own)
        from .norms import BatchRenorm1d, BatchRenorm2d
        return (BatchRenorm2d if conv and dims == 2 else BatchRenorm1d)(features)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class Block(nn.Module):
    """One hidden layer: weight layer, normaliser and activation, optionally residual."""

    def __init__(self, layer: nn.Module, norm: nn.Module, act: nn.Module,
                 placement: Placement = "before", residual: bool = False,
                 pool: nn.Module | None = None) -> None:
        super().__init__()
        if placement not in ("before", "after"):
            raise ValueError(f"placement must be 'before' or 'after', got {placement!r}")
        self.layer, self.norm, self.act = layer, norm, act
        self.pool = pool if pool is not None else nn.Identity()
        self.drop = nn.Identity()  # dropout on the block's input (see mlp's ``dropout``)
        self.placement, self.residual = placement, residual

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(self.drop(x))
        h = self.act(self.norm(h)) if self.placement == "before" else self.norm(self.act(h))
        return self.pool(x + h if self.residual else h)

    def extra_repr(self) -> str:
        return f"placement={self.placement}, residual={self.residual}"


class Net(nn.Module):
    """``blocks`` (a ModuleList of :class:`Block`), then an optional pooling ``neck``, then ``head``."""

    def __init__(self, blocks: Sequence[Block], head: nn.Module, neck: nn.Module | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.neck = neck if neck is not None else nn.Identity()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.neck(x))

    def weight_layers(self) -> list[nn.Module]:
        """The Linear/Conv layers in order, the head last (for gradient and weight probes)."""
        return [b.layer for b in self.blocks] + [self.head]


def init_weights(model: nn.Module, scheme: Init = "kaiming", scale: float = 1.0,
                 std: float | None = None, nonlinearity: str = "relu") -> nn.Module:
    """(Re)initialise every Linear/Conv weight; biases start at zero.

    ``scheme``: ``kaiming`` (He normal, std = gain/√fan_in), ``xavier`` (Glorot normal),
    ``normal`` (needs ``std``), ``default`` (leave PyTorch's). ``scale`` multiplies the
    std (chapter 8 sweeps it); ``std`` overrides the scheme with an explicit value.
    """
    gain_of = {"relu": "relu", "gelu": "relu", "sigmoid": "sigmoid", "tanh": "tanh",
               "identity": "linear"}
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        if std is not None or scheme == "normal":
            if std is None:
                raise ValueError("init scheme 'normal' needs an explicit std")
            nn.init.normal_(m.weight, 0.0, std * scale)
        elif scheme == "kaiming":
            nn.init.kaiming_normal_(m.weight, nonlinearity=gain_of[nonlinearity])
            m.weight.data.mul_(scale)
        elif scheme == "xavier":
            nn.init.xavier_normal_(m.weight, gain=scale)
        elif scheme == "default":
            m.weight.data.mul_(scale)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def mlp(in_features: int, num_classes: int, *, depth: int = 3, width: int = 128,
        activation: Activation = "relu", norm: Norm = "none", placement: Placement = "before",
        residual: bool = False, init: Init = "kaiming", init_scale: float = 1.0,
        init_std: float | None = None, norm_impl: str = "bnlib",
        residual_branch_scale: float | None = None, dropout: float = 0.0,
        dropout_at: Literal["blocks", "head"] = "blocks", ghost_size: int = 8) -> Net:
    """A multilayer perceptron with ``depth`` hidden layers of ``width`` units
    (``norm="ghost"``: ghost batch norm over virtual batches of ``ghost_size`` examples).

    ``dropout`` (a probability) is applied to the input of every hidden layer after the
    first and of the classifier (``dropout_at="blocks"``: so with ``placement="before"``
    it sits in front of the next batch norm), or only in front of the classifier, after
    every batch norm (``dropout_at="head"``). The classifier's dropout is ``net.neck``.

    With ``residual=True`` every hidden layer after the first adds its input back
    (``x + block(x)``); ``residual_branch_scale`` multiplies the initial weights of those
    residual branches (e.g. ``1/√depth`` to train deep residual nets without BN).
    """
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be ≥ 1, got depth={depth}, width={width}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    blocks = []
    for i in range(depth):
        fan_in = in_features if i == 0 else width
        bias = not (norm in BATCH_NORMS and placement == "before")
        blocks.append(Block(nn.Linear(fan_in, width, bias=bias),
                            make_norm(norm, width, conv=False, impl=norm_impl, ghost_size=ghost_size),
                            ACTIVATIONS[activation](), placement, residual and i > 0))
        if dropout and dropout_at == "blocks" and i > 0:
            blocks[-1].drop = nn.Dropout(dropout)
    if dropout_at not in ("blocks", "head"):
        raise ValueError(f"dropout_at must be 'blocks' or 'head', got {dropout_at!r}")
    net = Net(blocks, nn.Linear(width, num_classes), nn.Dropout(dropout) if dropout else None)
    init_weights(net, init, init_scale, init_std, activation)
    if residual and residual_branch_scale is not None:
        with torch.no_grad():
            for block in net.blocks[1:]:
                block.layer.weight.mul_(residual_branch_scale)
    return net


def cnn(in_channels: int, num_classes: int, *, channels: Sequence[int] = (16, 32, 64),
        activation: Activation = "relu", norm: Norm = "none", placement: Placement = "before",
        pool_every: int = 1, init: Init = "kaiming", init_scale: float = 1.0,
        init_std: float | None = None, norm_impl: str = "bnlib", dims: int = 2) -> Net:
    """A small VGG-style CNN: 3×3 conv blocks (3-tap for ``dims=1``), 2×2 max-pooling after
    every ``pool_every`` blocks, global average pooling and a linear classifier. ``dims=1``
    builds the same network from ``Conv1d`` and ``BatchNorm1d`` over ``(N, C, L)`` inputs
    (MNIST-1D); ``dims=2`` over ``(N, C, H, W)`` images."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    conv, pool_layer, avg = ((nn.Conv1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d) if dims == 1
                             else (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d))
    blocks, c_in = [], in_channels
    for i, c in enumerate(channels):
        bias = not (norm in BATCH_NORMS and placement == "before")
        pool = pool_every and (i + 1) % pool_every == 0 and i + 1 < len(channels)
        blocks.append(Block(conv(c_in, c, 3, padding=1, bias=bias),
                            make_norm(norm, c, conv=True, impl=norm_impl, dims=dims),
                            ACTIVATIONS[activation](), placement,
                            pool=pool_layer(2) if pool else None))
        c_in = c
    neck = nn.Sequential(avg(1), nn.Flatten())
    net = Net(blocks, nn.Linear(c_in, num_classes), neck)
    init_weights(net, init, init_scale, init_std, activation)
    return net


# --- fixed networks: a strided 1-D CNN, logistic regression --------------------------------

class CNN1d(nn.Module):
    """``layers`` × (Conv1d, stride 2 → BatchNorm1d → ReLU), then a linear classifier on the
    flattened features. Convolutions followed by a BN have no bias (BN's β replaces it)."""

    def __init__(self, in_channels: int = 1, length: int = 40, num_classes: int = 10, *,
                 channels: int = 32, layers: int = 3, kernel: int = 5) -> None:
        super().__init__()
        if min(in_channels, length, channels, layers, kernel) < 1 or num_classes < 2:
            raise ValueError("CNN1d needs positive sizes and num_classes ≥ 2")
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks += [nn.Conv1d(in_channels if i == 0 else channels, channels, kernel, stride=2,
                                 padding=kernel // 2, bias=False), bnn.BatchNorm1d(channels), nn.ReLU()]
            length = (length + 2 * (kernel // 2) - kernel) // 2 + 1
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class LogisticRegression(nn.Module):
    """Multinomial logistic regression ``x ↦ W x + b``, optionally after a batch norm on the
    input features (``input_norm=True``: ``x ↦ W BN(x) + b``); PyTorch's default init."""

    def __init__(self, in_features: int, num_classes: int, *, input_norm: bool = False) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError(f"need in_features ≥ 1 and num_classes ≥ 2, got {in_features}, {num_classes}")
        self.norm = bnn.BatchNorm1d(in_features) if input_norm else nn.Identity()
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x))


# --- inserting layers into a built Net ----------------------------------------------------

def add_shift_noise(model: Net, **noise_kwargs: float) -> Net:
    """Put a :class:`~bnlib.nn.ShiftNoise` right after every block's normaliser (in place):
    ``block.norm`` becomes ``nn.Sequential(old_norm, ShiftNoise(...))`` (on a plain net, after
    the identity)."""
    if not isinstance(model, Net):
        raise TypeError(f"add_shift_noise needs a bnlib.models.Net, got {type(model).__name__}")
    for block in model.blocks:
        block.norm = nn.Sequential(block.norm, bnn.ShiftNoise(**noise_kwargs))
    return model


# --- specs: a network described by data, built by seed ------------------------------------

def _outputs(data: "Dataset") -> int:
    return data.num_classes if data.num_classes is not None else int(data.train.y[0].numel())


@dataclass(frozen=True)
class MLPSpec:
    """An MLP, as data: every knob of :func:`mlp`. ``build(seed, data)`` makes the network.

    Two arms that differ in one field (``norm="batch"`` vs ``"none"``) and are built with the
    same seed start from the same random stream (see :func:`bnlib.train.fit`).
    """

    kind: ClassVar[str] = "mlp"
    depth: int = 3
    width: int = 128
    activation: str = "relu"
    norm: str = "none"
    placement: str = "before"
    residual: bool = False
    init: str = "kaiming"
    init_scale: float = 1.0
    init_std: float | None = None
    norm_impl: str = "bnlib"
    residual_branch_scale: float | None = None
    dropout: float = 0.0
    dropout_at: str = "blocks"
    ghost_size: int = 8  # examples per virtual batch when norm == "ghost"

    def inputs(self, data: "Dataset") -> "Dataset":
        """The data as this network reads it (flat vectors)."""
        return data

    def build(self, seed: int, data: "Dataset") -> Net:
        """The network for ``data``, initialised right after ``torch.manual_seed(seed)``."""
        torch.manual_seed(seed)
        return mlp(data.num_features, _outputs(data), **dataclasses.asdict(self))


@dataclass(frozen=True)
class CNNSpec:
    """A small CNN, as data: every knob of :func:`cnn`. 1-D or 2-D follows the data: a
    ``(C, L)`` input shape (MNIST-1D) gives ``Conv1d``/``BatchNorm1d``, ``(C, H, W)`` 2-D."""

    kind: ClassVar[str] = "cnn"
    channels: tuple[int, ...] = (16, 32, 64)
    activation: str = "relu"
    norm: str = "none"
    placement: str = "before"
    pool_every: int = 1
    init: str = "kaiming"
    init_scale: float = 1.0
    init_std: float | None = None
    norm_impl: str = "bnlib"

    def inputs(self, data: "Dataset") -> "Dataset":
        """The data as this network reads it (``(N, C, H, W)`` or ``(N, C, L)``)."""
        return data.images()

    def build(self, seed: int, data: "Dataset") -> Net:
        """The network for ``data``, initialised right after ``torch.manual_seed(seed)``."""
        torch.manual_seed(seed)
        return cnn(data.input_shape[0], _outputs(data), dims=len(data.input_shape) - 1,
                   **dataclasses.asdict(self))


@dataclass(frozen=True)
class LogRegSpec:
    """Logistic regression as a model spec (``norm="batch"``: BN on the input features)."""

    kind: ClassVar[str] = "logreg"
    norm: str = "none"

    def inputs(self, data):
        """The data as the model reads it (flat vectors)."""
        return data

    def build(self, seed: int, data) -> LogisticRegression:
        """The model for ``data``, initialised right after ``torch.manual_seed(seed)``."""
        if self.norm not in ("none", "batch"):
            raise ValueError(f"LogRegSpec.norm must be 'none' or 'batch', got {self.norm!r}")
        torch.manual_seed(seed)
        return LogisticRegression(data.num_features, data.num_classes, input_norm=self.norm == "batch")


ModelSpec = MLPSpec | CNNSpec
