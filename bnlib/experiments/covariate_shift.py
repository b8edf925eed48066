"""Chapter 6: internal covariate shift (ICS), measured two ways.

Two experiments, both after Santurkar et al. (2018), "How does batch normalization help
optimization?":

* ``noisy_bn`` — *distributional* shift. Four arms train the same network: plain, BN,
  "noisy BN" (BN followed by :class:`ShiftNoise`, a random, time-varying per-unit shift and
  rescale drawn afresh at every step, Santurkar's Algorithm 1) and plain + the same noise.
  A training callback (:class:`ShiftProbe`) measures how much one layer's pre-activation
  distribution moves between consecutive probes on a fixed probe batch: the mean over units
  of ``|μ_t − μ_{t−1}|`` and ``|σ²_t − σ²_{t−1}|``. If BN worked by keeping those
  distributions still, noisy BN (which moves them more than the plain net does) should
  train like the plain net; it trains like BN instead.

* ``ics_gradient`` — *gradient-based* ICS (Santurkar's Definition 2.1). ``G`` is the
  gradient of the loss with respect to layer ``i``'s weights at the current parameters;
  ``G′`` is the same gradient, on the same batch, after every layer *before* ``i`` has
  taken its update step. ``G′ ≈ G`` means the layers below did not change the problem that
  layer ``i`` is solving. We report ``cos(G, G′)`` and ``‖G − G′‖/‖G‖`` (the raw
  ``‖G − G′‖`` is confounded by very different gradient norms). Measured on the 25-layer
  deep linear network (DLN) trained by full-batch gradient descent — an *analysis* loop
  written here with :func:`torch.func.functional_call`, not a training engine — and on a
  digits MLP trained by :func:`bnlib.train.train`, measured by a callback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .. import data as datasets
from ..models import Net, cnn, mlp
from ..nn import batchnorm_layers
from ..probes import capture, frozen_batchnorm_buffers
from ..train import StepInfo, resolve_device, seeded, train
from . import Config, register, sweep

__all__ = ["ShiftNoise", "add_shift_noise", "ShiftProbe", "layer_groups", "ics_measure",
           "ICSProbe", "train_deep_linear", "NoisyBNConfig", "noisy_bn", "ICSConfig",
           "ics_gradient", "shift_summary", "plot_shift", "plot_unit_percentiles", "plot_ics",
           "ics_summary", "run_summary", "mean_sd_table", "plot_curves", "ARMS"]

#: The four arms of the noisy-BN experiment: (norm, noise after the norm?).
ARMS: dict[str, dict[str, Any]] = {
    "plain": {"norm": "none", "noise": False},
    "BN": {"norm": "batch", "noise": False},
    "noisy BN": {"norm": "batch", "noise": True},
    "plain + noise": {"norm": "none", "noise": True},
}



# --- the injected shift ---------------------------------------------------------------

class ShiftNoise(nn.Module):
    """Santurkar et al.'s time-varying distributional shift (their Algorithm 1).

    In training mode every forward call draws fresh noise. Per unit ``j`` (per channel for
    images): a mean shift ``μ_j ~ U(−n_mu, n_mu)`` and a scale ``σ_j ~ U(1, n_sigma)``;
    then per example (and, for images, per position) ``m ~ U(μ_j − r_mu, μ_j + r_mu)`` and
    ``s ~ N(σ_j, r_sigma)``, and the output is ``s·a + m``. In eval mode it is the
    identity. Placed right after a BN layer, it makes the distribution the next layer sees
    move a lot from step to step, although BN normalised it a moment before.
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

    def extra_repr(self) -> str:
        return f"n_mu={self.n_mu}, n_sigma={self.n_sigma}, r_mu={self.r_mu}, r_sigma={self.r_sigma}"


def add_shift_noise(model: Net, **noise_kwargs: float) -> Net:
    """Put a :class:`ShiftNoise` right after every block's normaliser (in place).

    ``block.norm`` becomes ``nn.Sequential(old_norm, ShiftNoise(...))``; on a plain net
    the old norm is ``nn.Identity``, so the noise then acts on the raw pre-activation.
    """
    if not isinstance(model, Net):
        raise TypeError(f"add_shift_noise needs a bnlib.models.Net, got {type(model).__name__}")
    for block in model.blocks:
        block.norm = nn.Sequential(block.norm, ShiftNoise(**noise_kwargs))
    return model


