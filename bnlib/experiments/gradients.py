"""Chapter 9: what BN does to gradients, during training and at initialisation.

* ``landscape`` — Santurkar et al.'s (2018) loss-landscape probes, taken by a training
  callback (:class:`LandscapeProbe`) every ``probe_every`` steps of
  :func:`bnlib.train.train`: from the current parameters θ with gradient g (on the step's
  batch), move to θ′ = θ − c·lr·g for multipliers c ∈ [0.5, 4] and record the range of
  the loss along that line, the *gradient predictiveness* max‖∇L(θ′) − g‖ and the
  *effective β-smoothness* max‖∇L(θ′) − g‖/‖θ′ − θ‖. A second callback
  (:class:`GradNormTracker`) records the gradient norm at every step, for the article's
  "less gradient fluctuation" (:func:`gradient_fluctuation`).

* ``grad_explosion`` — gradients at initialisation in a deep MLP with BN before every
  ReLU: per-layer ‖∂L/∂W_l‖ (:func:`bnlib.probes.gradient_norms`) and the geometric
  rate at which they grow towards the input (:func:`growth_rates`), against the
  mean-field prediction √(π/(π−1)) ≈ 1.21 per layer of Yang et al. (2019).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..models import MLPSpec, mlp
from ..probes import Probe, frozen_batchnorm_buffers, gradient_norms, weight_norms
from ..protocol import Protocol, probed
from ..train import StepInfo, TrainSpec, resolve_device, seeded
from . import Config, register, sweep

#: Readable axis labels for the measured columns.
LABELS = {
    "loss_range": "loss range along the step\n(max − min of L over the line)",
    "grad_pred": "gradient drift along the step\nmax ‖∇L(θ′) − g‖",
    "grad_pred_rel": "relative gradient drift\nmax ‖∇L(θ′) − g‖ / ‖g‖",
    "beta_eff": "effective β-smoothness\nmax ‖∇L(θ′) − g‖ / ‖θ′ − θ‖",
    "grad_norm": "gradient norm ‖g_t‖ (all parameters)",
    "rel_grad": "relative gradient ‖∂L/∂W_l‖ / ‖W_l‖",
}

#: Yang et al. (2019): with BN before ReLU, ‖∂L/∂W‖ grows by √(π/(π−1)) per layer towards
#: the input (the squared norm by π/(π−1)), in the limit of wide layers and large batches.
RELU_BN_RATE = math.sqrt(math.pi / (math.pi - 1))


# --- landscape probes ----------------------------------------------------------------------

def landscape_probe(model: nn.Module, x: Tensor, y: Tensor, *, lr: float,
                    multipliers: Sequence[float] = tuple(np.linspace(0.5, 4, 8)),
                    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> dict:
    """Santurkar et al.'s three probes of the landscape along the gradient, at the model's
    current parameters θ and on the batch ``(x, y)``.

    With g = ∇L(θ) and θ′_c = θ − c·lr·g for each multiplier c:

    * ``loss_range``: max_c L(θ′_c) − min_c L(θ′_c);
    * ``grad_pred``: max_c ‖∇L(θ′_c) − g‖ (gradient predictiveness: small = the gradient
      stays a good guide along the step); ``grad_pred_rel`` divides it by ‖g‖;
    * ``beta_eff``: max_c ‖∇L(θ′_c) − g‖ / ‖θ′_c − θ‖ (effective β-smoothness).

    Also returned: ``loss`` = L(θ) and ``grad_norm`` = ‖g‖. All gradients are over every
    parameter (BN's γ and β included). The model runs in training mode on the same batch;
    it is never mutated (``functional_call`` on a parameter dict) and BN running
    statistics are restored afterwards.
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    mults = [float(c) for c in multipliers]
    if not mults or any(not (c > 0 and math.isfinite(c)) for c in mults):
        raise ValueError(f"multipliers must be positive finite numbers, got {multipliers}")
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    was = model.training
    model.train()

    def loss_and_grad(p: dict[str, Tensor]) -> tuple[float, Tensor]:
        leaves = {n: t.clone().requires_grad_(True) for n, t in p.items()}
        value = loss(functional_call(model, leaves, (x,)), y)
        grads = torch.autograd.grad(value, [leaves[n] for n in names])
        return value.item(), torch.cat([g.flatten() for g in grads])

    try:
        with frozen_batchnorm_buffers(model):
            base, g = loss_and_grad(params)
            g_norm = g.norm().item()
            offsets = dict(zip(names, torch.split(g, [params[n].numel() for n in names])))
            losses, dg = [], []
            for c in mults:
                moved = {n: p - c * lr * offsets[n].view_as(p) for n, p in params.items()}
                value, g2 = loss_and_grad(moved)
                losses.append(value)
                dg.append((g2 - g).norm().item())
    finally:
        model.train(was)
    dist = [c * lr * g_norm for c in mults]
    finite = all(math.isfinite(v) for v in losses + dg)
    return {"loss": base, "grad_norm": g_norm,
            "loss_range": max(losses) - min(losses) if finite else math.inf,
            "grad_pred": max(dg) if finite else math.inf,
            "grad_pred_rel": max(dg) / g_norm if finite and g_norm > 0 else math.inf,
            "beta_eff": max(d / s for d, s in zip(dg, dist)) if finite and g_norm > 0 else math.inf}


class LandscapeProbe(Probe):
    """Training callback: :func:`landscape_probe` every ``every`` steps (and after step 1),
    at the freshly updated parameters, on the batch the step just used."""

    def __init__(self, lr: float, *, every: int = 25,
                 multipliers: Sequence[float] = tuple(np.linspace(0.5, 4, 8)),
                 loss: Callable = F.cross_entropy) -> None:
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        self.lr, self.every, self.multipliers, self.loss = lr, every, tuple(multipliers), loss
        self.rows: list[dict] = []

    def __call__(self, info: StepInfo) -> None:
        if info.step % self.every and info.step != 1:
            return
        r = landscape_probe(info.model, info.x, info.y, lr=self.lr,
                            multipliers=self.multipliers, loss=self.loss)
        self.rows.append({"step": info.step, **r})


class GradNormTracker(Probe):
    """Training callback: the total gradient norm ‖g_t‖ of every step (read from the
    parameters' ``.grad``, which still holds the step's gradient when callbacks run)."""

    name = "gradnorm"  # the ``record`` of its rows in a result

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @torch.no_grad()
    def __call__(self, info: StepInfo) -> None:
        grads = [p.grad for p in info.model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.rows.append({"step": info.step, "grad_norm": norm.item(), "loss": info.loss.item()})


def gradient_fluctuation(df: pd.DataFrame, *, start: int = 1, end: int | None = None) -> pd.DataFrame:
    """Step-to-step variability of the gradient norm, per run (``arm``, ``seed``).

    From ``record == "gradnorm"`` rows with ``start ≤ step ≤ end``: ``jump`` is the median
    over steps of |log ‖g_{t+1}‖ − log ‖g_t‖| (scale-free: a jump of 0.1 is a 10 % change,
    whatever the norm's size, and slow drifts over training barely count), ``cv`` is the
    coefficient of variation std/mean of ‖g_t‖ over the window, and ``mean_norm`` its mean.
    """
    g = df[df["record"] == "gradnorm"] if "record" in df else df
    g = g[(g["step"] >= start) & (g["step"] <= (end if end is not None else g["step"].max()))]
    if g.empty:
        raise ValueError(f"no gradient-norm rows between steps {start} and {end}")
    keys = [k for k in ("arm", "lr", "seed") if k in g]

    def one(run: pd.DataFrame) -> pd.Series:
        v = run.sort_values("step")["grad_norm"].to_numpy()
        logs = np.log(v[v > 0])
        return pd.Series({"jump": float(np.median(np.abs(np.diff(logs)))) if len(logs) > 1 else math.nan,
                          "cv": float(v.std() / v.mean()), "mean_norm": float(v.mean())})

    return g.groupby(keys, sort=False)[["step", "grad_norm"]].apply(one).reset_index()


def at_matched_loss(df: pd.DataFrame, lo: float, hi: float,
                    metrics: Sequence[str] = ("loss_range", "grad_pred", "grad_pred_rel", "beta_eff"),
                    ) -> pd.DataFrame:
    """Compare arms *at the same training loss*: per (arm, seed), the median of each metric
    over the landscape probes (``record == "probe"``, step 1 excluded) whose loss lies in
    ``[lo, hi]``, with ``n`` the number of such probes. A run with none gets NaN."""
    if not 0 <= lo < hi:
        raise ValueError(f"need 0 ≤ lo < hi, got lo={lo}, hi={hi}")
    p = df[(df["record"] == "probe") & (df["step"] > 1)]
    runs = p[["arm", "seed"]].drop_duplicates()
    band = p[(p["loss"] >= lo) & (p["loss"] <= hi)]
    med = band.groupby(["arm", "seed"], sort=False)[list(metrics)].median()
    med["n"] = band.groupby(["arm", "seed"], sort=False).size()
    return runs.merge(med.reset_index(), on=["arm", "seed"], how="left").fillna({"n": 0})


def _draw_runs(d: pd.DataFrame, x: str, y: str, ax, xlabel: str):
    """Mean over seeds per arm with the min–max range as a band (it stays positive on the
    log scale), log y, labelled from :data:`LABELS`."""
    from .. import plots
    plots.draw_curves(d, x=x, y=y, split=None, errorbar=("pi", 100), logy=True, ax=ax)
    ax.set(ylabel=LABELS.get(y, y) + " (log)", xlabel=xlabel)
    return ax


def plot_landscape(df: pd.DataFrame, metric: str, *, x: str = "step", ax=None, title: str | None = None):
    """One landscape metric of the probes against ``x`` (``"step"``: mean over seeds with
    the min–max range as a band; ``"loss"``: every probe as a point, to compare arms at
    equal training loss); log y."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .. import plots
    ax = ax or plt.gca()
    p = df[df["record"] == "probe"]
    if x == "step":
        _draw_runs(p, "step", metric, ax, "training step")
    else:
        sns.scatterplot(data=p[p["step"] > 1], x=x, y=metric, hue="arm", ax=ax,
                        palette={a: plots.color(a) for a in p["arm"].unique()})
        ax.set(xscale="log", yscale="log", ylabel=LABELS.get(metric, metric) + " (log)",
               xlabel="training loss at the probe (falls to the right)")
        ax.invert_xaxis()
    if title:
        ax.set_title(title)
    return ax


def plot_gradient_norms(df: pd.DataFrame, ax=None):
    """‖g_t‖ at every step (``record == "gradnorm"``): mean over seeds with the min–max
    range as a band, log y."""
    import matplotlib.pyplot as plt
    return _draw_runs(df[df["record"] == "gradnorm"], "step", "grad_norm", ax or plt.gca(),
                      "training step")


def _landscape_axes(df: pd.DataFrame):
    from .. import plots
    return plots.facets(("loss_range", "grad_pred_rel", "beta_eff"),
                        lambda col, ax: plot_landscape(df, col, ax=ax), width=4.5)


@dataclass(frozen=True)
class LandscapeConfig(Protocol):
    """Plain vs BN at the same SGD learning rate, paired seeds, probed along the gradient, on
    digits (small and fast; the effect shows on it)."""

    model: MLPSpec = MLPSpec(depth=6, width=64, activation="relu")  # deep enough that plain trains roughly; small for 8 seeds
    train: TrainSpec = TrainSpec(lr=0.05, batch_size=128, steps=150, eval_every=50,
                                 eval_splits=("val",))  # no momentum: "the step" is exactly -lr*g
    probe_every: int = 25                    # 7 probes per run (steps 1, 25, ..., 150)
    multipliers: tuple[float, ...] = tuple(float(c) for c in np.linspace(0.5, 4, 8))  # Santurkar's range
    band: tuple[float, float] = (0.05, 0.5)  # training-loss band where both arms are compared
    fluct_margin: float = math.log(1.5)      # |Δ log jump| below which fluctuation "does not differ" (1.5×)

    FULL = {"data": "fashion_mnist", "model.width": 512, "train.steps": 5000,
            "train.eval_every": 250, "probe_every": 100}


@register("landscape", LandscapeConfig, title="Loss-landscape smoothness along the gradient (Santurkar)",
          chapter="09_gradients", plot=_landscape_axes)
def landscape(cfg: LandscapeConfig) -> pd.DataFrame:
    """Plain vs BN through :func:`bnlib.protocol.probed` with two probes per run.

    ``record`` says which kind of row: ``"history"`` (the training history), ``"probe"``
    (:func:`landscape_probe` every ``probe_every`` steps: ``step, loss, grad_norm,
    loss_range, grad_pred, grad_pred_rel, beta_eff``) and ``"gradnorm"`` (``step,
    grad_norm, loss`` at every step).
    """
    df = probed(cfg, lambda acfg, data: [
        LandscapeProbe(cfg.train.lr, every=cfg.probe_every, multipliers=cfg.multipliers),
        GradNormTracker()])
    return df.assign(kind=df["record"].where(df["record"] == "history"))


# --- gradients at initialisation ----------------------------------------------------------

@dataclass(frozen=True)
class ExplosionConfig(Config):
    """Deep MLPs at initialisation (Kaiming), one batch of Gaussian inputs with random labels."""

    depths: tuple[int, ...] = (50,)          # deep enough for a per-layer rate to compound
    widths: tuple[int, ...] = (128,)         # finite width (the theory's limit is infinite); 128 already matches
    batch_sizes: tuple[int, ...] = (128,)    # finite batch, likewise
    activations: tuple[str, ...] = ("relu", "tanh")  # the theory's case, and a saturating one
    num_classes: int = 10
    arms: tuple[str, ...] = ("plain", "BN", "residual + BN")
    seeds: tuple[int, ...] = tuple(range(8))  # 8 paired seeds (init and batch)
    rate_tolerance: float = 0.02             # how close to the mean-field rate counts as "matches"

    FULL = {"depths": (10, 25, 50, 100), "widths": (128, 1024),
            "batch_sizes": (8, 32, 128, 512)}


_EXPLOSION_ARMS = {"plain": {"norm": "none", "residual": False},
                   "BN": {"norm": "batch", "residual": False},
                   "residual + BN": {"norm": "batch", "residual": True},
                   "residual": {"norm": "none", "residual": True}}


def _explosion_run(*, seed: int, cfg: ExplosionConfig, norm: str, residual: bool, depth: int,
                   width: int, batch_size: int, activation: str) -> pd.DataFrame:
    dev = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, width, generator=gen).to(dev)
    y = torch.randint(0, cfg.num_classes, (batch_size,), generator=gen).to(dev)
    net = seeded(seed, lambda: mlp(width, cfg.num_classes, depth=depth, width=width,
                                   activation=activation, norm=norm, residual=residual)).to(dev)
    g, w = gradient_norms(net, x, y), weight_norms(net)
    return pd.DataFrame({"layer": np.arange(len(g)), "grad_norm": g, "weight_norm": w,
                         "rel_grad": g / w})


def growth_rates(df: pd.DataFrame, *, value: str = "rel_grad", first: int | None = None,
                 last: int | None = None) -> pd.DataFrame:
    """Per network: the geometric factor by which ``value`` (default the relative gradient
    ‖∂L/∂W_l‖/‖W_l‖, which does not depend on how the weights are scaled) grows per layer
    towards the input, exp(−slope) of a least-squares line through its log over layers
    ``first ≤ l ≤ last``. By default a tenth of the depth is left out at each end (layers
    5–45 of a 50-layer net). Also ``ratio``: first hidden layer's value over the last's."""
    keys = [k for k in ("arm", "activation", "depth", "width", "batch_size", "seed") if k in df]

    def one(run: pd.DataFrame) -> pd.Series:
        run = run.sort_values("layer")
        depth = int(run["layer"].max())  # the head's index = number of hidden layers
        margin = max(1, depth // 10)
        lo = first if first is not None else margin
        hi = last if last is not None else depth - margin
        mid = run[(run["layer"] >= lo) & (run["layer"] <= hi)]
        if len(mid) < 2:
            raise ValueError(f"need at least 2 layers between {lo} and {hi} to fit a rate")
        slope = np.polyfit(mid["layer"], np.log(mid[value]), 1)[0]
        g = run.set_index("layer")[value]
        return pd.Series({"rate": float(np.exp(-slope)), "ratio": float(g.iloc[0] / g.loc[depth - 1])})

    return df.groupby(keys, sort=False)[["layer", value]].apply(one).reset_index()


def plot_explosion(df: pd.DataFrame, activation: str, ax=None, value: str = "rel_grad"):
    """Per-layer relative gradient at initialisation for one activation (mean over seeds,
    band = min–max range), input layer on the left, log y."""
    import matplotlib.pyplot as plt
    ax = _draw_runs(df[df["activation"] == activation], "layer", value, ax or plt.gca(),
                    "layer l (0 = input side)")
    ax.set_title(f"{activation}, at initialisation")
    return ax


def _plot_explosion(df: pd.DataFrame):
    from .. import plots
    return plots.facets(dict.fromkeys(df["activation"]),
                        lambda act, ax: plot_explosion(df, act, ax=ax), width=5)


@register("grad_explosion", ExplosionConfig, title="Gradients at initialisation in deep BN networks (Yang 2019)",
          chapter="09_gradients", plot=_plot_explosion)
def grad_explosion(cfg: ExplosionConfig) -> pd.DataFrame:
    """Per-layer ‖∂L/∂W_l‖, ‖W_l‖ and their ratio at initialisation (input layer = 0, head last).

    Rows: ``arm, activation, depth, width, batch_size, seed, layer, grad_norm, weight_norm,
    rel_grad``; the seed fixes the network's initialisation and the Gaussian batch.
    """
    unknown = set(cfg.arms) - set(_EXPLOSION_ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; choose from {list(_EXPLOSION_ARMS)}")
    return sweep(_explosion_run, seeds=cfg.seeds, arms={a: _EXPLOSION_ARMS[a] for a in cfg.arms},
                 grid={"activation": cfg.activations, "depth": cfg.depths, "width": cfg.widths,
                       "batch_size": cfg.batch_sizes},
                 common={"cfg": cfg}, desc="grad_explosion")
