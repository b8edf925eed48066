"""Chapter 12: batch norm before or after the activation (claims B1, F4, F7)?

The same small network is trained with ``placement="before"`` (``layer → BN → act``, as in
the BN paper and ResNets) and ``placement="after"`` (``layer → act → BN``, the article's
advice), for several activation functions and learning rates, on the same seeds: for a
given seed both placements start from the same random stream and see the same batches,
so their difference is a *paired* difference.

:func:`placement_differences` gives the paired ``after − before`` difference in test
accuracy with a t confidence interval per (activation, learning rate), and per activation
at each placement's own validation-tuned learning rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from .. import data as datasets
from ..models import ACTIVATIONS
from ..stats import final, paired_difference
from . import Config, register, sweep
from ._common import train_cnn, train_mlp

__all__ = ["PlacementConfig", "placement_sweep", "placement_differences", "tuned_lrs",
           "plot_placement", "saturation"]

PLACEMENTS = ("before", "after")


@dataclass(frozen=True)
class PlacementConfig(Config):
    """BN before vs after the activation: activations × learning rates × paired seeds."""

    dataset: str = "digits"
    n_train: int | None = 500
    architecture: str = "mlp"            # "mlp" or "cnn"
    depth: int = 3                        # MLP hidden layers
    width: int = 64                       # MLP width
    channels: tuple[int, ...] = (16, 32, 64)  # CNN channels
    activations: tuple[str, ...] = ("relu", "tanh", "sigmoid", "gelu")
    lrs: tuple[float, ...] = (0.01, 0.03, 0.3)
    steps: int = 100
    batch_size: int = 32
    momentum: float = 0.9
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    norm_impl: str = "torch"

    @classmethod
    def full(cls) -> "PlacementConfig":
        return cls(dataset="cifar10", n_train=None, architecture="cnn",
                   channels=(64, 128, 256, 256), lrs=(0.01, 0.03, 0.1, 0.3), steps=6000,
                   batch_size=128, seeds=(0, 1, 2, 3, 4))


def _check(cfg: PlacementConfig) -> None:
    bad = [a for a in cfg.activations if a not in ACTIVATIONS]
    if bad or not cfg.activations:
        raise ValueError(f"activations must be a non-empty subset of {list(ACTIVATIONS)}, got {cfg.activations}")
    if cfg.architecture not in ("mlp", "cnn"):
        raise ValueError(f"architecture must be 'mlp' or 'cnn', got {cfg.architecture!r}")
    if not cfg.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in cfg.lrs):
        raise ValueError(f"lrs must be positive finite numbers, got {cfg.lrs}")
    if len(cfg.seeds) < 2:
        raise ValueError(f"a paired confidence interval needs at least 2 seeds, got {cfg.seeds}")


def _one_run(*, seed: int, placement: str, activation: str, lr: float, cfg: PlacementConfig,
             data: datasets.Dataset, chance: float) -> dict:
    """Train one BN net; return its final validation and test accuracy (chance if it diverged)."""
    if cfg.architecture == "mlp":
        model = dict(depth=cfg.depth, width=cfg.width, norm="batch", placement=placement,
                     activation=activation, norm_impl=cfg.norm_impl)
        trainer = train_mlp
    else:
        model = dict(channels=cfg.channels, norm="batch", placement=placement,
                     activation=activation, norm_impl=cfg.norm_impl)
        trainer = train_cnn
    h = trainer(seed=seed, data=data, model=model, steps=cfg.steps, lr=lr, momentum=cfg.momentum,
                batch_size=cfg.batch_size, eval_every=cfg.steps, eval_splits=("val", "test"),
                device=cfg.device)
    return {"val_accuracy": final(h, split="val", diverged_value=chance),
            "test_accuracy": final(h, split="test", diverged_value=chance),
            "diverged": bool(h["diverged"].any())}


@register("placement", PlacementConfig, title="Batch norm before vs after the activation",
          chapter="12_placement", plot=lambda df: plot_placement(df))
def placement_sweep(cfg: PlacementConfig) -> pd.DataFrame:
    """One row per (placement, activation, lr, seed): ``val_accuracy``, ``test_accuracy``
    (a diverged run scores chance) and ``diverged``. Column ``arm`` is the placement."""
    _check(cfg)
    data = datasets.load(cfg.dataset, n_train=cfg.n_train)
    arms = {p: {"placement": p} for p in PLACEMENTS}
    df = sweep(_one_run, seeds=cfg.seeds, arms=arms,
               grid={"activation": list(cfg.activations), "lr": list(cfg.lrs)},
               common={"cfg": cfg, "data": data, "chance": 1.0 / data.num_classes},
               desc="placement")
    return df[["arm", "activation", "lr", "seed", "val_accuracy", "test_accuracy", "diverged"]]


def tuned_lrs(df: pd.DataFrame) -> pd.DataFrame:
    """Each (placement, activation)'s learning rate with the best mean validation accuracy."""
    if df.empty:
        raise ValueError("empty result frame")
    mean = df.groupby(["arm", "activation", "lr"], sort=False)["val_accuracy"].mean().reset_index()
    best = mean.loc[mean.groupby(["arm", "activation"], sort=False)["val_accuracy"].idxmax()]
    return best.reset_index(drop=True)


