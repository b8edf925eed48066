"""Chapter 8: is a batch-normalised network less dependent on its initialisation?

One experiment, ``init``, on a deep ReLU MLP with and without BN:

* named schemes (Kaiming/He, Xavier/Glorot, a fixed N(0, 0.01²)): for each scheme every
  arm's learning rate is tuned on the validation split with tuning seeds disjoint from the
  8 reported seeds (:func:`bnlib.protocol.tuned`; ``kind`` ``"tuning"``/``"history"``,
  column ``scheme``);
* Kaiming × a scale factor ``s`` (0.01× … 10×), each arm at the rate tuned for Kaiming
  (``kind="scale"``, column ``init_scale``). Without BN an L-layer ReLU net multiplies its
  signal by about ``s^L``; with BN the factor cancels in every hidden layer but not in the
  effective learning rate ``η/‖W‖²`` (chapter 7).

:func:`activation_scale` and :func:`scheme_std_ratio` need no training.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from .. import analysis
from ..config import override
from ..models import MLPSpec
from ..protocol import Protocol, Tuning, rows, runs, tuned
from ..train import TrainSpec
from . import register

#: The named initialisations: label → config overrides.
SCHEMES = {"kaiming": {"model.init": "kaiming"}, "xavier": {"model.init": "xavier"},
           "normal(0.01)": {"model.init": "normal", "model.init_std": 0.01}}


@dataclass(frozen=True)
class InitConfig(Protocol):
    """Schemes and Kaiming scales, plain and BN; the quick preset."""

    # 6×64 ReLU MLP: deep enough for s^L to bite
    model: MLPSpec = MLPSpec(depth=6, width=64)
    train: TrainSpec = TrainSpec(momentum=0.9, steps=100, batch_size=64, eval_every=10,
                                 eval_splits=("val", "test"))  # chapter 7's optimiser, short budget
    # allow_edge: a plain net that learns nothing at any rate (N(0, 0.01²)) has no interior
    # best rate; the chapter prints which choices sit at an edge
    tuning: Tuning = Tuning(grid=(0.01, 0.03, 0.1, 0.3), seeds=(1000, 1001), allow_edge=True)
    schemes: tuple[str, ...] = tuple(SCHEMES)
    scales: tuple[float, ...] = (0.01, 0.3, 1.0, 3.0, 10.0)  # × Kaiming; 1.0 is the scheme run
    target: float = 0.9  # validation accuracy that counts as "trains"
    margin: float = 0.01  # smallest test-accuracy difference that matters (declared in advance)

    FULL = {"data": "fashion_mnist", "model.depth": 8, "model.width": 256, "train.steps": 2000,
            "train.eval_every": 50}


@register("init", InitConfig, title="Accuracy across initialisation schemes and scales",
          chapter="08_initialization", plot=lambda df: plot(df))
def init(cfg: InitConfig) -> pd.DataFrame:
    """Tuned scheme runs (``kind`` ``tuning``/``history``, ``scheme``) and the Kaiming scale
    sweep at each arm's Kaiming rate (``kind="scale"``, ``init_scale``, ``lr``)."""
    unknown = [s for s in cfg.schemes if s not in SCHEMES]
    if unknown or "kaiming" not in cfg.schemes:
        raise ValueError(f"schemes must include 'kaiming' and come from {list(SCHEMES)}, got {cfg.schemes}")
    if any(not (s > 0) for s in cfg.scales):
        raise ValueError(f"scales must be positive, got {cfg.scales}")
    schemes = pd.concat([tuned(override(cfg, SCHEMES[s])).assign(scheme=s) for s in cfg.schemes],
                        ignore_index=True)
    kaiming = schemes[(schemes["scheme"] == "kaiming") & (schemes["kind"] == "history")]
    frames = [schemes, kaiming.assign(kind="scale", init_scale=1.0)]
    others = [s for s in cfg.scales if s != 1.0]
    for arm, lr in kaiming.groupby("arm")["lr"].first().items():
        sweep = runs(override(cfg, {"train.lr": lr}), grid={"model.init_scale": others}, arms=[arm])
        frames.append(sweep.assign(kind="scale", lr=lr, scheme="kaiming"))
    return pd.concat(frames, ignore_index=True)


