"""Chapter 8: is a batch-normalised network less dependent on its initialisation?

Two experiments on the same deep ReLU MLP, with and without BN, at two learning rates
(so a conclusion is never an artefact of one LR that happens to suit one arm):

* ``init_scale``: every weight drawn from Kaiming's normal initialisation times a factor
  ``s`` (0.01× … 10×). Without BN the signal of an L-layer ReLU net is multiplied by about
  ``s^L`` on its way up, so only ``s ≈ 1`` trains; with BN each hidden layer is
  normalised again, so the factor cancels in every hidden layer (Ioffe & Szegedy 2015
  §3.3). It does not cancel in the *effective learning rate*: a weight matrix followed by
  BN learns at ``η/‖W‖²``, so a 10× init learns about 100× more slowly (chapter 7).
* ``init_schemes``: the common named schemes: Kaiming/He, Xavier/Glorot, and a small
  fixed standard deviation (0.01, as in many tutorials).

Read-outs: :func:`run_summary` (one row per run) and :func:`working_range` (which init
scales reach a target accuracy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from .. import data as datasets
from ..models import mlp
from ..stats import steps_to_target
from . import Config, register, sweep
from ._common import train_mlp

__all__ = ["InitScaleConfig", "InitSchemesConfig", "init_scale", "init_schemes", "run_summary",
           "working_range", "tuned", "activation_scale", "scheme_std_ratio", "SCHEMES",
           "plot_init_scale", "plot_schemes"]

#: The named initialisations of ``init_schemes``: label → ``mlp`` keyword arguments.
SCHEMES = {
    "kaiming": {"init": "kaiming"},
    "xavier": {"init": "xavier"},
    "normal(0.01)": {"init": "normal", "init_std": 0.01},
}


@dataclass(frozen=True)
class InitScaleConfig(Config):
    """Kaiming init × ``scales``, with and without BN, at each of ``lrs``.

    Quick: 8×128 ReLU MLP on digits, SGD with momentum 0.9, 120 steps of batch 64,
    3 seeds. ``norm_impl="torch"`` (numerically bnlib's layer, faster on a CPU).
    """

    data: str = "digits"
    depth: int = 8
    width: int = 128
    scales: tuple[float, ...] = (0.01, 0.3, 1.0, 3.0, 10.0)
    lrs: tuple[float, ...] = (0.01, 0.1)
    steps: int = 120
    batch_size: int = 64
    momentum: float = 0.9
    eval_every: int = 10
    norm_impl: str = "torch"

    @classmethod
    def full(cls) -> "InitScaleConfig":
        return cls(data="fashion_mnist", width=256, steps=2000, eval_every=50,
                   scales=(0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 10.0, 30.0),
                   lrs=(0.003, 0.01, 0.03, 0.1, 0.3), seeds=(0, 1, 2, 3, 4))


@dataclass(frozen=True)
class InitSchemesConfig(Config):
    """The named schemes of :data:`SCHEMES`, with and without BN, at each of ``lrs``; or,
    with ``arm_lrs`` (e.g. ``(("plain", 0.01), ("BN", 0.1))``, each arm's LR tuned
    elsewhere on the validation split), every arm at its own learning rate only."""

    data: str = "digits"
    depth: int = 8
    width: int = 128
    schemes: tuple[str, ...] = ("kaiming", "xavier", "normal(0.01)")
    lrs: tuple[float, ...] = (0.01, 0.1)
    arm_lrs: tuple[tuple[str, float], ...] | None = None
    steps: int = 120
    batch_size: int = 64
    momentum: float = 0.9
    eval_every: int = 10
    norm_impl: str = "torch"

    @classmethod
    def full(cls) -> "InitSchemesConfig":
        return cls(data="fashion_mnist", width=256, steps=2000, eval_every=50,
                   lrs=(0.003, 0.01, 0.03, 0.1, 0.3), seeds=(0, 1, 2, 3, 4))


def _check(cfg, grid_name: str, grid: Sequence) -> None:
    if not grid:
        raise ValueError(f"{grid_name} must not be empty")
    if not cfg.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in cfg.lrs):
        raise ValueError(f"lrs must be positive finite numbers, got {cfg.lrs}")


def _arms(cfg) -> dict:
    base = dict(depth=cfg.depth, width=cfg.width, norm_impl=cfg.norm_impl)
    return {"plain": {"norm": "none", **base}, "BN": {"norm": "batch", **base}}


def _run(*, seed: int, data, arm_model: dict, init_model: dict, **train_kwargs) -> pd.DataFrame:
    return train_mlp(seed=seed, data=data, model={**arm_model, **init_model}, **train_kwargs)


def _common(cfg, ds) -> dict:
    return dict(data=ds, steps=cfg.steps, batch_size=cfg.batch_size, momentum=cfg.momentum,
                eval_every=cfg.eval_every, eval_splits=("val", "test"), device=cfg.device,
                show_progress=False)


@register("init_scale", InitScaleConfig, title="Accuracy against the initialisation scale (× Kaiming)",
          chapter="08_initialization", plot=lambda df: plot_init_scale(df))
def init_scale(cfg: InitScaleConfig) -> pd.DataFrame:
    """Histories of every arm × init scale × learning rate × seed (columns of
    :func:`bnlib.train.train` plus ``arm, seed, init_scale, lr``)."""
    _check(cfg, "scales", cfg.scales)
    if any(not (s > 0 and math.isfinite(s)) for s in cfg.scales):
        raise ValueError(f"scales must be positive finite numbers, got {cfg.scales}")
    ds = datasets.load(cfg.data)
    arms = {name: {"arm_model": m} for name, m in _arms(cfg).items()}

    def one(*, init_scale: float, **kw) -> pd.DataFrame:
        return _run(init_model={"init": "kaiming", "init_scale": init_scale}, **kw)

    return sweep(one, seeds=cfg.seeds, arms=arms,
                 grid={"init_scale": list(cfg.scales), "lr": list(cfg.lrs)},
                 common=_common(cfg, ds), desc="init_scale")


@register("init_schemes", InitSchemesConfig, title="Accuracy across initialisation schemes",
          chapter="08_initialization",
          plot=lambda df: plot_schemes(tuned(run_summary(df, by=("arm", "scheme", "lr", "seed")), x="scheme")))
def init_schemes(cfg: InitSchemesConfig) -> pd.DataFrame:
    """Histories of every arm × scheme × learning rate × seed (columns of
    :func:`bnlib.train.train` plus ``arm, seed, scheme, lr``)."""
    _check(cfg, "schemes", cfg.schemes)
    unknown = [s for s in cfg.schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"unknown schemes {unknown}; choose from {list(SCHEMES)}")
    ds = datasets.load(cfg.data)
    arms = {name: {"arm_model": m} for name, m in _arms(cfg).items()}
    grid = {"scheme": list(cfg.schemes), "lr": list(cfg.lrs)}
    if cfg.arm_lrs is not None:
        per_arm = dict(cfg.arm_lrs)
        if set(per_arm) != set(arms) or any(not (lr > 0 and math.isfinite(lr)) for lr in per_arm.values()):
            raise ValueError(f"arm_lrs must give a positive learning rate for each of {sorted(arms)}, "
                             f"got {cfg.arm_lrs}")
        arms = {name: {**a, "lr": per_arm[name]} for name, a in arms.items()}
        del grid["lr"]

    def one(*, scheme: str, **kw) -> pd.DataFrame:
        return _run(init_model=SCHEMES[scheme], **kw)

    df = sweep(one, seeds=cfg.seeds, arms=arms, grid=grid, common=_common(cfg, ds), desc="init_schemes")
    if cfg.arm_lrs is not None:
        df["lr"] = df["arm"].map(dict(cfg.arm_lrs))
    return df


def run_summary(df: pd.DataFrame, *, by: Sequence[str] = ("arm", "init_scale", "lr", "seed"),
                target: float = 0.9) -> pd.DataFrame:
    """One row per run (``by`` names the run): final ``val_acc``/``test_acc`` (a diverged run
    gets 0, never a stale number), ``diverged``, and ``steps_to_target``: the first
    evaluated step with validation accuracy ≥ ``target`` (inf when never)."""
    by = list(by)
    missing = set(by + ["step", "split", "accuracy", "diverged"]) - set(df.columns)
    if missing:
        raise ValueError(f"missing columns {sorted(missing)} (wrong `by` for this result?)")
    if not 0 < target <= 1:
        raise ValueError(f"target must be an accuracy in (0, 1], got {target}")
    rows = []
    for key, run in df.groupby(by, sort=False):
        div = bool(run["diverged"].any())

        def last(split: str) -> float:
            h = run[run["split"] == split]
            return 0.0 if div or h.empty else float(h["accuracy"].iloc[-1])

        rows.append({**dict(zip(by, key)), "diverged": div, "val_acc": last("val"),
                     "test_acc": last("test"), "steps_to_target": steps_to_target(run, target)})
    return pd.DataFrame(rows)


def working_range(summary: pd.DataFrame, *, threshold: float = 0.9, x: str = "init_scale",
                  by: Sequence[str] = ("arm", "lr"), metric: str = "val_acc") -> pd.DataFrame:
    """Per group: the init values whose mean ``metric`` over seeds reaches ``threshold``
    (``ok``, a sorted tuple), how many (``n_ok``) and, for numeric ``x``, the ratio of the
    largest to the smallest (``width``; NaN when none qualifies)."""
    by = list(by)
    mean = summary.groupby(by + [x])[metric].mean().reset_index()
    rows = []
    for key, g in mean.groupby(by):
        key = key if isinstance(key, tuple) else (key,)
        ok = tuple(sorted(g[g[metric] >= threshold][x]))
        numeric = all(isinstance(v, (int, float)) for v in ok)
        width = (max(ok) / min(ok)) if ok and numeric else math.nan
        rows.append({**dict(zip(by, key)), "ok": ok, "n_ok": len(ok), "width": width})
    return pd.DataFrame(rows)


def plot_init_scale(df: pd.DataFrame, axes=None):
    """Final validation accuracy against the init scale, one panel per learning rate."""
    import matplotlib.pyplot as plt

    from .. import plots
    s = run_summary(df)
    lrs = sorted(s["lr"].unique())
    if axes is None:
        _, axes = plots.new_axes(ncols=len(lrs), width=4.6, sharey=True)
        axes = axes[0]
    for ax, lr in zip(axes, lrs):
        plots.sweep(s[s["lr"] == lr], x="init_scale", y="val_acc", ax=ax, title=f"LR = {lr:g}")
        xs = sorted(s["init_scale"].unique())
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("init scale (× Kaiming)")
        ax.set_ylabel("validation accuracy")
    return plt.gcf()


def tuned(summary: pd.DataFrame, *, x: str = "init_scale", metric: str = "val_acc") -> pd.DataFrame:
    """Each arm's learning rate chosen per ``x`` value on the validation split (best mean
    ``metric`` over seeds), and that LR's per-seed rows: a per-arm tuned comparison."""
    mean = summary.groupby(["arm", x, "lr"])[metric].mean().reset_index()
    best = mean.loc[mean.groupby(["arm", x])[metric].idxmax(), ["arm", x, "lr"]]
    return summary.merge(best, on=["arm", x, "lr"])