def placement_differences(df: pd.DataFrame, *, tuned: bool = False, value: str = "test_accuracy",
                          level: float = 0.95) -> pd.DataFrame:
    """Paired ``after − before`` difference of ``value`` (in accuracy units) with a t
    confidence interval, pairing runs on the seed.

    ``tuned=False``: one row per (activation, lr), both placements at that lr.
    ``tuned=True``: one row per activation, each placement at its own validation-tuned lr
    (columns ``lr_before``, ``lr_after``)."""
    if value not in df:
        raise ValueError(f"no column {value!r} in the frame")
    rows = []
    if tuned:
        best = tuned_lrs(df)
        for act, g in df.groupby("activation", sort=False):
            lr = {p: float(best[(best["arm"] == p) & (best["activation"] == act)]["lr"].iloc[0])
                  for p in PLACEMENTS}
            pick = pd.concat([g[(g["arm"] == p) & (g["lr"] == lr[p])] for p in PLACEMENTS])
            d = paired_difference(pick, value, "after", "before", level=level)
            rows.append(dict(activation=act, lr_before=lr["before"], lr_after=lr["after"], **d))
    else:
        for (act, lr), g in df.groupby(["activation", "lr"], sort=False):
            rows.append(dict(activation=act, lr=lr, **paired_difference(g, value, "after", "before",
                                                                          level=level)))
    return pd.DataFrame(rows).drop(columns=["a", "b"])