def scheme_finals(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per (scheme, arm, seed) of the reported runs: final accuracy at the tuned rate; a
    diverged run scores chance (0.1), never a stale number."""
    return analysis.final(rows(df), split=split, keys=["scheme", "arm", "lr", "seed"], diverged_value=0.1)


def scale_times(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Censored steps to ``target`` validation accuracy per (arm, init_scale, seed) of the
    scale sweep, with ``steps`` = the time, or the budget where it never arrived."""
    return analysis.censored_times(rows(df, "scale"), target, keys=["arm", "init_scale", "seed"])


@torch.no_grad()
def activation_scale(cfg: InitConfig, x: torch.Tensor, *, scales: Sequence[float],
                     seed: int = 0) -> pd.DataFrame:
    """The std of every hidden block's output and of the logits at initialisation, for
    Kaiming × ``scale``, plain and BN (train-mode forward, no training). One row per
    (arm, init_scale, layer); layer ``depth + 1`` is the logits."""
    from ..protocol import arm_config, load_data
    if x.dim() != 2 or len(x) < 2:
        raise ValueError("x must be a batch of at least two flattened examples, shape (N, features)")
    data, out = load_data(cfg), []
    for arm in cfg.arms:
        for s in scales:
            net = dataclasses.replace(arm_config(cfg, arm).model, init_scale=s).build(seed, data)
            net.train()
            h = x
            for i, block in enumerate(net.blocks, start=1):
                h = block(h)
                out.append({"arm": arm, "init_scale": s, "layer": i, "std": h.std().item()})
            out.append({"arm": arm, "init_scale": s, "layer": len(net.blocks) + 1,
                        "std": net.head(h).std().item()})
    return pd.DataFrame(out)


def scheme_std_ratio(cfg: InitConfig) -> pd.DataFrame:
    """Per scheme: the weight std of a hidden layer and its multiple of Kaiming's (for a
    deep ReLU MLP a scheme *is* a scale)."""
    from ..protocol import load_data
    data, out = load_data(cfg), []
    for name in cfg.schemes:
        net = override(cfg, SCHEMES[name]).model.build(0, data)
        out.append({"scheme": name, "hidden_layer_std": net.blocks[1].layer.weight.std().item()})
    out = pd.DataFrame(out)
    return out.assign(vs_kaiming=out["hidden_layer_std"] / float(
        out.loc[out["scheme"] == "kaiming", "hidden_layer_std"].iloc[0]))


def plot(df: pd.DataFrame):
    """Left: final validation accuracy against the Kaiming scale (each arm at its Kaiming
    rate). Right: test accuracy per scheme, each arm at its rate tuned for that scheme."""
    import seaborn as sns

    from .. import plots
    fig, axes = plots.new_axes(ncols=2, width=5.2)
    f = analysis.final(rows(df, "scale"), split="val", keys=["arm", "init_scale", "seed"])
    plots.draw_sweep(f, x="init_scale", y="accuracy", ax=axes[0][0],
                     title="Validation accuracy against the init scale")
    axes[0][0].set_xlabel("init scale (× Kaiming)")
    s = scheme_finals(df)
    arms = [a for a in ("plain", "BN") if a in set(s["arm"])]
    sns.barplot(data=s, x="scheme", y="accuracy", hue="arm", hue_order=arms, errorbar=("sd", 1),
                palette={a: plots.color(a) for a in arms}, ax=axes[0][1])
    axes[0][1].set_ylim(0, 1)
    axes[0][1].set_title("Test accuracy by scheme (each at its tuned rate)")
    return fig
