"""Chapter 16 (M4): when batch norm hurts — tiny batches and batches that are not i.i.d.

Two experiments, both on an MLP (``BatchNorm1d`` normalises each feature over the *batch*
only; a CNN's ``BatchNorm2d`` also pools over the positions, see :func:`pooled_values`):

``small_batches``
    BN vs LayerNorm vs GroupNorm vs no normalisation, trained at batch sizes 2 … 64. The
    learning rate follows the square-root rule ``lr = base_lr · √(batch/64) · factor`` and
    ``factor`` is tuned per arm and batch size on the validation split. BN is evaluated
    twice: with its running (EMA) statistics and with *precise* statistics recomputed
    over the training set with the final weights (:func:`bnlib.inference.recompute_batchnorm_stats`).

``non_iid_batches``
    The same normalisers trained with i.i.d. (shuffled) batches or with *class-sorted*
    batches, each holding one or two classes (:func:`class_sorted_batches`, passed to
    :func:`bnlib.train.train` as ``sampler=``). For BN we also measure what the network
    does in training mode on such batches and on class-sorted *test* batches, which shows
    that it learned a function of the batch's composition: the train/inference mismatch.

Read-outs: :func:`run_table` (one row per run), :func:`best_runs` (each arm at its
validation-tuned learning rate), :func:`two_sample_normalisation` and
:func:`pooled_values` (why batch 2 is pathological for ``BatchNorm1d`` and less so for
``BatchNorm2d``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import data as datasets
from ..inference import batch_statistics, recompute_batchnorm_stats
from ..models import NORMS, mlp
from ..train import evaluate, seeded, train
from . import Config, register, sweep
from ._common import tune_lr

__all__ = ["SmallBatchConfig", "NonIIDConfig", "small_batches", "non_iid_batches",
           "class_sorted_batches", "evaluate_in_batches", "two_sample_normalisation",
           "pooled_values", "run_table", "best_runs", "plot_small_batches", "plot_non_iid",
           "ARM_LABELS"]

ARM_LABELS = {"batch": "BatchNorm", "layer": "LayerNorm", "group": "GroupNorm", "none": "no norm"}


# --- the mechanics --------------------------------------------------------------------

def two_sample_normalisation(num_features: int = 6, *, seed: int = 0, eps: float = 1e-5) -> Tensor:
    """Batch-normalise a batch of TWO random examples (no affine) and return the result.

    With two values per feature, ``x₁ − μ = (x₁ − x₂)/2 = −(x₂ − μ)`` and
    ``σ = |x₁ − x₂|/2``, so every normalised value is ``±1`` (up to ε): the layer passes
    on only *which* of the two examples is larger, feature by feature.
    """
    if num_features < 1:
        raise ValueError(f"num_features must be ≥ 1, got {num_features}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, num_features, generator=g) * 3 + 1
    mean = x.mean(0, keepdim=True)
    var = x.var(0, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def pooled_values(batch_size: int, *, conv: bool = False, height: int = 8, width: int = 8) -> int:
    """How many numbers one BN channel averages over: ``N`` for ``BatchNorm1d`` on ``(N, C)``,
    ``N·H·W`` for ``BatchNorm2d`` on ``(N, C, H, W)`` (every position is a sample)."""
    if batch_size < 1 or height < 1 or width < 1:
        raise ValueError("batch_size, height and width must be ≥ 1")
    return batch_size * (height * width if conv else 1)


def class_sorted_batches(labels: Tensor, *, shuffle_blocks: bool = True
                         ) -> Callable[[int, int, torch.Generator], Iterator[Tensor]]:
    """A ``sampler`` for :func:`bnlib.train.train` whose batches are *not* i.i.d.

    Every epoch: shuffle the examples within each class, lay the classes end to end in a
    random class order, cut the sequence into consecutive blocks of ``batch_size`` (so
    each batch holds one class, or two where it straddles a class boundary; the ragged
    tail is dropped) and, with ``shuffle_blocks``, visit the blocks in random order (so
    the *sequence* of batches still mixes classes; only each batch's composition is
    skewed). Every training example is still seen once per epoch.
    """
    y = torch.as_tensor(labels).detach().cpu()
    if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError("labels must be a 1-D tensor of class indices")
    classes = torch.unique(y)
    members = [(y == c).nonzero().squeeze(1) for c in classes]

    def sampler(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        if n != len(y):
            raise ValueError(f"the sampler was built for {len(y)} examples, train() has {n}")
        if not 2 <= batch_size <= n:
            raise ValueError(f"batch_size must be in [2, {n}], got {batch_size}")
        while True:
            order = torch.randperm(len(classes), generator=generator)
            seq = torch.cat([members[c][torch.randperm(len(members[c]), generator=generator)]
                             for c in order.tolist()])
            blocks = [seq[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
            visit = torch.randperm(len(blocks), generator=generator) if shuffle_blocks \
                else torch.arange(len(blocks))
            for j in visit.tolist():
                yield blocks[j]

    return sampler


@torch.no_grad()
def evaluate_in_batches(model: torch.nn.Module, split: datasets.Split, *, batch_size: int,
                        sort_by_class: bool, seed: int = 0) -> float:
    """Accuracy of ``model`` when every BN normalises with the statistics of the test batch
    it is given (:func:`bnlib.inference.batch_statistics`), the batches being either a
    random partition of ``split`` or class-sorted blocks like the training batches.

    Class-sorted test batches need the test *labels* to form the batches: this is a
    diagnostic of what the network learned, never a legitimate way to evaluate it.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be ≥ 2, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    if sort_by_class:
        idx = next(iter(class_sorted_batches(split.y.cpu(), shuffle_blocks=False)(
            len(split), min(len(split), batch_size * (len(split) // batch_size)), g)))
        idx = idx.reshape(-1, batch_size) if len(idx) % batch_size == 0 else idx[None]
    else:
        perm = torch.randperm(len(split), generator=g)
        idx = perm[: batch_size * (len(split) // batch_size)].reshape(-1, batch_size)
    dev = split.x.device
    correct = total = 0
    with batch_statistics(model):
        for b in idx:
            b = b.to(dev)
            correct += (model(split.x[b]).argmax(1) == split.y[b]).sum().item()
            total += len(b)
    return correct / total


def _extra_rows(hist: pd.DataFrame, values: dict[str, tuple[float, float]], step: int) -> pd.DataFrame:
    return pd.DataFrame([dict(step=step, split=s, loss=l, accuracy=a, elapsed=math.nan,
                              diverged=bool(hist["diverged"].any()), eval=e)
                         for e, (s, l, a) in values.items()])


def _check_arms(arms: Sequence[str]) -> None:
    if not arms:
        raise ValueError("give at least one arm")
    bad = [a for a in arms if a not in NORMS]
    if bad:
        raise ValueError(f"arms must be among {NORMS}, got {bad}")


# --- experiment 1: batch size ---------------------------------------------------------

@dataclass(frozen=True)
class SmallBatchConfig(Config):
    """BN vs LN vs GN vs none across batch sizes (MLP, bnlib's ``train``).

    Quick: 3×128 ReLU MLP on digits, batch sizes 2, 8, 64, 150 SGD steps, LR
    ``base_lr·√(batch/64)`` times a factor tuned per arm and batch size on validation,
    3 seeds. ``norm_impl="torch"``: torch's BatchNorm1d, the same arithmetic as bnlib's
    (chapter 1) and faster on a CPU. Full: Fashion-MNIST, wider, longer, 5 seeds.
    """

    data: str = "digits"
    arms: tuple[str, ...] = ("batch", "layer", "group", "none")
    batch_sizes: tuple[int, ...] = (2, 8, 64)
    base_lr: float = 0.2
    reference_batch: int = 64
    lr_factors: tuple[float, ...] = (0.5, 2.0)
    steps: int = 150
    depth: int = 3
    width: int = 128
    norm_impl: str = "torch"
    precise_samples: int = 2048

    @classmethod
    def full(cls) -> "SmallBatchConfig":
        return cls(data="fashion_mnist", batch_sizes=(2, 4, 8, 32, 128), width=256,
                   steps=3000, lr_factors=(0.25, 0.5, 1.0, 2.0, 4.0), seeds=(0, 1, 2, 3, 4))


def _small_batch_run(*, seed: int, data: datasets.Dataset, norm: str, batch_size: int,
                     lr_factor: float, cfg: SmallBatchConfig) -> pd.DataFrame:
    lr = cfg.base_lr * math.sqrt(batch_size / cfg.reference_batch) * lr_factor
    net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, depth=cfg.depth,
                                   width=cfg.width, norm=norm, norm_impl=cfg.norm_impl))
    hist = train(net, data, steps=cfg.steps, lr=lr, batch_size=batch_size, seed=seed,
                 eval_every=cfg.steps, eval_splits=("val", "test"), device=cfg.device,
                 show_progress=False)
    hist["eval"] = "running"
    data = data.to(next(net.parameters()).device)   # train() moved the model (e.g. to CUDA)
    if norm == "batch" and not hist["diverged"].any():
        # the function as trained: each test batch of `batch_size` normalised by itself
        extra = {"batch stats": ("test", math.nan, evaluate_in_batches(
            net, data.test, batch_size=batch_size, sort_by_class=False, seed=seed))}
        recompute_batchnorm_stats(net, data.train.x, max_samples=cfg.precise_samples)
        for s in ("val", "test"):
            extra[f"precise {s}"] = (s, *evaluate(net, data.split(s)))
        rows = _extra_rows(hist, extra, cfg.steps)
        rows["eval"] = [k.split(" ")[0] if k.startswith("precise") else k for k in extra]
        hist = pd.concat([hist, rows], ignore_index=True)
    hist["lr"] = lr
    return hist


@register("small_batches", SmallBatchConfig, title="BN, LN, GN and no norm across batch sizes",
          chapter="16_when_it_hurts", plot=lambda df: plot_small_batches(df))
def small_batches(cfg: SmallBatchConfig) -> pd.DataFrame:
    """Histories of every arm × batch size × LR factor × seed.

    Columns: those of :func:`bnlib.train.train` plus ``eval`` and ``lr``, ``arm,
    batch_size, lr_factor, seed``. ``eval`` is ``"running"`` (eval mode, running
    statistics) for every run; BN runs add rows at the last step for ``"precise"``
    (statistics recomputed over the training set, val and test) and ``"batch stats"``
    (test accuracy when each test batch of the training batch size is normalised with
    its own statistics: the function the optimiser actually trained).
    """
    _check_arms(cfg.arms)
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 2:
        raise ValueError(f"batch sizes must be ≥ 2, got {cfg.batch_sizes}")
    if not cfg.lr_factors or any(not (f > 0 and math.isfinite(f)) for f in cfg.lr_factors):
        raise ValueError(f"lr_factors must be positive, got {cfg.lr_factors}")
    ds = datasets.load(cfg.data)
    return sweep(_small_batch_run, seeds=cfg.seeds, arms={a: {"norm": a} for a in cfg.arms},
                 grid={"batch_size": list(cfg.batch_sizes), "lr_factor": list(cfg.lr_factors)},
                 common=dict(data=ds, cfg=cfg), desc="small_batches")


# --- experiment 2: class-sorted batches -----------------------------------------------

@dataclass(frozen=True)
class NonIIDConfig(Config):
    """Shuffled vs class-sorted batches for each normaliser (MLP, batch 32).

    Quick: BN, LayerNorm and no norm (GroupNorm behaves like LayerNorm here and is left to
    the full preset to save time), 3×128 MLP on digits, 200 SGD steps at LR 0.1, 3 seeds.

    The learning rate ``lr`` is the same for both samplers of an arm: the comparison that
    matters is each arm against itself, with the same seeds, batch size and step budget.
    Full: Fashion-MNIST, wider, longer, 5 seeds.
    """

    data: str = "digits"
    arms: tuple[str, ...] = ("batch", "layer", "none")
    samplers: tuple[str, ...] = ("shuffled", "class-sorted")
    batch_size: int = 32
    lr: float = 0.1
    steps: int = 200
    depth: int = 3
    width: int = 128
    norm_impl: str = "torch"
    precise_samples: int = 2048

    @classmethod
    def full(cls) -> "NonIIDConfig":
        return cls(data="fashion_mnist", arms=("batch", "layer", "group", "none"), width=256,
                   steps=3000, batch_size=64, seeds=(0, 1, 2, 3, 4))


def _non_iid_run(*, seed: int, data: datasets.Dataset, norm: str, sampler: str,
                 cfg: NonIIDConfig) -> pd.DataFrame:
    if sampler not in ("shuffled", "class-sorted"):
        raise ValueError(f"sampler must be 'shuffled' or 'class-sorted', got {sampler!r}")
    net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, depth=cfg.depth,
                                   width=cfg.width, norm=norm, norm_impl=cfg.norm_impl))
    hist = train(net, data, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                 eval_every=cfg.steps, eval_splits=("val", "test"), device=cfg.device,
                 show_progress=False,
                 sampler=class_sorted_batches(data.train.y) if sampler == "class-sorted" else None)
    hist["eval"] = "running"
    data = data.to(next(net.parameters()).device)   # train() moved the model (e.g. to CUDA)
    if norm == "batch" and not hist["diverged"].any():
        extra = {}
        for name, sort in (("batch stats", False), ("batch stats, class-sorted", True)):
            acc = evaluate_in_batches(net, data.test, batch_size=cfg.batch_size,
                                      sort_by_class=sort, seed=seed)
            extra[name] = ("test", math.nan, acc)
        recompute_batchnorm_stats(net, data.train.x, max_samples=cfg.precise_samples)
        extra["precise"] = ("test", *evaluate(net, data.test))
        rows = _extra_rows(hist, extra, cfg.steps)
        rows["eval"] = list(extra)
        hist = pd.concat([hist, rows], ignore_index=True)
    return hist


@register("non_iid_batches", NonIIDConfig, title="Shuffled vs class-sorted batches",
          chapter="16_when_it_hurts", plot=lambda df: plot_non_iid(df))
def non_iid_batches(cfg: NonIIDConfig) -> pd.DataFrame:
    """Histories of every normaliser × sampler × seed (arm = normaliser; column
    ``sampler``), with BN's extra evaluations as rows tagged by ``eval``."""
    _check_arms(cfg.arms)
    bad = [s for s in cfg.samplers if s not in ("shuffled", "class-sorted")]
    if bad or not cfg.samplers:
        raise ValueError(f"samplers must be among ('shuffled', 'class-sorted'), got {cfg.samplers}")
    if cfg.batch_size < 2:
        raise ValueError(f"batch_size must be ≥ 2, got {cfg.batch_size}")
    ds = datasets.load(cfg.data)
    return sweep(_non_iid_run, seeds=cfg.seeds, arms={a: {"norm": a} for a in cfg.arms},
                 grid={"sampler": list(cfg.samplers)}, common=dict(data=ds, cfg=cfg),
                 desc="non_iid_batches")


# --- read-outs --------------------------------------------------------------------------

def run_table(df: pd.DataFrame, keys: Sequence[str] = ("arm", "batch_size", "lr_factor", "seed")
              ) -> pd.DataFrame:
    """One row per (run, eval): final ``val_acc``, ``test_acc``, ``test_loss`` and
    ``diverged`` (a diverged run's accuracies count as 0)."""
    keys = [k for k in keys if k in df.columns]
    need = {"step", "split", "accuracy", "loss", "eval", "diverged"}
    if not need <= set(df.columns) or not keys:
        raise ValueError(f"not a chapter-16 result: need columns {sorted(need)} and some of {keys}")
    rows = []
    for key, run in df.groupby(keys + ["eval"], sort=False):
        div = bool(run["diverged"].any())
        last = run[run["step"] == run["step"].max()]
        get = lambda s, m: (last[last["split"] == s][m].iloc[-1]  # noqa: E731
                            if (last["split"] == s).any() else math.nan)
        row = dict(zip(keys + ["eval"], key))
        row.update(val_acc=0.0 if div else get("val", "accuracy"),
                   test_acc=0.0 if div else get("test", "accuracy"),
                   test_loss=math.inf if div else get("test", "loss"),
                   diverged=div)
        rows.append(row)
    return pd.DataFrame(rows)


def best_runs(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`run_table` restricted to each (arm, batch size)'s best ``lr_factor``, chosen
    on the mean *validation* accuracy of the running-statistics evaluation (never test)."""
    hist = df[df["eval"] == "running"]
    best = tune_lr(hist, by=("arm", "batch_size"), lr="lr_factor")[["arm", "batch_size", "lr_factor"]]
    return run_table(df).merge(best, on=["arm", "batch_size", "lr_factor"], how="inner")


def _label(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out["normaliser"] = out["arm"].map(ARM_LABELS).fillna(out["arm"])
    return out


def plot_small_batches(df: pd.DataFrame, ax=None):
    """Test accuracy (mean ± sd over seeds, each arm at its tuned LR) against batch size;
    BN with precise statistics dashed."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    ax = ax or plt.gca()
    t = _label(best_runs(df))
    t = t[t["eval"].isin(["running", "precise"])]
    t.loc[t["eval"] == "precise", "normaliser"] = "BatchNorm, precise stats"
    order = [v for v in list(ARM_LABELS.values()) + ["BatchNorm, precise stats"] if v in set(t["normaliser"])]
    sns.lineplot(data=t, x="batch_size", y="test_acc", hue="normaliser", hue_order=order,
                 style="eval", style_order=["running", "precise"], marker="o",
                 errorbar=("sd", 1), ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(t["batch_size"].unique()))
    ax.set_xticklabels([str(b) for b in sorted(t["batch_size"].unique())])
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (eval mode)")
    ax.set_title("Accuracy against batch size")
    return ax


def plot_non_iid(df: pd.DataFrame, ax=None):
    """Test accuracy of each normaliser with shuffled vs class-sorted batches (bars: mean,
    ticks: ± sd over seeds)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    ax = ax or plt.gca()
    t = _label(run_table(df, keys=("arm", "sampler", "seed")))
    t = t[t["eval"] == "running"]
    sns.barplot(data=t, x="normaliser", y="test_acc", hue="sampler", errorbar=("sd", 1),
                order=[v for v in ARM_LABELS.values() if v in set(t["normaliser"])], ax=ax)
    ax.set_ylabel("test accuracy (eval mode)")
    ax.set_xlabel("")
    ax.set_ylim(0, 1)
    ax.set_title("Shuffled vs class-sorted batches")
    return ax