# --- distributional shift probe ---------------------------------------------------------

def _unit_moments(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-unit (per-channel) mean and biased variance over the batch (and positions)."""
    t = t.float()
    if t.dim() == 4:
        t = t.transpose(0, 1).reshape(t.shape[1], -1).T
    return t.mean(0), t.var(0, unbiased=False)


class ShiftProbe:
    """Training callback: how much one layer's pre-activation distribution moves.

    Every ``every`` steps, a train-mode forward pass on the fixed ``probe_x`` (BN running
    statistics untouched; injected noise is drawn afresh, as during training) captures the
    input of ``block.act``, i.e. what the nonlinearity sees, and records per-unit means and
    variances. Rows of :meth:`frame`: ``step``, ``d_mean`` and ``d_var`` (mean over units
    of the absolute change since the previous probe), and the 15/50/85th percentiles of
    unit ``unit`` (the BN paper's Figure 1(b, c) view). When ``bn`` is given (the block's
    BN layer), ``bn_mean_err``/``bn_var_err`` check BN's guarantee on its own output:
    after undoing γ and β, every unit has mean 0 and variance 1 on the probe batch.
    """

    def __init__(self, block: nn.Module, probe_x: Tensor, *, every: int = 10, unit: int = 0,
                 bn: nn.Module | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        self.block, self.probe_x, self.every, self.unit, self.bn = block, probe_x, every, unit, bn
        self.rows: list[dict] = []
        self._prev: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def record(self, step: int, model: nn.Module) -> None:
        was = model.training
        model.train()
        mods = {"act": self.block.act}
        if self.bn is not None:
            mods["bn"] = self.bn
        with frozen_batchnorm_buffers(model), capture(mods, "input") as seen_in, \
                capture({"bn": self.bn} if self.bn is not None else {}, "output") as seen_out:
            model(self.probe_x.to(next(model.parameters()).device))
        model.train(was)
        a = seen_in["act"]
        mean, var = _unit_moments(a)
        row = {"step": step, "d_mean": math.nan, "d_var": math.nan}
        if self._prev is not None:
            row["d_mean"] = (mean - self._prev[0]).abs().mean().item()
            row["d_var"] = (var - self._prev[1]).abs().mean().item()
        self._prev = (mean, var)
        unit = a[:, self.unit].flatten().float().cpu().numpy()
        row.update({f"p{p}": float(v) for p, v in zip((15, 50, 85), np.percentile(unit, (15, 50, 85)))})
        if self.bn is not None:
            shape = (1, -1) + (1,) * (seen_out["bn"].dim() - 2)
            z = (seen_out["bn"] - self.bn.bias.view(shape)) / self.bn.weight.view(shape)
            zm, zv = _unit_moments(z)
            row["bn_mean_err"] = zm.abs().max().item()
            row["bn_var_err"] = (zv - 1).abs().max().item()
        self.rows.append(row)

    def __call__(self, info: StepInfo) -> None:
        if info.step == 1:
            self.record(0, info.model)  # after the first update: the start of the record
        if info.step % self.every == 0:
            self.record(info.step, info.model)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def shift_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, seed): mean ``d_mean`` and ``d_var`` over all probes of the run."""
    probes = df[df["record"] == "probe"]
    keys = [k for k in ("arm", "lr", "seed") if k in probes]
    return probes.groupby(keys, sort=False)[["d_mean", "d_var"]].mean().reset_index()


def mean_sd_table(df: pd.DataFrame, by: str | Sequence[str], columns: Sequence[str],
                  digits: int = 3) -> pd.DataFrame:
    """A display table: one row per group, each column as ``"mean ± sd"`` over the rows of
    the group (e.g. over seeds), in the order the groups first appear."""
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, *columns] if c not in df]
    if missing:
        raise ValueError(f"columns {missing} are not in the frame")
    g = df.groupby(by, sort=False)[list(columns)]
    mean, sd = g.mean(), g.std(ddof=1)
    fmt = lambda m, s: f"{m:.{digits}g} ± {s:.1g}" if abs(m) < 1e-2 and m != 0 else f"{m:.{digits}f} ± {s:.{digits}f}"  # noqa: E731
    out = pd.DataFrame({c: [fmt(m, s) for m, s in zip(mean[c], sd[c])] for c in columns}, index=mean.index)
    return out