@torch.no_grad()
def activation_scale(x: torch.Tensor, *, scales: Sequence[float], depth: int = 8, width: int = 128,
                     norms: Sequence[str] = ("none", "batch"), seed: int = 0) -> pd.DataFrame:
    """The standard deviation of every hidden block's output (after the ReLU) and of the
    logits at initialisation, for Kaiming × ``scale`` (train-mode forward, no training).
    One row per (norm, init_scale, layer); layer ``depth + 1`` is the logits."""
    if x.dim() != 2 or len(x) < 2:
        raise ValueError("x must be a batch of at least two flattened examples, shape (N, features)")
    rows = []
    for norm in norms:
        for s in scales:
            torch.manual_seed(seed)
            net = mlp(x.shape[1], 10, depth=depth, width=width, norm=norm, init_scale=s)
            net.train()
            h = x
            for i, block in enumerate(net.blocks, start=1):
                h = block(h)
                rows.append({"norm": norm, "init_scale": s, "layer": i, "std": h.std().item()})
            rows.append({"norm": norm, "init_scale": s, "layer": depth + 1, "std": net.head(h).std().item()})
    return pd.DataFrame(rows)


def scheme_std_ratio(in_features: int, *, width: int = 128, depth: int = 8) -> pd.DataFrame:
    """For each scheme of :data:`SCHEMES`: the weight std of the first and of a hidden
    layer, and the hidden layer's std as a multiple of Kaiming's (a scheme *is* a scale)."""
    rows = []
    kaiming = None
    for name, kw in SCHEMES.items():
        torch.manual_seed(0)
        net = mlp(in_features, 10, depth=depth, width=width, **kw)
        first, hidden = net.blocks[0].layer.weight.std().item(), net.blocks[1].layer.weight.std().item()
        kaiming = hidden if name == "kaiming" else kaiming
        rows.append({"scheme": name, "first_layer_std": first, "hidden_layer_std": hidden})
    out = pd.DataFrame(rows)
    out["hidden_vs_kaiming"] = out["hidden_layer_std"] / kaiming
    return out


def plot_schemes(summary: pd.DataFrame, ax=None, metric: str = "test_acc"):
    """Bars: ``metric`` per scheme and arm (mean ± sd over seeds)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .. import plots
    ax = ax or plt.gca()
    order = [s for s in SCHEMES if s in set(summary["scheme"])]
    arms = [a for a in ("plain", "BN") if a in set(summary["arm"])]
    sns.barplot(data=summary, x="scheme", y=metric, hue="arm", order=order, hue_order=arms,
                palette={a: plots.ARM_COLORS[a] for a in arms}, errorbar=("sd", 1), ax=ax)
    ax.set_ylim(0, 1)
    ax.set_ylabel(metric.replace("_acc", " accuracy"))
    ax.legend(loc="lower left")
    return ax