def plot_placement(df: pd.DataFrame, tuned: bool = False, ax=None, clip: float | None = 8.0):
    """The paired ``after − before`` test-accuracy difference (percentage points) with its
    95% CI, per activation (and learning rate unless ``tuned``).

    The x axis is limited to ±``clip`` pp so differences of a fraction of a point stay
    readable; a difference beyond it is drawn as an arrow at the edge, labelled with its
    value (``clip=None`` shows everything on a linear axis)."""
    import matplotlib.pyplot as plt
    import numpy as np
    ax = ax or plt.gca()
    d = placement_differences(df, tuned=tuned)
    for c in ("mean", "ci_low", "ci_high"):
        d[c] = 100 * d[c]
    acts = list(dict.fromkeys(d["activation"]))
    if tuned:
        series = [(None, d.set_index("activation").loc[acts], np.arange(len(acts)), None)]
    else:
        lrs = sorted(d["lr"].unique())
        offsets = np.linspace(-0.25, 0.25, len(lrs))
        series = [(f"lr {lr:g}", d[d["lr"] == lr].set_index("activation").loc[acts],
                   np.arange(len(acts)) + off, f"C{i}") for i, (off, lr) in enumerate(zip(offsets, lrs))]
    for label, s, y, color in series:
        color = color or "C0"
        inside = s["mean"].abs() <= clip if clip is not None else np.ones(len(s), dtype=bool)
        inside = np.asarray(inside)
        lo, hi = (s["mean"] - s["ci_low"]).to_numpy(), (s["ci_high"] - s["mean"]).to_numpy()
        ax.errorbar(s["mean"].to_numpy()[inside], y[inside], xerr=[lo[inside], hi[inside]], fmt="o",
                    capsize=3, color=color, label=label)
        for m, yy in zip(s["mean"].to_numpy()[~inside], y[~inside]):
            edge = -clip if m < 0 else clip
            ax.plot([edge * 0.97], [yy], marker="<" if m < 0 else ">", color=color, ms=9, clip_on=False)
            ax.annotate(f"{m:+.0f} pp", (edge * 0.97, yy), xytext=(8 if m < 0 else -8, 6),
                        textcoords="offset points", ha="left" if m < 0 else "right", color=color,
                        fontsize=9)
    if clip is not None:
        ax.set_xlim(-clip, clip)
    ax.set_yticks(np.arange(len(acts)), acts)
    if not tuned:
        ax.legend(title="learning rate", loc="upper left", bbox_to_anchor=(1, 1))
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("after − before, test accuracy (pp), 95% CI")
    return ax


_BOUNDS = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}


def saturation(cfg: PlacementConfig, *, activation: str = "tanh", lr: float = 0.3,
               seeds=None, margin: float = 0.01) -> pd.DataFrame:
    """Why "after" can fail with a saturating activation: train one MLP per placement and
    seed (as in :func:`placement_sweep`), then measure, on the test inputs in eval mode,
    the fraction of each hidden layer's activation outputs within ``margin`` of the
    activation's bounds (tanh: ±1, sigmoid: 0 and 1), where its slope is almost zero.

    Returns columns ``arm`` (the placement), ``seed``, ``layer`` (1 = input side),
    ``saturated`` (a fraction) and ``test_accuracy``."""
    from ..models import mlp
    from ..probes import capture
    from ..train import seeded, train

    if activation not in _BOUNDS:
        raise ValueError(f"saturation is defined for {sorted(_BOUNDS)}, got {activation!r}")
    if not 0 < margin < 0.5:
        raise ValueError(f"margin must be in (0, 0.5), got {margin}")
    if cfg.architecture != "mlp":
        raise ValueError("saturation() probes the MLP preset only")
    data = datasets.load(cfg.dataset, n_train=cfg.n_train)
    lo, hi = _BOUNDS[activation]
    rows = []
    for seed in (cfg.seeds if seeds is None else seeds):
        for placement in PLACEMENTS:
            net = seeded(seed, lambda: mlp(data.num_features, data.num_classes, depth=cfg.depth,
                                           width=cfg.width, norm="batch", placement=placement,
                                           activation=activation, norm_impl=cfg.norm_impl))
            h = train(net, data, steps=cfg.steps, lr=lr, momentum=cfg.momentum,
                      batch_size=cfg.batch_size, seed=seed, eval_every=cfg.steps,
                      eval_splits=("test",), device=cfg.device)
            acts = {str(i + 1): b.act for i, b in enumerate(net.blocks)}
            net.eval()
            with torch.no_grad(), capture(acts, what="output") as seen:
                net(data.test.x.to(next(net.parameters()).device))
            acc = final(h, split="test", diverged_value=1.0 / data.num_classes)
            for layer, out in seen.items():
                sat = ((out <= lo + margin) | (out >= hi - margin)).float().mean().item()
                rows.append(dict(arm=placement, seed=seed, layer=int(layer), saturated=sat,
                                 test_accuracy=acc))
    return pd.DataFrame(rows)