def run_summary(df: pd.DataFrame, *, early_step: int = 100) -> pd.DataFrame:
    """Per (arm, seed) of a ``noisy_bn`` result: final test accuracy (a diverged run counts
    as 0), validation accuracy at ``early_step``, and the mean shifts ``d_mean``, ``d_var``."""
    from ..stats import final
    hist = df[df["record"] == "history"]
    rows = []
    for (arm, seed), h in hist.groupby(["arm", "seed"], sort=False):
        v = h[(h["split"] == "val") & (h["step"] == early_step)]["accuracy"]
        rows.append({"arm": arm, "seed": seed, "test_acc": final(h, split="test", diverged_value=0.0),
                     "val_acc_early": float(v.iloc[0]) if len(v) else math.nan})
    return pd.DataFrame(rows).merge(shift_summary(df), on=["arm", "seed"])


# --- experiment 1: noisy BN --------------------------------------------------------------

@dataclass(frozen=True)
class NoisyBNConfig(Config):
    """Quick preset: the BN paper's MNIST network (3 × 100 sigmoid units, small Gaussian
    init, batch 60) on digits at SGD LR 0.5, a setting where the plain net barely trains."""

    data: str = "digits"
    model: str = "mlp"                      # "mlp" or "cnn"
    depth: int = 3
    width: int = 100
    channels: tuple[int, ...] = (32, 64, 128)
    activation: str = "sigmoid"
    init: str = "normal"
    init_std: float | None = 0.1
    lr: float = 0.5
    momentum: float = 0.0
    batch_size: int = 60
    steps: int = 200                        # plain still on its plateau; BN arms long trained
    eval_every: int = 50
    probe_every: int = 10
    probe_size: int = 256
    probe_layer: int = -1                   # the block whose activation input is probed
    n_mu: float = 0.5
    n_sigma: float = 1.25
    r_mu: float = 0.1
    r_sigma: float = 0.1
    arms: tuple[str, ...] = ("plain", "BN", "noisy BN", "plain + noise")
    seeds: tuple[int, ...] = tuple(range(8))  # 8 paired seeds: enough for an equivalence test
    margin: float = 0.03                    # smallest noisy-BN vs BN test-accuracy gap that matters (3 pp)

    @classmethod
    def full(cls) -> "NoisyBNConfig":
        # Santurkar et al.'s setting: a VGG-style CNN on CIFAR-10, SGD LR 0.1, batch 128.
        return cls(data="cifar10", model="cnn", channels=(64, 128, 256, 256, 512, 512),
                   activation="relu", init="kaiming", init_std=None, lr=0.1, batch_size=128,
                   steps=10_000, eval_every=500, probe_every=100, probe_layer=4)


def _noisy_bn_run(*, seed: int, cfg: NoisyBNConfig, norm: str, noise: bool) -> pd.DataFrame:
    ds = datasets.load(cfg.data)
    if cfg.model == "mlp":
        build = lambda: mlp(ds.num_features, ds.num_classes, depth=cfg.depth, width=cfg.width,  # noqa: E731
                            activation=cfg.activation, norm=norm, init=cfg.init,
                            init_std=cfg.init_std)
    elif cfg.model == "cnn":
        ds = ds.images()
        build = lambda: cnn(ds.input_shape[0], ds.num_classes, channels=cfg.channels,  # noqa: E731
                            activation=cfg.activation, norm=norm, init=cfg.init,
                            init_std=cfg.init_std)
    else:
        raise ValueError(f"model must be 'mlp' or 'cnn', got {cfg.model!r}")
    net = seeded(seed, build)
    if noise:
        add_shift_noise(net, n_mu=cfg.n_mu, n_sigma=cfg.n_sigma, r_mu=cfg.r_mu, r_sigma=cfg.r_sigma)
    block = net.blocks[cfg.probe_layer]
    bns = batchnorm_layers(block)
    dev = resolve_device(cfg.device)
    probe = ShiftProbe(block, ds.train.x[:cfg.probe_size].to(dev), every=cfg.probe_every,
                       bn=bns[0] if bns else None)
    hist = train(net, ds, steps=cfg.steps, lr=cfg.lr, momentum=cfg.momentum,
                 batch_size=cfg.batch_size, seed=seed, device=dev, eval_every=cfg.eval_every,
                 eval_splits=("val", "test"), callbacks=[probe])
    return pd.concat([hist.assign(record="history"),
                      probe.frame().assign(record="probe", diverged=bool(hist["diverged"].any()))],
                     ignore_index=True)


