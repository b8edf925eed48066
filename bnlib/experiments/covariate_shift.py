"""Chapter 6: internal covariate shift (ICS), measured two ways (Santurkar et al. 2018).

* ``noisy_bn`` — *distributional* shift. Four arms train the same network: plain, BN,
  "noisy BN" (BN followed by :class:`~bnlib.nn.ShiftNoise`, a per-unit shift and rescale drawn
  afresh at every step, Santurkar's Algorithm 1) and plain + the same noise. :class:`ShiftProbe`
  measures how much one layer's pre-activation distribution moves between probes.
* ``ics_gradient`` — *gradient-based* ICS (Santurkar's Definition 2.1): ``G`` = ∂L/∂W_i at
  the current parameters, ``G′`` = the same gradient on the same batch after every layer
  before ``i`` took its update step; :class:`ICSProbe` records cos(G, G′) and
  ‖G − G′‖/‖G‖. On Santurkar's deep linear network (full-batch gradient descent: one batch
  holding every sample) and on a ReLU MLP on digits (SGD).

Both train through :func:`bnlib.protocol.probed`: model specs, one ``fit`` per arm × seed,
probes as callbacks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .. import analysis
from .. import data as datasets
from ..models import CNNSpec, MLPSpec, Net, add_shift_noise
from ..nn import batchnorm_layers
from ..probes import Probe, capture, frozen_batchnorm_buffers
from ..protocol import Protocol, probed
from ..train import TrainSpec, loss_fn
from . import register

__all__ = ["NoisySpec", "ShiftProbe", "NoisyBNConfig", "noisy_bn",
           "run_summary", "plot_shift", "plot_unit_percentiles", "layer_groups", "ics_measure",
           "ICSProbe", "ICSConfig", "ics_gradient", "ics_summary", "plot_ics"]


# --- the injected shift ---------------------------------------------------------------

@dataclass(frozen=True)
class NoisySpec:
    """A model spec (``net``) with, when ``noise`` is set, :class:`~bnlib.nn.ShiftNoise` after
    every block's normaliser (:func:`bnlib.models.add_shift_noise`). Arms set ``model.net.norm``
    and ``model.noise``."""

    net: MLPSpec | CNNSpec = MLPSpec()
    noise: bool = False
    n_mu: float = 0.5                        # Santurkar et al.'s constants
    n_sigma: float = 1.25
    r_mu: float = 0.1
    r_sigma: float = 0.1

    def inputs(self, data: datasets.Dataset) -> datasets.Dataset:
        return self.net.inputs(data)

    def build(self, seed: int, data: datasets.Dataset) -> Net:
        net = self.net.build(seed, data)
        if self.noise:
            add_shift_noise(net, n_mu=self.n_mu, n_sigma=self.n_sigma, r_mu=self.r_mu,
                            r_sigma=self.r_sigma)
        return net


# --- distributional shift probe ---------------------------------------------------------

def _unit_moments(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-unit (per-channel) mean and biased variance over the batch (and positions)."""
    t = t.float()
    if t.dim() == 4:
        t = t.transpose(0, 1).reshape(t.shape[1], -1).T
    return t.mean(0), t.var(0, unbiased=False)


