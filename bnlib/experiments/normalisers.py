"""Chapter 19: batch norm's alternatives on small CNNs, against the batch size.

One harness for every normaliser of :mod:`bnlib.norms`: the same small CNN (a strided
stem, ``depth`` constant-width conv blocks, a linear head), 1-D on MNIST-1D and 2-D on the
5,000-image MNIST sample, with the normaliser after every conv:

* ``none`` (PyTorch's default init, conv biases), ``batch``, ``ghost`` (virtual batches of
  ``ghost_size``), ``renorm`` (Batch Renorm), ``group`` (GroupNorm, ``groups`` groups),
  ``layer`` (GroupNorm with one group: LayerNorm over channels and positions, the
  GroupNorm paper's LN for conv nets), ``ws+group`` (weight-standardised convs + GroupNorm)
  and ``skipinit`` (no normaliser; every block residual, ``x + α·block(x)``, α = 0 at init).

Protocol (the shape of Wu & He's Figure 1): every batch size sees the same number of
training samples (``epochs`` passes), so a batch of 2 takes 64× the steps of a batch of
128; SGD with momentum, the learning rate scaled linearly with the batch size
(``lr = base_lr · B / 32``), one base rate for every arm (not tuned per arm: it is the
cheap, honest choice; an arm it does not suit shows it as low accuracy or divergence).
Batch Renorm's schedule is in fractions of each run: plain BN for the first ``renorm_warmup``
of the steps, then r_max → 3 and d_max → 5 over the next ``renorm_ramp``.

Measured per run: test accuracy in eval mode and in train mode (batch statistics of test
batches of the training size): their gap is the train/eval discrepancy.
``normaliser_step_time`` times one training step per normaliser, interleaved, in CPU time.
"""
from __future__ import annotations

import copy
import functools
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import data as datasets
from ..nn import BatchNorm1d, BatchNorm2d
from ..norms import BatchRenorm1d, BatchRenorm2d, GhostBatchNorm, GroupNorm, SkipInit, WSConv1d, WSConv2d
from ..train import batches, resolve_device, seeded
from . import Config, register, sweep

__all__ = ["NormalisersConfig", "StepTimeConfig", "ARMS", "norm_cnn", "load_mnist1d",
           "fit_normaliser", "mode_accuracies", "normalisers_batch_size", "normaliser_step_time", "plot"]

ARMS = ("none", "batch", "ghost", "renorm", "group", "layer", "ws+group", "skipinit")


# --- data ---------------------------------------------------------------------------------
# LOCAL STAND-IN until bnlib.data.load("mnist1d") exists: then use that loader instead.

@functools.lru_cache(maxsize=4)
def load_mnist1d(num_samples: int = 5000, val_fraction: float = 0.15) -> datasets.Dataset:
    """MNIST-1D (Greydanus, 2020) generated offline by the ``mnist1d`` package (never its
    download). The package's own train/test split is kept; the last ``val_fraction`` of its
    training part is the validation split. The package standardises with statistics of
    all examples; we re-standardise with the training split's mean and std, which (the
    transforms being affine) equals standardising the raw signals with training statistics
    only. Inputs ``(N, 1, 40)``."""
    import mnist1d.data as m1d  # imports `requests`, but nothing here touches the network
    args = m1d.get_dataset_args()
    args.num_samples = num_samples
    d = m1d.make_dataset(args)
    n_val = int(len(d["y"]) * val_fraction)
    x_tr, y_tr = d["x"][:-n_val], d["y"][:-n_val]
    mean, std = x_tr.mean(), x_tr.std()

    def split(x: np.ndarray, y: np.ndarray) -> datasets.Split:
        x = torch.as_tensor((x - mean) / std, dtype=torch.float32).reshape(len(x), 1, 40)
        return datasets.Split(x, torch.as_tensor(y, dtype=torch.long))

    return datasets.Dataset("mnist1d", split(x_tr, y_tr), split(d["x"][-n_val:], d["y"][-n_val:]),
                            split(d["x_test"], d["y_test"]), (1, 40), 10, "standardized")


@functools.lru_cache(maxsize=4)
def _load(name: str, num_samples: int) -> datasets.Dataset:
    if name == "mnist1d":
        return load_mnist1d(num_samples)
    if name == "mnist5k":
        return datasets.load("mnist5k", n_train=num_samples).images()
    raise ValueError(f"dataset must be 'mnist1d' or 'mnist5k', got {name!r}")


# --- model --------------------------------------------------------------------------------

