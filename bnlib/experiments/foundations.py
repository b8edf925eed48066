"""Part I, Foundations (chapters 1-3): what batch norm computes, its backward pass, and
what changes between training and inference.

Two registered experiments:

* ``backward_timing`` (chapter 2): the node-by-node backward of
  :func:`bnlib.reference.batchnorm_backward_naive` against the closed form
  :func:`bnlib.reference.batchnorm_backward`, in NumPy, timed with the book's harness
  (:func:`bnlib.timing.time_interleaved`: CPU time, a fresh random order every repeat).
* ``inference_statistics`` (chapter 3): train a BN MLP in a few regimes (the arms: a long
  run, a short large-batch run, a slow Keras-style moving average), then evaluate the *same
  weights* with the running (EMA) statistics, with precise-BN statistics recomputed exactly
  on N training samples, and with the statistics of each test batch
  (:func:`bnlib.inference.evaluate`). A probe (:class:`EMATracker`) records how far the
  running statistics are from those of the whole training set as training goes on.

And chapter 1's small measurements of what the transform does to distributions. The
gradient checks and memory of chapter 2 live in :mod:`bnlib.reference`; the moving averages
and their error in :mod:`bnlib.inference`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .. import cache
from .. import data as datasets
from ..inference import evaluate, recompute_batchnorm_stats, statistics_error
from ..models import MLPSpec
from ..probes import Probe, SetBNMomentum
from ..protocol import Protocol, arm_config, load_data
from ..reference import BACKWARDS, random_problem
from ..timing import paired_ratio, time_interleaved
from ..train import StepInfo, TrainSpec, fit
from . import Config, register

# --- chapter 2: timing the backward passes ------------------------------------------------

@dataclass(frozen=True)
class BackwardTimingConfig(Config):
    """Batch shapes ``(N, D)`` to time, each with both backward implementations."""

    seeds: tuple[int, ...] = (0,)     # one random problem per shape; the repeats give the spread
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (256, 256), (1024, 256), (4096, 256))  # in cache to past L2
    repeats: int = 15                 # interleaved repeats: medians and quartiles over them
    number: int = 3                   # calls per timed repeat (the smallest shape takes ~0.1 ms)

    FULL = {"sizes": ((64, 64), (256, 256), (1024, 256), (4096, 256), (4096, 1024),
                      (16384, 1024), (65536, 512)), "repeats": 31, "number": 10}


def timing_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Per shape, the paired speed-up naive / closed form (:func:`bnlib.timing.paired_ratio`:
    the median over repeats of the ratio of the two timings taken in the same repeat, and
    its quartiles). Columns ``n, d, entries, median, q25, q75, repeats``."""
    out = []
    for (n, d), g in df.groupby(["n", "d"], sort=True):
        r = paired_ratio(g, "naive", "closed form", name="impl")
        out.append(dict(n=n, d=d, entries=n * d, median=r["median"], q25=r["q25"], q75=r["q75"],
                        repeats=r["n"]))
    return pd.DataFrame(out)


def plot_backward_timing(df: pd.DataFrame, axes=None):
    """Left: median ms per call against N·D per implementation (bars: interquartile range over
    repeats). Right: the paired speed-up naive / closed form per shape (median and IQR)."""
    from .. import plots
    ax, ax2 = plots.new_axes(2, width=5.5)[1][0] if axes is None else axes
    df = df.assign(entries=df["n"] * df["d"])
    for impl, g in df.groupby("impl", sort=False):
        q = g.groupby("entries")["seconds"].quantile([0.25, 0.5, 0.75]).unstack()
        ax.errorbar(q.index, q[0.5] * 1e3, yerr=[(q[0.5] - q[0.25]) * 1e3, (q[0.75] - q[0.5]) * 1e3],
                    marker="o", capsize=3, label=impl)
    ax.set(xscale="log", yscale="log", xlabel="entries in the batch (N·D)",
           ylabel="ms per backward call (median)", title="NumPy batch-norm backward")
    ax.legend()
    sp = timing_speedups(df)
    ax2.errorbar(sp["entries"], sp["median"], yerr=[sp["median"] - sp["q25"], sp["q75"] - sp["median"]],
                 marker="o", capsize=3, color="black")
    ax2.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax2.set(xscale="log", xlabel="entries in the batch (N·D)", ylabel="naive time / closed-form time",
            title="Speed-up of the closed form")
    return axes


@register("backward_timing", BackwardTimingConfig,
          title="Batch-norm backward: naive graph walk vs closed form (NumPy)",
          chapter="02_backward_pass", plot=plot_backward_timing)