class ShiftProbe(Probe):
    """How much block ``layer``'s pre-activation distribution moves during training.

    At the start and every ``every`` steps, a train-mode pass on the fixed ``probe_x`` (BN
    buffers untouched; injected noise drawn afresh, as in training) captures the input of
    ``block.act``. Rows: ``step``, ``d_mean`` and ``d_var`` (mean over units of the absolute
    change of each unit's mean and variance since the previous probe), the 15/50/85th
    percentiles of unit ``unit`` and, when the block has a BN, ``bn_mean_err`` and
    ``bn_var_err``: BN's own guarantee (after undoing γ and β every unit has mean 0 and
    variance 1 on the probe batch), checked.
    """

    def __init__(self, probe_x: Tensor, *, layer: int = -1, every: int = 10, unit: int = 0) -> None:
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        self.probe_x, self.layer, self.every, self.unit = probe_x, layer, every, unit
        self.rows: list[dict] = []
        self._prev: tuple[Tensor, Tensor] | None = None

    def on_train_start(self, model: nn.Module) -> None:
        self.record(0, model)

    def __call__(self, info) -> None:
        if info.step % self.every == 0:
            self.record(info.step, info.model)

    @torch.no_grad()
    def record(self, step: int, model: Net) -> None:
        block = model.blocks[self.layer]
        bn = (batchnorm_layers(block) or [None])[0]
        was = model.training
        model.train()
        with frozen_batchnorm_buffers(model), capture({"act": block.act}) as seen, \
                capture({"bn": bn} if bn is not None else {}, "output") as out:
            model(self.probe_x.to(next(model.parameters()).device))
        model.train(was)
        mean, var = _unit_moments(seen["act"])
        row = {"step": step, "d_mean": math.nan, "d_var": math.nan}
        if self._prev is not None:
            row["d_mean"] = (mean - self._prev[0]).abs().mean().item()
            row["d_var"] = (var - self._prev[1]).abs().mean().item()
        self._prev = (mean, var)
        unit = seen["act"][:, self.unit].flatten().float().cpu().numpy()
        row.update({f"p{p}": float(v) for p, v in zip((15, 50, 85), np.percentile(unit, (15, 50, 85)))})
        if bn is not None:
            shape = (1, -1) + (1,) * (out["bn"].dim() - 2)
            zm, zv = _unit_moments((out["bn"] - bn.bias.view(shape)) / bn.weight.view(shape))
            row.update(bn_mean_err=zm.abs().max().item(), bn_var_err=(zv - 1).abs().max().item())
        self.rows.append(row)


# --- experiment 1: noisy BN --------------------------------------------------------------

def _noisy_arms() -> dict[str, dict[str, Any]]:
    return {"plain": {"model.net.norm": "none"}, "BN": {"model.net.norm": "batch"},
            "noisy BN": {"model.net.norm": "batch", "model.noise": True},
            "plain + noise": {"model.net.norm": "none", "model.noise": True}}


@dataclass(frozen=True)
class NoisyBNConfig(Protocol):
    """Quick preset: the BN paper's MNIST network (3 × 100 sigmoid units, N(0, 0.1²) init,
    batch 60) on digits at SGD LR 0.5, the same for every arm: a setting where the plain net
    barely trains, so that BN has an advantage to lose."""

    data: str = "digits"
    model: NoisySpec = NoisySpec(MLPSpec(depth=3, width=100, activation="sigmoid", init="normal",
                                         init_std=0.1))
    # 60 steps: plain still on its plateau, both BN arms past 93 % (time budget: 4 arms × 8 seeds)
    train: TrainSpec = TrainSpec(lr=0.5, batch_size=60, steps=60, eval_every=15)
    arms: dict[str, dict[str, Any]] = field(default_factory=_noisy_arms)
    probe_every: int = 10
    probe_size: int = 256                   # fixed probe batch: the first training examples
    probe_layer: int = -1                   # the block whose activation input is probed
    seeds: tuple[int, ...] = tuple(range(8))  # 8 paired seeds: enough for an equivalence test
    margin: float = 0.03                    # smallest noisy-BN vs BN test-accuracy gap that matters (3 pp)

    # Santurkar et al.'s setting: a VGG-style CNN on CIFAR-10, SGD LR 0.1, batch 128.
    FULL = {"data": "cifar10", "model": NoisySpec(CNNSpec(channels=(64, 128, 256, 256, 512, 512))),
            "probe_every": 100, "probe_layer": 4,
            "train": TrainSpec(lr=0.1, batch_size=128, steps=10_000, eval_every=500)}


def _plot_noisy_bn(df: pd.DataFrame):
    from .. import plots
    fig, axes = plots.new_axes(2)
    plots.draw_curves(df[df["record"] == "history"], ax=axes[0, 0])
    plot_shift(df, ax=axes[0, 1])
    return fig


@register("noisy_bn", NoisyBNConfig, title="Noisy BN: injected distribution shift after BN",
          chapter="06_covariate_shift", plot=_plot_noisy_bn)
def noisy_bn(cfg: NoisyBNConfig) -> pd.DataFrame:
    """Every arm × seed, paired: ``record == "history"`` rows are the training histories,
    ``record == "probe"`` rows :class:`ShiftProbe`'s (``step, d_mean, d_var, p15, p50, p85``
    and, for BN arms, ``bn_mean_err, bn_var_err``); ``arm`` and ``seed`` name the run."""
    return probed(cfg, lambda acfg, data: ShiftProbe(data.train.x[:cfg.probe_size],
                                                     layer=cfg.probe_layer, every=cfg.probe_every))