def norm_cnn(arm: str, in_channels: int, num_classes: int, *, dims: int = 1, width: int = 16,
             depth: int = 3, groups: int = 4, ghost_size: int = 8,
             renorm_steps: tuple[int, int] = (0, 0)) -> nn.Module:
    """The chapter's CNN with normaliser ``arm`` (one of :data:`ARMS`) after every conv:
    stem ``conv(k=5, stride 2) → norm → ReLU → avg-pool 2``, ``depth`` blocks
    ``conv(k=3) → norm → ReLU`` of ``width`` channels, adaptive avg-pool to 4 (per spatial
    dim), linear head. ``renorm_steps`` = (warmup, ramp) of Batch Renorm."""
    if arm not in ARMS or dims not in (1, 2):
        raise ValueError(f"unknown arm {arm!r} or dims {dims}: arms are {list(ARMS)}, dims 1 or 2")
    ws = arm == "ws+group"
    conv_cls = (WSConv1d if ws else nn.Conv1d) if dims == 1 else (WSConv2d if ws else nn.Conv2d)
    pool = nn.AvgPool1d(2) if dims == 1 else nn.AvgPool2d(2)
    head_pool = nn.AdaptiveAvgPool1d(4) if dims == 1 else nn.AdaptiveAvgPool2d(4)

    def norm(c: int) -> nn.Module:
        if arm in ("none", "skipinit"):
            return nn.Identity()
        if arm == "batch":
            return (BatchNorm1d if dims == 1 else BatchNorm2d)(c)
        if arm == "ghost":
            return GhostBatchNorm(c, virtual_batch_size=ghost_size)
        if arm == "renorm":
            warm, ramp = renorm_steps
            return (BatchRenorm1d if dims == 1 else BatchRenorm2d)(c, warmup_steps=warm, ramp_steps=ramp)
        return GroupNorm(1 if arm == "layer" else groups, c)

    bias = arm in ("none", "skipinit")
    stem = [conv_cls(in_channels, width, 5, stride=2, padding=2, bias=bias), norm(width), nn.ReLU(), pool]
    blocks = []
    for _ in range(depth):
        b = nn.Sequential(conv_cls(width, width, 3, padding=1, bias=bias), norm(width), nn.ReLU())
        blocks.append(SkipInit(b) if arm == "skipinit" else b)
    return nn.Sequential(*stem, *blocks, head_pool, nn.Flatten(),
                         nn.Linear(width * 4 ** dims, num_classes))


# --- one run ------------------------------------------------------------------------------