def backward_timing(cfg: BackwardTimingConfig) -> pd.DataFrame:
    """CPU seconds per backward call of each implementation, one row per (shape, impl, repeat),
    timed by :func:`bnlib.timing.time_interleaved`.

    Columns ``n, d, impl, repeat, seconds`` and ``max_abs_diff``, the largest difference
    between the two implementations' ``dx`` on that shape (they must agree). NumPy only:
    ``cfg.device`` is ignored.
    """
    if cfg.repeats < 1 or cfg.number < 1:
        raise ValueError("repeats and number must be ≥ 1")
    if not cfg.sizes:
        raise ValueError("give at least one (N, D) size")
    seed = cfg.seeds[0] if cfg.seeds else 0
    frames = []
    for n, d in cfg.sizes:
        dout, cache = random_problem(n, d, seed)
        diff = float(np.abs(BACKWARDS["naive"](dout, cache)[0]
                            - BACKWARDS["closed form"](dout, cache)[0]).max())
        fns = {name: (lambda fn=fn: fn(dout, cache)) for name, fn in BACKWARDS.items()}
        t = time_interleaved(fns, repeats=cfg.repeats, number=cfg.number, warmup=2, seed=seed,
                             device="cpu")
        frames.append(t.rename(columns={"name": "impl"}).assign(n=n, d=d, max_abs_diff=diff))
    return pd.concat(frames, ignore_index=True)[["n", "d", "impl", "repeat", "seconds", "max_abs_diff"]]


# --- chapter 1: what the transform does to distributions -------------------------------------

def feature_distributions(data: str = "digits", *, pixel_ranks: Sequence[int] = (0, 15, 30, 40),
                          units: Sequence[int] = (0, 1, 2, 3), batch_size: int = 256, width: int = 32,
                          seed: int = 0) -> pd.DataFrame:
    """Values of a few features of one training batch, before and after batch norm.

    Two sources: ``"input pixels"``, the raw (unscaled) inputs of ``data``, picked by their
    rank in variance on this batch (``pixel_ranks``; rank 0 is the most variable pixel, so
    small ranks are never constant); and ``"hidden pre-activations"``, units ``units`` of
    a freshly initialised ``Linear(in, width)`` (Kaiming-normal weights, a bias drawn from
    N(0, 1) per unit so that units also differ in mean) applied to those raw inputs.
    Batch norm is :class:`bnlib.nn.BatchNorm1d` in training mode with γ = 1, β = 0.

    Returns columns ``source, feature, stage ("before BN" | "after BN"), value``.
    """
    from ..nn import BatchNorm1d
    if batch_size < 2:
        raise ValueError("batch_size must be at least 2")
    ds = datasets.load(data, preprocessing="raw")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.train), generator=g)[:batch_size]
    x = ds.train.x[idx].flatten(1)
    pixel_ranks, units = list(pixel_ranks), list(units)
    if not pixel_ranks or min(pixel_ranks) < 0 or max(pixel_ranks) >= x.shape[1]:
        raise ValueError(f"pixel_ranks must be in [0, {x.shape[1]}), got {pixel_ranks}")
    if not units or min(units) < 0 or max(units) >= width:
        raise ValueError(f"units must be in [0, {width}), got {units}")
    order = torch.argsort(x.var(0), descending=True)[pixel_ranks]
    torch.manual_seed(seed)
    layer = nn.Linear(x.shape[1], width)
    nn.init.kaiming_normal_(layer.weight)
    nn.init.normal_(layer.bias)
    with torch.no_grad():
        sources = {"input pixels": (x[:, order], [f"pixel {int(i)}" for i in order]),
                   "hidden pre-activations": (layer(x)[:, units], [f"unit {u}" for u in units])}
    rows = []
    for source, (h, names) in sources.items():
        bn = BatchNorm1d(h.shape[1]).train()
        with torch.no_grad():
            after = bn(h)
        for stage, values in (("before BN", h), ("after BN", after)):
            for j, name in enumerate(names):
                rows += [dict(source=source, feature=name, stage=stage, value=float(v))
                         for v in values[:, j]]
    return pd.DataFrame(rows)


def sigmoid_linear_r2(std: float = 1.0, mean: float = 0.0, n: int = 100_000, seed: int = 0) -> float:
    """R² of the best straight-line fit of ``sigmoid(z)`` on ``z ~ N(mean, std²)``.

    Near 1: the sigmoid is used in its almost-linear middle (what normalised inputs with
    γ = 1, β = 0 give); a learned γ, β can move the inputs into its curved part.
    """
    if not (std > 0 and math.isfinite(std) and math.isfinite(mean)):
        raise ValueError(f"std must be positive and finite and mean finite, got std={std}, mean={mean}")
    if n < 3:
        raise ValueError("n must be at least 3")
    z = np.random.default_rng(seed).normal(mean, std, n)
    y = 1.0 / (1.0 + np.exp(-z))
    return float(np.corrcoef(z, y)[0, 1] ** 2)


