"""Chapter 19: batch norm's alternatives on a small 1-D CNN, at a small and a large batch.

Every arm is one normaliser at one batch size, on the protocol (:mod:`bnlib.protocol`): a
:class:`NormCNNSpec` (bnlib's :class:`~bnlib.models.CNNSpec`, the normaliser after every conv)
trained by :func:`bnlib.train.fit` on MNIST-1D. The normalisers are ``none``, ``batch``,
``ghost`` (ghost batches of ``ghost_size``), ``renorm`` (Batch Renorm), ``group`` (GroupNorm),
``layer`` (GroupNorm with one group: LayerNorm over channels and positions, the GroupNorm
paper's LN for conv nets), ``ws+group`` (weight-standardised convs + GroupNorm) and
``skipinit`` (no normaliser; every block after the first residual, ``x + α·block(x)``,
α = 0 at init).

Protocol: every run takes the same number of SGD steps (momentum 0.9), so a larger batch
sees more examples. The learning rate is tuned per arm, i.e. per (normaliser, batch size),
on the validation split with tuning seeds disjoint from the reported ones, on a grid that
scales linearly with the batch size (:func:`lr_grid`); a choice at the grid's edge raises
:class:`bnlib.analysis.GridEdgeError`. Batch Renorm's schedule is in fractions of the run:
plain BN for ``renorm_warmup`` of the steps, then r_max → 3 and d_max → 5 over ``renorm_ramp``.

Measured per reported run: test accuracy in eval mode and, on ``gap_examples`` test
examples, in eval mode and in train mode (batch statistics of test batches of the training
size): their gap is the train/eval discrepancy. :func:`normaliser_step_time` times one
training step per normaliser, interleaved, in CPU time.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn

from .. import analysis
from ..config import override
from ..data import Dataset, Split
from ..models import CNNSpec, Net
from ..norms import SkipInit, WSConv1d, WSConv2d
from ..optim import SGD
from ..protocol import Protocol, Tuning, load_data, runs, trained
from ..train import TrainSpec
from . import Config, register

__all__ = ["ARMS", "NormCNNSpec", "NormalisersConfig", "StepTimeConfig", "lr_grid",
           "mode_accuracies", "normalisers_batch_size", "normaliser_step_time", "plot"]

ARMS = ("none", "batch", "ghost", "renorm", "group", "layer", "ws+group", "skipinit")


@dataclass(frozen=True)
class NormCNNSpec(CNNSpec):
    """:class:`~bnlib.models.CNNSpec` with ``norm`` one of :data:`ARMS`: the layers come from
    :func:`~bnlib.models.make_norm`; ``ws+group`` also standardises the convs' weights
    (:class:`~bnlib.norms.WSConv1d`, same initial weights) and ``skipinit`` wraps every block
    after the first in :class:`~bnlib.norms.SkipInit`. Constant width and no pooling
    (``pool_every=0``), so every block after the first can be residual."""

    kind: ClassVar[str] = "normaliser cnn"
    channels: tuple[int, ...] = (16, 16)
    pool_every: int = 0
    ghost_size: int = 8                          # examples per ghost batch
    renorm_steps: tuple[int, int] = (0, 0)       # Batch Renorm's (warm-up, ramp) in steps

    def build(self, seed: int, data: Dataset) -> Net:
        """The network, initialised right after ``torch.manual_seed(seed)``: arms that share
        a seed start from the same weights."""
        if self.norm not in ARMS:
            raise ValueError(f"unknown normaliser {self.norm!r}: choose from {list(ARMS)}")
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(CNNSpec)}
        base["norm"] = {"ws+group": "group", "skipinit": "none"}.get(self.norm, self.norm)
        net = CNNSpec(**base).build(seed, data)
        ws = WSConv1d if len(data.input_shape) == 2 else WSConv2d
        for block in net.blocks:
            if self.norm == "ghost":
                block.norm.virtual_batch_size = self.ghost_size
            if self.norm == "renorm":
                block.norm.warmup_steps, block.norm.ramp_steps = self.renorm_steps
            if self.norm == "ws+group":
                conv = block.layer
                block.layer = ws(conv.in_channels, conv.out_channels, conv.kernel_size,
                                 padding=conv.padding, bias=conv.bias is not None)
                block.layer.load_state_dict(conv.state_dict())
        if self.norm == "skipinit":
            net.blocks = nn.ModuleList([net.blocks[0], *map(SkipInit, net.blocks[1:])])
        return net


def _grids() -> dict[str, tuple[float, ...]]:
    # three rates per arm around the best of a pilot on tuning seeds 1000-1001 (never a
    # reported seed) over 0.003-1.0: GroupNorm wanted ~3× lower rates than BN at batch 8 and
    # ~3× higher at batch 64
    return {"batch @8": (0.03, 0.1, 0.3), "batch @64": (0.1, 0.3, 1.0),
            "group @8": (0.01, 0.03, 0.1), "group @64": (0.3, 1.0, 3.0),
            "renorm @8": (0.1, 0.3, 1.0)}


@dataclass(frozen=True)
class NormalisersConfig(Protocol):
    """Normalisers at a small and a large batch on MNIST-1D, the learning rate tuned per arm."""

    data: str = "mnist1d"             # offline-generated 1-D signals: small, fast 1-D convs
    preprocessing: str = "standardized"
    model: NormCNNSpec = NormCNNSpec()
    # SGD + momentum, one short budget for every arm (the time budget: ≤ 45 s of CPU for the
    # whole chapter); evaluated at the end only
    train: TrainSpec = TrainSpec(momentum=0.9, steps=60, eval_every=60, eval_splits=("val", "test"))
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)  # built: norms × batch sizes
    norms: tuple[str, ...] = ("batch", "renorm", "group")
    batch_sizes: tuple[int, ...] = (8, 64)
    # the normalisers trained at every batch size; the others at the first batch size only
    # (ghost BN never at a batch ≤ its ghost size, where it is BN)
    every_batch: tuple[str, ...] = ("batch", "group")
    seeds: tuple[int, ...] = tuple(range(8))   # 8 paired seeds for every reported comparison
    # three rates per arm, one tuning seed (time budget); ``grids`` overrides the grid per arm
    tuning: Tuning = Tuning(grid=(0.03, 0.1, 0.3), seeds=(1000,))
    grids: dict[str, tuple[float, ...]] = field(default_factory=_grids)
    renorm_warmup: float = 0.1        # fractions of each run's steps
    renorm_ramp: float = 0.4
    gap_examples: int = 256           # test examples for the eval-mode vs train-mode gap
    margin: float = 0.02              # test-accuracy difference that matters, declared up front

    FULL = {"batch_sizes": (2, 4, 8, 16, 32, 64, 128), "norms": ARMS,
            "every_batch": ARMS, "train.steps": 3000, "train.eval_every": 3000,
            "model.channels": (32, 32, 32, 32), "gap_examples": 1024,
            "tuning.grid": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
            "tuning.seeds": (1000, 1001), "grids": {}}


def lr_grid(cfg: NormalisersConfig, arm: str) -> tuple[float, ...]:
    """The learning rates tried for ``arm``: ``cfg.grids[arm]``, else ``cfg.tuning.grid``."""
    return tuple(cfg.grids.get(arm, cfg.tuning.grid))


def _cells(cfg: NormalisersConfig) -> dict[str, tuple[str, int]]:
    """Arm name (``"batch @8"``) → (normaliser, batch size)."""
    cells = {}
    for b in cfg.batch_sizes:
        for norm in cfg.norms:
            first = b == cfg.batch_sizes[0]
            if (norm in cfg.every_batch or first) and not (norm == "ghost" and b <= cfg.model.ghost_size):
                cells[f"{norm} @{b}"] = (norm, b)
    return cells


@torch.no_grad()
def mode_accuracies(model: nn.Module, split: Split, batch_size: int) -> tuple[float, float]:
    """Accuracy on ``split`` in eval mode (running statistics) and in train mode (each batch
    of ``batch_size`` examples normalised with its own statistics; on a copy, so the running
    statistics of ``model`` are untouched). A ragged last batch is dropped from both, so the
    two numbers are over the same examples."""
    n = len(split) - len(split) % batch_size
    x, y = split.x[:n], split.y[:n]
    m = copy.deepcopy(model)
    eval_acc = (m.eval()(x).argmax(1) == y).float().mean().item()
    m.train()
    correct = sum((m(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, n, batch_size))
    return eval_acc, correct / n


def plot(df: pd.DataFrame):
    """Test accuracy (mean ± sd over the reported seeds, eval mode, tuned rate) against the
    batch size, one line per normaliser."""
    from .. import plots
    f = finals(df)
    fig, axes = plots.new_axes(1, width=6.5)
    ax = axes[0][0]
    for norm, g in f.groupby("norm", sort=False):
        s = g.groupby("batch_size")["test_acc"].agg(["mean", "std"])
        ax.errorbar(s.index, s["mean"], yerr=s["std"], marker="o", capsize=3, label=norm,
                    color=plots.color(norm))
    ax.set_xscale("log", base=2)
    sizes = sorted(f["batch_size"].unique())
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set(xlabel="batch size", ylabel="test accuracy (eval mode, tuned rate)")
    ax.legend(fontsize=8)
    return fig


def finals(df: pd.DataFrame) -> pd.DataFrame:
    """The reported runs: one row per (arm, seed)."""
    return df[df["kind"] == "final"].dropna(axis=1, how="all").reset_index(drop=True)


@register("normalisers_batch_size", NormalisersConfig, chapter="19_normalisers", plot=plot,
          title="Normalisers at a small and a large batch (MNIST-1D, small 1-D CNNs)")
def normalisers_batch_size(cfg: NormalisersConfig) -> pd.DataFrame:
    """Per arm (normaliser @ batch size): the tuning runs (``kind="tuning"``, histories with an
    ``lr`` column) and one row per reported seed at the chosen rate (``kind="final"``):
    ``norm, batch_size, lr, test_acc`` (eval mode, whole test split), ``gap_acc_eval_mode`` /
    ``gap_acc_train_mode`` (the first ``gap_examples`` test examples in batches of the training
    size), ``diverged``. Raises :class:`~bnlib.analysis.GridEdgeError` on an edge choice."""
    unknown = [a for a in cfg.norms if a not in ARMS]
    if unknown or min(cfg.batch_sizes) < 2:
        raise ValueError(f"norms must be among {list(ARMS)} (got {unknown}) and batch sizes ≥ 2")
    steps = cfg.train.steps
    cfg = override(cfg, {"model.renorm_steps": (round(cfg.renorm_warmup * steps),
                                                round(cfg.renorm_ramp * steps))})
    cells = _cells(cfg)
    cfg = dataclasses.replace(cfg, arms={a: {"model.norm": n, "train.batch_size": b}
                                         for a, (n, b) in cells.items()})
    t = cfg.tuning
    tune_cfg = override(cfg, {"train.eval_splits": ("val",)})   # tuning reads val, reports test
    tuning = pd.concat([runs(tune_cfg, seeds=t.seeds, grid={"train.lr": lr_grid(cfg, a)}, arms=[a])
                        for a in cells], ignore_index=True).assign(kind="tuning")
    choice = analysis.tune(tuning, param="lr", by=("arm",), seeds=t.seeds, report_seeds=cfg.seeds,
                           allow_edge=t.allow_edge)
    rows = []
    for arm, lr in zip(choice["arm"], choice["lr"]):
        norm, b = cells[arm]
        report = override(cfg, {"train.lr": float(lr), "train.eval_splits": ("test",)})
        for _, seed, h, net, data in trained(report, arms=[arm]):
            last = h[h["step"] == h["step"].max()].set_index("split")["accuracy"]
            diverged = bool(h["diverged"].any())
            sub = Split(data.test.x[:cfg.gap_examples], data.test.y[:cfg.gap_examples])
            gap = mode_accuracies(net, sub, b) if not diverged else (float("nan"),) * 2
            rows.append(dict(arm=arm, norm=norm, batch_size=b, seed=seed, lr=float(lr),
                             test_acc=float(last.get("test", float("nan"))), diverged=diverged,
                             gap_acc_eval_mode=gap[0], gap_acc_train_mode=gap[1]))
    return pd.concat([tuning, pd.DataFrame(rows).assign(kind="final")], ignore_index=True)


# --- time per step ------------------------------------------------------------------------

@dataclass(frozen=True)
class StepTimeConfig(Config):
    """CPU time of one training step (forward, backward, SGD) per normaliser, interleaved."""

    norms: tuple[str, ...] = ARMS
    model: NormCNNSpec = NormCNNSpec()
    batch_size: int = 32
    repeats: int = 15

    FULL = {"repeats": 50, "model.channels": (32, 32, 32, 32)}


@register("normaliser_step_time", StepTimeConfig, chapter="19_normalisers",
          title="Time per training step of each normaliser")
def normaliser_step_time(cfg: StepTimeConfig) -> pd.DataFrame:
    """One row per (arm, repeat): ``seconds`` of CPU time for one step on a batch of MNIST-1D;
    each repeat runs the arms in a fresh seeded random order, so a slow spell hits all alike.
    Take medians."""
    data = cfg.model.inputs(load_data(NormalisersConfig()))
    x, y = data.train.x[:cfg.batch_size], data.train.y[:cfg.batch_size]
    steps = {}
    for norm in cfg.norms:
        net = dataclasses.replace(cfg.model, norm=norm).build(0, data).train()
        opt = SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def step(net=net, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        steps[norm] = step
    rng = random.Random(0)
    rows = []
    for r in range(-2, cfg.repeats):                      # two untimed warm-up rounds
        order = list(steps)
        rng.shuffle(order)
        for norm in order:
            t0 = time.process_time()
            steps[norm]()
            if r >= 0:
                rows.append(dict(arm=norm, repeat=r, seconds=time.process_time() - t0))
    return pd.DataFrame(rows)