@torch.no_grad()
def mode_accuracies(model: nn.Module, split: datasets.Split, batch_size: int) -> tuple[float, float]:
    """Accuracy on ``split`` in eval mode (running statistics) and in train mode (each batch
    of ``batch_size`` test examples normalised with its own statistics; on a copy, so the
    running statistics of ``model`` are untouched). A ragged last batch is dropped from
    both, so the two numbers are over the same examples."""
    n = len(split) - len(split) % batch_size
    x, y = split.x[:n], split.y[:n]
    m = copy.deepcopy(model)
    eval_acc = (m.eval()(x).argmax(1) == y).float().mean().item()
    m.train()
    correct = sum((m(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, n, batch_size))
    return eval_acc, correct / n


def fit_normaliser(*, seed: int, arm: str, dataset: str, batch_size: int, epochs: float,
                   base_lr: float, num_samples: int, width: int, depth: int, groups: int,
                   ghost_size: int, renorm_warmup: float, renorm_ramp: float,
                   gap_examples: int = 512, momentum: float = 0.9, device: str = "auto") -> dict:
    """Train one arm at one batch size (SGD with momentum, ``seed``'s init and batch order;
    a non-finite loss stops the run and marks it ``diverged``); returns one row of final
    measurements. No evaluation during training: nothing here is tuned on validation."""
    ds = _load(dataset, num_samples)
    steps = max(1, round(epochs * len(ds.train) / batch_size))
    dims = len(ds.input_shape) - 1
    ghost = min(ghost_size, batch_size)
    build = lambda: norm_cnn(arm, ds.input_shape[0], ds.num_classes, dims=dims, width=width,  # noqa: E731
                             depth=depth, groups=groups, ghost_size=ghost,
                             renorm_steps=(round(renorm_warmup * steps), round(renorm_ramp * steps)))
    net = seeded(seed, build).to(resolve_device(device))
    data = ds.to(next(net.parameters()).device)
    lr = base_lr * batch_size / 32
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    stream = batches(len(data.train), batch_size, torch.Generator().manual_seed(seed))
    diverged, t0 = False, time.process_time()
    net.train()
    for _ in range(steps):
        idx = next(stream)
        loss = nn.functional.cross_entropy(net(data.train.x[idx]), data.train.y[idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.process_time() - t0
    test_acc, gap_eval, gap_train = np.nan, np.nan, np.nan
    if not diverged:
        with torch.no_grad():
            test_acc = (net.eval()(data.test.x).argmax(1) == data.test.y).float().mean().item()
        sub = datasets.Split(data.test.x[:gap_examples], data.test.y[:gap_examples])
        gap_eval, gap_train = mode_accuracies(net, sub, batch_size)
    return dict(dataset=dataset, batch_size=batch_size, lr=lr, steps=steps, diverged=diverged,
                test_acc=test_acc, gap_acc_eval_mode=gap_eval, gap_acc_train_mode=gap_train,
                train_cpu_seconds=seconds)


@dataclass(frozen=True)
class NormalisersConfig(Config):
    """Test accuracy against batch size for each normaliser, at a fixed number of samples seen."""

    datasets: tuple[str, ...] = ("mnist5k",)
    arms: tuple[str, ...] = ("none", "batch", "renorm", "group", "layer", "ws+group", "skipinit")
    batch_sizes: tuple[int, ...] = (4, 16, 64)
    epochs: float = 1.0
    num_samples: int = 800           # MNIST-1D examples generated / MNIST-5k training images kept
    base_lr: float = 0.1             # at batch 32; scaled linearly with the batch size
    width: int = 16
    depth: int = 3
    groups: int = 4
    ghost_size: int = 8
    renorm_warmup: float = 0.1       # fractions of each run's steps
    renorm_ramp: float = 0.4
    gap_examples: int = 512          # test examples for the eval-mode vs train-mode gap

    @classmethod
    def full(cls) -> "NormalisersConfig":
        return cls(datasets=("mnist1d", "mnist5k"), arms=ARMS,
                   batch_sizes=(2, 4, 8, 16, 32, 64, 128), epochs=10.0,
                   num_samples=5000, width=32, depth=4, seeds=tuple(range(8)))


def plot(df: pd.DataFrame):
    """Test accuracy (mean over seeds, eval mode) against batch size, one panel per dataset."""
    from ..plots import _palette, facets
    arms = list(dict.fromkeys(df["arm"]))
    colors = _palette(arms)

    def draw(name: str, ax) -> None:
        sub = df[df["dataset"] == name].groupby(["arm", "batch_size"], sort=False)["test_acc"].mean()
        for arm in arms:
            if arm in sub.index.get_level_values(0):
                ax.plot(sub[arm].index, sub[arm].values, marker="o", label=arm, color=colors[arm])
        ax.set_xscale("log", base=2)
        sizes = sorted(set(df["batch_size"]))
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set(xlabel="batch size", ylabel="test accuracy (eval mode)", title=name)

    fig = facets(list(dict.fromkeys(df["dataset"])), draw)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=9)
    return fig


_COMMON = ("epochs", "base_lr", "num_samples", "width", "depth", "groups", "ghost_size",
           "renorm_warmup", "renorm_ramp", "gap_examples", "device")


@register("normalisers_batch_size", NormalisersConfig, chapter="19_normalisers", plot=plot,
          title="Normalisers against the batch size (MNIST-1D and MNIST, small CNNs)")
def normalisers_batch_size(cfg: NormalisersConfig) -> pd.DataFrame:
    """One row per (dataset, arm, batch size, seed): ``test_acc`` (eval mode, whole test split),
    ``gap_acc_eval_mode`` / ``gap_acc_train_mode`` (the
    first ``gap_examples`` test examples in batches of the training size), ``lr``, ``steps``, ``diverged``,
    ``train_cpu_seconds``."""
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown or min(cfg.batch_sizes) < 2:
        raise ValueError(f"arms must be among {list(ARMS)} (got {unknown}) and batch sizes ≥ 2")
    frames = []
    for name in cfg.datasets:
        frames.append(sweep(fit_normaliser, arms={a: dict(arm=a) for a in cfg.arms},
                            grid={"batch_size": list(cfg.batch_sizes)}, seeds=cfg.seeds, desc=name,
                            common=dict(dataset=name, **{k: getattr(cfg, k) for k in _COMMON})))
    return pd.concat(frames, ignore_index=True)


# --- time per step ------------------------------------------------------------------------

@dataclass(frozen=True)
class StepTimeConfig(Config):
    """CPU time of one training step (forward, backward, SGD) per normaliser, interleaved."""

    arms: tuple[str, ...] = ARMS
    dims: int = 2
    batch_size: int = 32
    width: int = 16
    depth: int = 3
    size: int = 28
    repeats: int = 15

    @classmethod
    def full(cls) -> "StepTimeConfig":
        return cls(width=32, depth=4, repeats=50)


@register("normaliser_step_time", StepTimeConfig, chapter="19_normalisers",
          title="Time per training step of each normaliser")
def normaliser_step_time(cfg: StepTimeConfig) -> pd.DataFrame:
    """One row per (arm, repeat): ``seconds`` of CPU time for one step; each repeat runs the
    arms in a fresh seeded random order, so a slow spell hits all alike. Take medians."""
    torch.manual_seed(0)
    shape = (cfg.batch_size, 1) + (cfg.size,) * cfg.dims
    x, y = torch.randn(shape), torch.randint(0, 10, (cfg.batch_size,))
    steps: dict[str, Callable[[], None]] = {}
    for arm in cfg.arms:
        net = norm_cnn(arm, 1, 10, dims=cfg.dims, width=cfg.width, depth=cfg.depth).train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def step(net=net, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        steps[arm] = step
    rng = random.Random(0)
    rows = []
    for r in range(-2, cfg.repeats):                      # two untimed warm-up rounds
        order = list(steps)
        rng.shuffle(order)
        for arm in order:
            t0 = time.process_time()
            steps[arm]()
            if r >= 0:
                rows.append(dict(arm=arm, repeat=r, seconds=time.process_time() - t0))
    return pd.DataFrame(rows)