# --- chapter 3: running statistics and inference --------------------------------------------

def _precise(model: nn.Module, x: Tensor, samples: int | None, batch_size: int) -> nn.Module:
    """A copy of ``model`` with exact precise-BN statistics of the first ``samples`` rows of ``x``."""
    return recompute_batchnorm_stats(copy.deepcopy(model), x, batch_size=batch_size, max_samples=samples)


class EMATracker(Probe):
    """Every ``every`` steps, how far the running statistics are from the statistics of the
    whole of ``x`` *for the current weights* (exact precise BN on a copy; the model is not
    touched). Rows ``step, layer, mean_error, var_log_ratio`` (:func:`statistics_error`)."""

    def __init__(self, x: Tensor, *, every: int = 10, batch_size: int = 256) -> None:
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        self.x, self.every, self.batch_size, self.rows = x, every, batch_size, []

    def __call__(self, info: StepInfo) -> None:
        if info.step % self.every == 0:
            ref = _precise(info.model, self.x, None, self.batch_size)
            self.rows += statistics_error(info.model, ref).assign(step=info.step).to_dict("records")


@dataclass(frozen=True)
class InferenceStatsConfig(Protocol):
    """A BN MLP trained in a few regimes (the arms), its weights then evaluated with several
    kinds of statistics. The class defaults are the quick preset."""

    data: str = "mnist5k"             # 3,250 training samples: 256 of them are under 8 % of the split
    model: MLPSpec = MLPSpec(depth=3, width=64, norm="batch")    # BN before each of 3 ReLUs; small for CPU
    train: TrainSpec = TrainSpec(lr=0.1, steps=200, batch_size=64, eval_every=200,
                                 eval_splits=())  # the long run (4 epochs); arms shorten it
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: {  # regimes where the EMA may lag
        "long run": {}, "short run, batch 512": {"train.steps": 15, "train.batch_size": 512, "train.lr": 0.5},
        "slow EMA (m=0.01)": {"train.steps": 100, "bn_momentum": 0.01}})
    bn_momentum: float = 0.1          # PyTorch's default running-average momentum; one arm slows it
    samples: tuple[int, ...] = (64, 256)  # precise-BN subset sizes, besides the whole training split
    precise_batch_size: int = 1024    # chunk size of the forward passes (the pooling is exact anyway)
    test_batch_size: int = 64         # test batches that normalise themselves ("batch stats")
    track_points: int = 6             # how often per run the EMA's error is measured
    track_seeds: int = 2              # ... on the first seeds only (each look is a full pass per layer)
    margin: float = 0.01              # smallest test-accuracy difference that matters (1 pp), fixed in advance

    FULL = {"data": "mnist", "model.width": 512, "track_seeds": 8, "train.steps": 20000,
            "train.eval_every": 20000, "samples": (64, 256, 1024, 4096, 16384), "track_points": 20,
            "arms": {"long run": {},
                     "short run, batch 2048": {"train.steps": 60, "train.batch_size": 2048, "train.lr": 0.5},
                     "slow EMA (m=0.01)": {"train.steps": 300, "bn_momentum": 0.01}}}


def method_order(methods) -> list[str]:
    """The evaluation methods in reading order: EMA, precise BN by sample count, batch stats."""
    present = set(methods)
    precise = sorted((m for m in present if m.startswith("precise (") and m != "precise (all)"),
                     key=lambda m: int(m[9:-1]))
    order = ["EMA", *precise, "precise (all)", "batch stats", "batch stats, class-sorted"]
    return [m for m in order if m in present] + sorted(present - set(order))


def plot_inference_statistics(df: pd.DataFrame, axes=None):
    """Test accuracy of every evaluation method, per regime (mean ± sd over seeds). Left: the
    running statistics, precise BN and shuffled batch statistics; right: batch statistics on
    shuffled vs class-sorted test batches (its own scale)."""
    import seaborn as sns

    from .. import plots
    if axes is None:
        axes = plots.new_axes(2, width=6.0, height=4.2, gridspec_kw={"width_ratios": [2, 1]})[1][0]
    acc = df[df["metric"] == "test_accuracy"]
    order = method_order(acc["method"])
    left = [m for m in order if m != "batch stats, class-sorted"]
    right = [m for m in ("batch stats", "batch stats, class-sorted") if m in order]
    for ax, methods, title in [(axes[0], left, "Same weights, different inference statistics"),
                               (axes[1], right, "Batch statistics: shuffled vs class-sorted")]:
        sns.pointplot(data=acc[acc["method"].isin(methods)], x="value", y="method", hue="regime",
                      order=methods, errorbar=("sd", 1), dodge=0.45, linestyle="none", ax=ax,
                      legend=ax is axes[1])
        ax.set(xlabel="test accuracy (mean ± sd over seeds)", ylabel="", title=title)
    if axes[1].get_legend() is not None:
        sns.move_legend(axes[1], "center right")
    return axes