def _color(arm: str) -> str:
    """The book's colour for ``arm``; "plain + noise" (not in the book's vocabulary) in orange."""
    from .. import plots
    return "#ff7f0e" if arm == "plain + noise" else plots.color(arm)


def plot_shift(df: pd.DataFrame, ax=None):
    """Bar chart of the mean shift per probe interval, ``d_mean`` and ``d_var``, per arm
    (mean ± sd over seeds), on a log scale."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    ax = ax or plt.gca()
    s = shift_summary(df).melt(id_vars=["arm", "seed"], value_vars=["d_mean", "d_var"],
                               var_name="moment", value_name="change")
    s["moment"] = s["moment"].map({"d_mean": "|Δ mean|", "d_var": "|Δ variance|"})
    sns.barplot(data=s, x="moment", y="change", hue="arm", errorbar=("sd", 1), ax=ax,
                palette={a: _color(a) for a in s["arm"].unique()})
    ax.set_yscale("log")
    ax.set_xlabel("")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", title="arm")
    ax.set_ylabel("change between probes (mean over units)")
    return ax


def plot_unit_percentiles(df: pd.DataFrame, arms: Sequence[str], axes) -> None:
    """One panel per arm: the 15/50/85th percentiles of the probed unit's input over
    training, one band per seed (the BN paper's Figure 1(b, c) view)."""
    from .. import plots
    probes = df[df["record"] == "probe"]
    for ax, arm in zip(axes, arms):
        plots.percentile_bands(probes[probes["arm"] == arm], hue="seed", ax=ax, title=arm)
        ax.set_ylabel("input of the nonlinearity, unit 0")
        ax.set_xlabel("step")
        ax.get_legend().remove()


def plot_curves(df: pd.DataFrame, *, split: str = "val", y: str = "accuracy", ax=None):
    """Learning curves of a ``noisy_bn`` result on ``split``, mean ± sd over seeds, in the
    chapter's arm colours."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    ax = ax or plt.gca()
    h = df[(df["record"] == "history") & (df["split"] == split)]
    sns.lineplot(data=h, x="step", y=y, hue="arm", errorbar=("sd", 1), ax=ax,
                 palette={a: _color(a) for a in h["arm"].unique()})
    ax.set_ylabel(f"{split} {y}")
    return ax


def _plot_noisy_bn(df: pd.DataFrame):
    from .. import plots
    fig, axes = plots.new_axes(2)
    plot_curves(df, ax=axes[0, 0])
    plot_shift(df, ax=axes[0, 1])
    return fig


@register("noisy_bn", NoisyBNConfig, title="Noisy BN: injected distribution shift after BN",
          chapter="06_covariate_shift", plot=_plot_noisy_bn)
def noisy_bn(cfg: NoisyBNConfig) -> pd.DataFrame:
    """Train plain / BN / noisy BN / plain + noise with paired seeds.

    Returns one tidy frame: ``record == "history"`` rows are :func:`bnlib.train.train`'s
    history (``step, split, loss, accuracy``); ``record == "probe"`` rows are
    :class:`ShiftProbe` rows (``step, d_mean, d_var, p15, p50, p85`` and, for BN arms,
    ``bn_mean_err, bn_var_err``). Columns ``arm`` and ``seed`` identify the run.
    """
    unknown = set(cfg.arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
    return sweep(_noisy_bn_run, seeds=cfg.seeds, arms={a: ARMS[a] for a in cfg.arms},
                 common={"cfg": cfg}, desc="noisy_bn")


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
                loss: Callable[[Tensor, Tensor], Tensor], lr: float, layers: Sequence[int],
                update: Mapping[str, Tensor] | None = None) -> list[dict]:
    """Santurkar et al.'s Definition 2.1 of internal covariate shift, for each of ``layers``.

    ``G`` = ∂L/∂W_i at ``params``; ``G′`` = the same gradient on the same ``(x, y)`` after
    every layer before ``i`` (weights, biases, BN γ and β) has moved by its update step,
    ``−lr·∂L/∂θ`` (or ``update[name]`` when given, e.g. an optimiser's actual step).
    The model is never mutated (``functional_call``); it runs in its current mode, and BN
    running statistics are left untouched. Returns one dict per layer: ``layer``,
    ``cosine`` (cos(G, G′), 1 = no shift), ``rel_diff`` (‖G − G′‖/‖G‖), ``diff``
    (‖G − G′‖) and ``grad_norm`` (‖G‖).
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    groups = layer_groups(model)
    bad = [i for i in layers if not 0 < i < len(groups)]
    if bad:
        raise ValueError(f"layers must be in 1..{len(groups) - 1} (layer 0 has nothing before it), got {bad}")
    params = {n: p.detach() for n, p in params.items()}
    with frozen_batchnorm_buffers(model):
        def grads(p: dict[str, Tensor], wrt: Sequence[str]) -> list[Tensor]:
            leaves = {n: p[n].clone().requires_grad_(n in wrt) for n in p}
            out = loss(functional_call(model, leaves, (x,)), y)
            return list(torch.autograd.grad(out, [leaves[n] for n in wrt]))

        names = list(params)
        g_all = dict(zip(names, grads(params, names)))
        step = update if update is not None else {n: -lr * g for n, g in g_all.items()}
        rows = []
        for i in layers:
            w = groups[i][0]
            before = {n for g in groups[:i] for n in g}
            moved = {n: (p + step[n] if n in before else p) for n, p in params.items()}
            (g2,) = grads(moved, [w])
            g1 = g_all[w]
            diff = (g1 - g2).norm().item()
            norm = g1.norm().item()
            cos = F.cosine_similarity(g1.flatten(), g2.flatten(), dim=0).item()
            rows.append({"layer": i, "cosine": cos, "rel_diff": diff / norm if norm > 0 else math.nan,
                         "diff": diff, "grad_norm": norm})
    return rows


def ics_summary(df: pd.DataFrame, part: str, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Per (arm, seed) for one ``part``: the lowest cos(G, G′), the mean ‖G − G′‖/‖G‖ over
    all measured steps and ``layers`` (default: all), and the last measured loss."""
    d = df[df["part"] == part]
    if layers is not None:
        d = d[d["layer"].isin(layers)]
    if d.empty:
        raise ValueError(f"no ICS rows for part {part!r} and layers {layers}")
    g = d.groupby(["arm", "seed"], sort=False)
    last = d[d["step"] == d["step"].max()].groupby(["arm", "seed"], sort=False)["loss"].first()
    return pd.DataFrame({"min_cosine": g["cosine"].min(), "mean_cosine": g["cosine"].mean(),
                         "mean_rel_diff": g["rel_diff"].mean(), "final_loss": last}).reset_index()


def _dln_loss(out: Tensor, y: Tensor) -> Tensor:
    """Mean over samples of the squared error summed over output coordinates, ‖Wx − Ax‖²."""
    return ((out - y) ** 2).sum(1).mean()


def train_deep_linear(model: Net, x: Tensor, y: Tensor, *, lr: float, steps: int,
                      measure_at: Sequence[int], layers: Sequence[int]) -> pd.DataFrame:
    """Full-batch gradient descent on the deep linear network, measuring ICS on the way.

    This is an *analysis* loop (plain GD on one fixed batch, parameters held in a dict and
    the model never mutated), kept this small on purpose; real training goes through
    :func:`bnlib.train.train`. At every step in ``measure_at`` (0 = before any update) it
    records :func:`ics_measure` for ``layers`` and the loss. Returns rows ``step, loss,
    layer, cosine, rel_diff, diff, grad_norm`` (``diverged`` True if the loss went
    non-finite, after which the run stops).
    """
    if steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    model.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = list(params)
    rows, marks = [], set(measure_at)
    with frozen_batchnorm_buffers(model):
        for t in range(steps + 1):
            leaves = {n: p.requires_grad_(True) for n, p in params.items()}
            value = _dln_loss(functional_call(model, leaves, (x,)), y)
            if not torch.isfinite(value):
                return pd.DataFrame(rows).assign(diverged=True)
            grads = torch.autograd.grad(value, [leaves[n] for n in names])
            params = {n: p.detach() for n, p in leaves.items()}
            if t in marks:
                for r in ics_measure(model, params, x, y, loss=_dln_loss, lr=lr, layers=layers):
                    rows.append({"step": t, "loss": value.item(), **r})
            if t < steps:
                params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    return pd.DataFrame(rows).assign(diverged=False)


class ICSProbe:
    """Training callback: :func:`ics_measure` every ``every`` steps on the step's own batch.

    It runs after the optimiser step, at the new parameters, with the plain SGD step
    ``−lr·∇L`` as the update of the earlier layers (pass a momentum-free optimiser).
    """

    def __init__(self, layers: Sequence[int], lr: float, *, every: int = 25,
                 loss: Callable = F.cross_entropy) -> None:
        self.layers, self.lr, self.every, self.loss = list(layers), lr, every, loss
        self.rows: list[dict] = []

    def __call__(self, info: StepInfo) -> None:
        if info.step % self.every and info.step != 1:
            return
        model = info.model
        params = dict(model.named_parameters())
        for r in ics_measure(model, params, info.x, info.y, loss=self.loss, lr=self.lr,
                             layers=self.layers):
            self.rows.append({"step": info.step, "loss": info.loss.item(), **r})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


@dataclass(frozen=True)
class ICSConfig(Config):
    """Quick preset: Santurkar's deep linear network (d = 10, 25 layers, 1000 samples,
    full-batch GD, Glorot init; BN before each hidden layer's identity "activation") plus
    the same measure on a small ReLU MLP on digits (SGD, same LR for both arms).

    Santurkar et al. ran the DLN for 10,000 steps at LR 1e-6 or 1e-7 (the full preset
    runs 10,000 steps at 1e-5); the quick preset takes 100 steps at 1e-4 so that the
    same phenomenon shows within seconds. The DLN uses PyTorch's BN layer, numerically the
    same as bnlib's (chapter 1) but faster on these tiny 10-unit layers."""

    dln_dim: int = 10
    dln_layers: int = 25                    # weight matrices, the head included
    dln_samples: int = 1000
    dln_lr: float = 1e-4
    dln_steps: int = 100
    dln_measure_at: tuple[int, ...] = (0, 10, 25, 50, 75, 100)
    dln_probe_layers: tuple[int, ...] = (4, 9, 17)
    mlp_data: str = "digits"
    mlp_depth: int = 6
    mlp_width: int = 64
    mlp_lr: float = 0.05
    mlp_steps: int = 150                    # 7 probes (every 25 steps) per run
    mlp_batch_size: int = 64
    mlp_every: int = 25
    mlp_probe_layers: tuple[int, ...] = (2, 4)
    parts: tuple[str, ...] = ("dln", "mlp")
    seeds: tuple[int, ...] = tuple(range(8))  # 8 paired seeds for the paired intervals

    @classmethod
    def full(cls) -> "ICSConfig":
        return cls(dln_lr=1e-5, dln_steps=10_000,
                   dln_measure_at=(0, 10, 100, 500, 1000, 2000, 5000, 10_000),
                   mlp_data="mnist", mlp_depth=10, mlp_width=256, mlp_steps=5000, mlp_every=250,
                   mlp_batch_size=128, mlp_probe_layers=(3, 6, 9))


def _dln_data(cfg: ICSConfig) -> tuple[Tensor, Tensor]:
    """The first ``dln_samples`` training examples of ``bnlib.data.load("deep_linear")``
    (generated large enough that its training split holds that many)."""
    need = math.ceil(cfg.dln_samples / 0.65) + 10  # the training split is 65 % of the data
    ds = datasets.load("deep_linear", preprocessing="raw", n=need, dim=cfg.dln_dim)
    if len(ds.train) < cfg.dln_samples:
        raise ValueError(f"deep_linear gave {len(ds.train)} training samples, need {cfg.dln_samples}")
    return ds.train.x[:cfg.dln_samples], ds.train.y[:cfg.dln_samples]


def _ics_run(*, seed: int, cfg: ICSConfig, part: str, norm: str) -> pd.DataFrame:
    dev = resolve_device(cfg.device)
    if part == "dln":
        x, y = (t.to(dev) for t in _dln_data(cfg))
        net = seeded(seed, lambda: mlp(cfg.dln_dim, cfg.dln_dim, depth=cfg.dln_layers - 1,
                                       width=cfg.dln_dim, activation="identity", norm=norm,
                                       init="xavier", norm_impl="torch")).to(dev)
        return train_deep_linear(net, x, y, lr=cfg.dln_lr, steps=cfg.dln_steps,
                                 measure_at=cfg.dln_measure_at, layers=cfg.dln_probe_layers)
    if part == "mlp":
        ds = datasets.load(cfg.mlp_data)
        net = seeded(seed, lambda: mlp(ds.num_features, ds.num_classes, depth=cfg.mlp_depth,
                                       width=cfg.mlp_width, norm=norm))
        probe = ICSProbe(cfg.mlp_probe_layers, cfg.mlp_lr, every=cfg.mlp_every)
        hist = train(net, ds, steps=cfg.mlp_steps, lr=cfg.mlp_lr, batch_size=cfg.mlp_batch_size,
                     seed=seed, device=dev, callbacks=[probe])
        return probe.frame().assign(diverged=bool(hist["diverged"].any()))
    raise ValueError(f"part must be 'dln' or 'mlp', got {part!r}")


def plot_ics(df: pd.DataFrame, part: str, *, y: str = "cosine", ax=None, legend: bool = True):
    """cos(G, G′) (or ``y``) against the training step for one ``part`` (``"dln"`` or
    ``"mlp"``): one colour per arm, one line style per layer; line = mean over seeds,
    band = min–max range over seeds (it stays inside [−1, 1])."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    ax = ax or plt.gca()
    d = df[df["part"] == part].assign(layer=lambda d: "layer " + d["layer"].astype(str))
    sns.lineplot(data=d, x="step", y=y, hue="arm", style="layer", errorbar=("pi", 100), ax=ax,
                 palette={a: _color(a) for a in d["arm"].unique()}, marker="o")
    if y == "cosine":
        ax.axhline(1, color="k", lw=0.5)
        ax.set_ylabel("cos(G, G′)")
    ax.set_title("deep linear network, full-batch GD" if part == "dln" else "ReLU MLP on digits, SGD")
    if legend:
        ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    else:
        ax.get_legend().remove()
    return ax


def _plot_ics(df: pd.DataFrame):
    from .. import plots
    return plots.facets(dict.fromkeys(df["part"]), lambda part, ax: plot_ics(df, part, ax=ax))


@register("ics_gradient", ICSConfig, title="Gradient-based internal covariate shift (Santurkar Def. 2.1)",
          chapter="06_covariate_shift", plot=_plot_ics)
def ics_gradient(cfg: ICSConfig) -> pd.DataFrame:
    """cos(G, G′) and ‖G − G′‖/‖G‖ for plain and BN networks over training.

    Rows: ``part`` (``"dln"``: deep linear network, full-batch GD; ``"mlp"``: ReLU MLP on
    digits, SGD via :func:`bnlib.train.train`), ``arm`` (``plain``/``BN``), ``seed``,
    ``step``, ``loss``, ``layer``, ``cosine``, ``rel_diff``, ``diff``, ``grad_norm``.
    """
    bad = set(cfg.parts) - {"dln", "mlp"}
    if bad:
        raise ValueError(f"parts must be among 'dln', 'mlp', got {sorted(bad)}")
    arms = {"plain": {"norm": "none"}, "BN": {"norm": "batch"}}
    # ``part`` is a grid key (not a ``common`` argument) so that checkpointed sweep cells of
    # the two parts get different names
    return sweep(_ics_run, seeds=cfg.seeds, arms=arms, grid={"part": cfg.parts},
                 common={"cfg": cfg}, desc="ics_gradient")