def run_summary(df: pd.DataFrame, *, early_step: int = 30) -> pd.DataFrame:
    """Per (arm, seed) of a ``noisy_bn`` result: final ``test_acc`` (a diverged run counts 0),
    ``val_acc_early`` (at ``early_step``) and the mean shifts ``d_mean``, ``d_var`` over probes."""
    hist = df[df["record"] == "history"]
    out = analysis.final(hist, split="test", keys=["arm", "seed"])[["arm", "seed", "accuracy"]]
    out = out.rename(columns={"accuracy": "test_acc"}).fillna({"test_acc": 0.0})
    early = hist[(hist["split"] == "val") & (hist["step"] == early_step)]
    shift = df[df["record"] == "probe"].groupby(["arm", "seed"])[["d_mean", "d_var"]].mean()
    return (out.merge(early[["arm", "seed", "accuracy"]].rename(columns={"accuracy": "val_acc_early"}),
                      on=["arm", "seed"], how="left")
            .merge(shift.reset_index(), on=["arm", "seed"]))


def plot_shift(df: pd.DataFrame, ax=None):
    """Bar chart of the mean shift per probe interval, ``d_mean`` and ``d_var``, per arm
    (mean ± sd over seeds), on a log scale."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .. import plots
    ax = ax or plt.gca()
    s = run_summary(df).melt(id_vars=["arm", "seed"], value_vars=["d_mean", "d_var"],
                             var_name="moment", value_name="change")
    s["moment"] = s["moment"].map({"d_mean": "|Δ mean|", "d_var": "|Δ variance|"})
    sns.barplot(data=s, x="moment", y="change", hue="arm", errorbar=("sd", 1), ax=ax,
                palette={a: plots.color(a) for a in s["arm"].unique()})
    ax.set_yscale("log")
    ax.set_xlabel("")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", title="arm")
    return ax


def plot_unit_percentiles(df: pd.DataFrame, arms: Sequence[str], axes) -> None:
    """One panel per arm: the 15/50/85th percentiles of the probed unit's input over
    training, one band per seed (the BN paper's Figure 1(b, c) view)."""
    from .. import plots
    probes = df[df["record"] == "probe"]
    for ax, arm in zip(axes, arms):
        plots.draw_percentiles(probes[probes["arm"] == arm], hue="seed", ax=ax, title=arm)
        ax.set(ylabel="input of the nonlinearity, unit 0", xlabel="step")
        ax.get_legend().remove()


# --- experiment 2: gradient-based ICS ----------------------------------------------------

def layer_groups(model: Net) -> list[list[str]]:
    """Parameter names grouped by layer, input side first: one group per block (its weight
    layer and its BN's γ, β), then the head. Layer ``i``'s weight is ``groups[i][0]``."""
    if not isinstance(model, Net):
        raise TypeError(f"layer_groups needs a bnlib.models.Net, got {type(model).__name__}")
    names = [n for n, _ in model.named_parameters()]
    prefixes = [f"blocks.{k}." for k in range(len(model.blocks))] + ["head."]
    groups = [[n for n in names if n.startswith(p)] for p in prefixes]
    for p, g in zip(prefixes, groups):  # put the weight matrix first
        g.sort(key=lambda n: n != p + "layer.weight" and n != p + "weight")
    return groups


def ics_measure(model: Net, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *,
                loss: Callable[[Tensor, Tensor], Tensor], lr: float, layers: Sequence[int]) -> list[dict]:
    """Santurkar et al.'s Definition 2.1 of internal covariate shift, for each of ``layers``.

    ``G`` = ∂L/∂W_i at ``params``; ``G′`` = the same gradient on the same ``(x, y)`` after
    every layer before ``i`` (weights, biases, BN γ and β) has moved by its SGD step
    ``−lr·∂L/∂θ``. The model is never mutated (``functional_call``);
    it runs in its current mode, BN running statistics untouched. One dict per layer:
    ``layer``, ``cosine`` (cos(G, G′), 1 = no shift), ``rel_diff`` (‖G − G′‖/‖G‖),
    ``diff``, ``grad_norm`` (‖G‖) and ``loss`` (at ``params``).
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    groups = layer_groups(model)
    bad = [i for i in layers if not 0 < i < len(groups)]
    if bad:
        raise ValueError(f"layers must be in 1..{len(groups) - 1} (layer 0 has nothing before it), got {bad}")
    params = {n: p.detach() for n, p in params.items()}
    with frozen_batchnorm_buffers(model):
        def grads(p: dict[str, Tensor], wrt: Sequence[str]) -> tuple[float, list[Tensor]]:
            leaves = {n: p[n].clone().requires_grad_(n in wrt) for n in p}
            out = loss(functional_call(model, leaves, (x,)), y)
            return out.item(), list(torch.autograd.grad(out, [leaves[n] for n in wrt]))

        names = list(params)
        value, g_list = grads(params, names)
        g_all = dict(zip(names, g_list))
        step = {n: -lr * g for n, g in g_all.items()}
        rows = []
        for i in layers:
            w = groups[i][0]
            before = {n for g in groups[:i] for n in g}
            g2 = grads({n: (p + step[n] if n in before else p) for n, p in params.items()}, [w])[1][0]
            g1 = g_all[w]
            diff, norm = (g1 - g2).norm().item(), g1.norm().item()
            rows.append({"layer": i, "cosine": F.cosine_similarity(g1.flatten(), g2.flatten(), dim=0).item(),
                         "rel_diff": diff / norm if norm > 0 else math.nan, "diff": diff,
                         "grad_norm": norm, "loss": value})
    return rows


class ICSProbe(Probe):
    """:func:`ics_measure` after each step in ``at``, on that step's own batch, at the updated
    parameters, with the plain SGD step ``−lr·∇L`` as the earlier layers' update (train with
    a momentum-free SGD)."""

    def __init__(self, layers: Sequence[int], lr: float, *, at: Sequence[int],
                 loss: Callable = F.cross_entropy) -> None:
        self.layers, self.lr, self.at, self.loss = list(layers), lr, set(at), loss
        self.rows: list[dict] = []

    def __call__(self, info) -> None:
        if info.step not in self.at:
            return
        for r in ics_measure(info.model, dict(info.model.named_parameters()), info.x, info.y,
                             loss=self.loss, lr=self.lr, layers=self.layers):
            self.rows.append({"step": info.step, **r})


@dataclass(frozen=True)
class ICSConfig(Protocol):
    """Quick preset. MLP part (the protocol fields): a 6 × 64 ReLU MLP on digits, plain SGD at
    0.05 for both arms. DLN part (``dln_*``): Santurkar's deep linear network (d = 10, 25
    weight matrices, Glorot init, identity "activations"), full-batch gradient descent on
    ``dln_samples`` samples of ``y = Ax``.

    Santurkar et al. ran the DLN 10,000 steps at LR 1e-6 or 1e-7 on ‖Wx − Ax‖²; ``fit``'s
    mean squared error also averages over the d = 10 outputs, so LR 1e-3 here is 1e-4 on
    their loss: 50 steps at it show the same phenomenon within seconds (the full preset:
    10,000 steps at the equivalent of 1e-5)."""

    data: str = "digits"
    model: MLPSpec = MLPSpec(depth=6, width=64)
    train: TrainSpec = TrainSpec(lr=0.05, steps=60, batch_size=64, eval_every=60,
                                 eval_splits=("val",))  # no momentum: "the step" is −lr·g
    at: tuple[int, ...] = (1, 15, 30, 45, 60)  # the steps measured
    layers: tuple[int, ...] = (2, 4)
    dln_model: MLPSpec = MLPSpec(depth=24, width=10, activation="identity", init="xavier")
    dln_samples: int = 128                   # Santurkar: 1000 (the full preset); ≫ d, and fast
    dln_train: TrainSpec = TrainSpec(lr=1e-3, steps=50, batch_size=128, eval_every=50,
                                     eval_splits=("val",))  # batch = every sample: full-batch GD
    dln_at: tuple[int, ...] = (1, 10, 25, 50)
    dln_layers: tuple[int, ...] = (4, 9, 17)
    parts: tuple[str, ...] = ("dln", "mlp")
    seeds: tuple[int, ...] = tuple(range(8))  # 8 paired seeds for the paired intervals

    FULL = {"data": "mnist", "model.depth": 10, "model.width": 256,
            "train.steps": 5000, "train.eval_every": 1000,
            "train.batch_size": 128, "at": (1, *range(250, 5001, 250)),
            "dln_samples": 1000, "dln_train.batch_size": 1000,
            "layers": (3, 6, 9), "dln_train.lr": 1e-4, "dln_train.steps": 10_000,
            "dln_train.eval_every": 10_000,
            "dln_at": (1, 10, 100, 500, 1000, 2000, 5000, 10_000)}

    def prepare(self, data: datasets.Dataset) -> datasets.Dataset:
        """For the DLN part: ``dln_samples`` training samples of ``y = Ax`` (raw)."""
        if self.data != "deep_linear":
            return data
        need = math.ceil(self.dln_samples / 0.65) + 10  # the training split is 65 % of the data
        ds = datasets.load("deep_linear", preprocessing="raw", n=need, dim=self.dln_model.width)
        return dataclasses.replace(ds, train=datasets.Split(ds.train.x[:self.dln_samples],
                                                            ds.train.y[:self.dln_samples]))


def _plot_ics(df: pd.DataFrame):
    from .. import plots
    return plots.facets(dict.fromkeys(df["part"]), lambda part, ax: plot_ics(df, part, ax=ax))


@register("ics_gradient", ICSConfig, title="Gradient-based internal covariate shift (Santurkar Def. 2.1)",
          chapter="06_covariate_shift", plot=_plot_ics)
def ics_gradient(cfg: ICSConfig) -> pd.DataFrame:
    """:class:`ICSProbe` rows for plain and BN, paired seeds: ``part`` (``"dln"``, ``"mlp"``),
    ``arm``, ``seed``, ``step``, ``layer``, ``cosine``, ``rel_diff``, ``diff``,
    ``grad_norm``, ``loss``, ``diverged``."""
    bad = set(cfg.parts) - {"dln", "mlp"}
    if bad:
        raise ValueError(f"parts must be among 'dln', 'mlp', got {sorted(bad)}")
    frames = []
    for part in cfg.parts:
        pcfg, at, layers = cfg, cfg.at, cfg.layers
        if part == "dln":
            pcfg = dataclasses.replace(cfg, data="deep_linear", preprocessing="raw", n_train=None,
                                       model=cfg.dln_model, train=cfg.dln_train)
            at, layers = cfg.dln_at, cfg.dln_layers
        df = probed(pcfg, lambda acfg, data, at=at, layers=layers: ICSProbe(
            layers, acfg.train.lr, at=at, loss=loss_fn(data)))
        frames.append(df[df["record"] == "probe"].drop(columns=["record", "split"], errors="ignore")
                      .assign(part=part))
    return pd.concat(frames, ignore_index=True)


def ics_summary(df: pd.DataFrame, part: str, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Per (arm, seed) for one ``part``: the lowest and the mean cos(G, G′) and the mean
    ‖G − G′‖/‖G‖ over every measured step and layer (default: all), and the loss at the last
    measured step."""
    d = df[df["part"] == part]
    if layers is not None:
        d = d[d["layer"].isin(layers)]
    if d.empty:
        raise ValueError(f"no ICS rows for part {part!r} and layers {layers}")
    g = d.groupby(["arm", "seed"], sort=False)
    last = d[d["step"] == d["step"].max()].groupby(["arm", "seed"], sort=False)["loss"].first()
    return pd.DataFrame({"min_cosine": g["cosine"].min(), "mean_cosine": g["cosine"].mean(),
                         "mean_rel_diff": g["rel_diff"].mean(), "final_loss": last}).reset_index()


def plot_ics(df: pd.DataFrame, part: str, *, y: str = "cosine", ax=None, legend: bool = True):
    """cos(G, G′) (or ``y``) against the step for one ``part``: one colour per arm, one line
    style per layer; line = mean over seeds, band = min–max range over seeds."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .. import plots
    ax = ax or plt.gca()
    d = df[df["part"] == part].assign(layer=lambda d: "layer " + d["layer"].astype(str))
    sns.lineplot(data=d, x="step", y=y, hue="arm", style="layer", errorbar=("pi", 100), ax=ax,
                 palette={a: plots.color(a) for a in d["arm"].unique()}, marker="o")
    if y == "cosine":
        ax.axhline(1, color="k", lw=0.5)
        ax.set_ylabel("cos(G, G′)")
    ax.set_title("deep linear network, full-batch GD" if part == "dln" else "ReLU MLP on digits, SGD")
    if legend:
        ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    else:
        ax.get_legend().remove()
    return ax