@register("inference_statistics", InferenceStatsConfig,
          title="Inference statistics: running averages vs precise BN vs batch statistics",
          chapter="03_train_vs_inference", plot=plot_inference_statistics)
def inference_statistics(cfg: InferenceStatsConfig) -> pd.DataFrame:
    """Train the BN MLP per regime (arm) and seed with :func:`bnlib.train.fit`, then evaluate
    the same weights several ways with :func:`bnlib.inference.evaluate`.

    Tidy long format, columns ``regime, seed, step, method, samples, layer, metric, value``:

    * ``metric="test_accuracy"``/``"test_loss"`` (``layer=0``) for ``method`` in ``"EMA"``
      (the running statistics), ``"precise (N)"``/``"precise (all)"`` (statistics recomputed
      exactly on N shuffled training samples; ``samples`` holds N), ``"batch stats"`` (each
      shuffled test batch of ``cfg.test_batch_size`` normalises itself) and ``"batch stats,
      class-sorted"`` (batches cut from the class-sorted test set);
    * ``metric="mean_error"``/``"var_log_ratio"`` per BN ``layer`` (1-based), against exact
      statistics of the whole training split: for ``"EMA"`` during training (:class:`EMATracker`)
      on the first ``cfg.track_seeds`` seeds and at the end of every run, and for every
      ``"precise (N)"`` at the end.
    """
    if not cfg.arms:
        raise ValueError("give at least one training regime (arm)")
    if any(s < 2 for s in cfg.samples):
        raise ValueError(f"precise-BN sample counts must be ≥ 2, got {cfg.samples}")
    data = load_data(cfg)
    n_train = len(data.train)

    def one(seed: int, regime: str) -> list[dict]:
        # the training set in a seeded random order: precise BN takes the first N rows
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
        x = data.train.x[perm]
        rows: list[dict] = []
        acfg = arm_config(cfg, regime)
        steps = acfg.train.steps
        tracker = EMATracker(x, every=max(steps // max(cfg.track_points, 1), 1),
                             batch_size=cfg.precise_batch_size)
        probes = [SetBNMomentum(acfg.bn_momentum)] + ([tracker] if seed in cfg.seeds[:cfg.track_seeds] else [])
        hist = fit(acfg.model, acfg.train, data, seed, callbacks=probes)
        net = hist.attrs["model"].cpu()
        base = dict(regime=regime, seed=seed)

        def add(method, samples, step, layer, metric, value):
            rows.append(dict(base, step=step, method=method, samples=samples, layer=layer,
                             metric=metric, value=float(value)))

        for r in tracker.rows:
            for metric in ("mean_error", "var_log_ratio"):
                add("EMA", math.nan, r["step"], r["layer"], metric, r[metric])
        full = _precise(net, x, None, cfg.precise_batch_size)
        models = {"EMA": (net, math.nan)}
        models.update({f"precise ({s})": (_precise(net, x, s, cfg.precise_batch_size), min(s, n_train))
                       for s in cfg.samples})
        models["precise (all)"] = (full, n_train)
        tracked_end = any(r["step"] == steps for r in tracker.rows)
        for method, (model, samples) in models.items():
            loss, acc = evaluate(model, data.test, statistics="running")
            add(method, samples, steps, 0, "test_accuracy", acc)
            add(method, samples, steps, 0, "test_loss", loss)
            if method != "EMA" or not tracked_end:
                for r in statistics_error(model, full).to_dict("records"):
                    for metric in ("mean_error", "var_log_ratio"):
                        add(method, samples, steps, r["layer"], metric, r[metric])
        for method, order in (("batch stats", "shuffled"), ("batch stats, class-sorted", "class_sorted")):
            loss, acc = evaluate(net, data.test, statistics="batch", batch_size=cfg.test_batch_size,
                                 order=order, seed=seed)
            add(method, math.nan, steps, 0, "test_accuracy", acc)
            add(method, math.nan, steps, 0, "test_loss", loss)
        return rows

    rows = [r for seed in cfg.seeds for regime in cfg.arms
            for r in cache.cell({"inference": cfg, "seed": seed, "regime": regime},
                                lambda: one(seed, regime))]
    return pd.DataFrame(rows)
