"""Chapter 13: what batch norm costs per step, in memory traffic, and at inference.

* ``step_cost`` — forward, backward and whole-step time of an MLP and a small CNN with and
  without BN (torch's fused BN and bnlib's from-scratch one), measured with the
  interleaved harness of :mod:`bnlib.timing` (medians of many repeats; CPU time on the CPU),
  on the CPU and, when one is present, on a CUDA GPU.
* ``fold_speedup`` — inference time of a BN network before and after
  :func:`bnlib.inference.fold_batchnorm`, and the largest output difference the fold makes.
* :func:`intensity_table` — an analytic count of FLOPs and bytes moved per layer: why BN's
  cost is set by memory traffic rather than arithmetic.

The time to a target accuracy (the cost set against the steps BN saves) comes from the
``speed`` experiment of chapter 4, which the chapter fetches through the results cache
(``bnlib.experiments.run("speed")``); this module neither copies nor imports it.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..inference import fold_batchnorm
from ..models import cnn, mlp
from ..timing import paired_ratio, step_phases, time_interleaved
from ..train import resolve_device
from . import Config, register

__all__ = ["CostConfig", "FoldConfig", "step_cost", "fold_speedup", "intensity_table",
           "cost_devices", "overheads", "COST_ARMS"]

#: arm name -> (norm, BN implementation): "BN" is torch's fused layer, the one people time
COST_ARMS = {"plain": ("none", "torch"), "BN": ("batch", "torch"),
             "BN (bnlib)": ("batch", "bnlib")}


def cost_devices(device: str = "auto") -> list[torch.device]:
    """The devices to time on: always the CPU, plus the CUDA GPU when one is present
    (``device="cpu"`` keeps only the CPU; an explicit ``"cuda"`` requires a GPU)."""
    if device == "cpu":
        return [torch.device("cpu")]
    if device == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    dev = resolve_device(device)
    return [torch.device("cpu")] + ([dev] if dev.type != "cpu" else [])


@dataclass(frozen=True)
class CostConfig(Config):
    """Quick preset: a 6×256 MLP (batch 128) and a 3-block CNN on 1×28×28 (batch 32)."""

    mlp_in: int = 784                 # MNIST-sized flat inputs
    mlp_depth: int = 6                # enough layers that BN's share is not a rounding error
    mlp_width: int = 256
    mlp_batch: int = 128
    cnn_shape: tuple[int, int, int] = (1, 28, 28)   # MNIST-shaped images
    cnn_channels: tuple[int, ...] = (16, 32, 64)    # narrow convolutions: few FLOPs per value
    cnn_batch: int = 32
    models: tuple[str, ...] = ("mlp", "cnn")
    arms: tuple[str, ...] = tuple(COST_ARMS)        # plain, torch's BN, bnlib's BN
    repeats: int = 12                 # interleaved repeats: medians need a dozen
    number: int = 2                   # calls per repeat

    # GPU-sized: a wider MLP, CIFAR-shaped images with wider convolutions, more repeats
    FULL = {"mlp_width": 1024, "mlp_batch": 512, "cnn_shape": (3, 32, 32),
            "cnn_channels": (64, 128, 256), "cnn_batch": 128,
            "repeats": 50, "number": 5, "seeds": (0,)}


def _net(cfg: "CostConfig | FoldConfig", kind: str, norm: str, impl: str, batch: int
         ) -> tuple[nn.Module, torch.Tensor, torch.Generator]:
    """The ``kind`` network (seed 0), a random input batch and the generator that made it."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlp":
        net = mlp(cfg.mlp_in, 10, depth=cfg.mlp_depth, width=cfg.mlp_width, norm=norm,
                  norm_impl=impl)
        return net, torch.randn(batch, cfg.mlp_in, generator=g), g
    if kind == "cnn":
        net = cnn(cfg.cnn_shape[0], 10, channels=cfg.cnn_channels, norm=norm, norm_impl=impl)
        return net, torch.randn(batch, *cfg.cnn_shape, generator=g), g
    raise ValueError(f"model must be 'mlp' or 'cnn', got {kind!r}")


def _cost_model(cfg: CostConfig, kind: str, arm: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    n = cfg.mlp_batch if kind == "mlp" else cfg.cnn_batch
    net, x, g = _net(cfg, kind, *COST_ARMS[arm], n)
    return net, x, torch.randint(0, 10, (n,), generator=g)


@register("step_cost", CostConfig, title="Per-step cost of BN: forward, backward, whole step",
          chapter="13_cost", plot=lambda df: _plot_cost(df))
def step_cost(cfg: CostConfig) -> pd.DataFrame:
    """Time every (model, arm, phase) interleaved, per device.

    One row per (``device``, ``model``, ``arm``, ``phase``, ``repeat``) with ``seconds``
    per call; ``phase`` is ``forward``, ``backward`` or ``step`` (see
    :func:`bnlib.timing.step_phases`). Within a device and model, all arms and
    phases are shuffled together in every repeat, so they share the machine's drift.
    """
    unknown = [a for a in cfg.arms if a not in COST_ARMS]
    if unknown or not cfg.arms:
        raise ValueError(f"arms must be a non-empty subset of {list(COST_ARMS)}, got {cfg.arms}")
    frames = []
    for dev in cost_devices(cfg.device):
        for kind in cfg.models:
            fns = {}
            for arm in cfg.arms:
                net, x, y = _cost_model(cfg, kind, arm)
                for phase, fn in step_phases(net, x, y, device=dev).items():
                    fns[(arm, phase)] = fn
            keyed = {f"{a}|{p}": fn for (a, p), fn in fns.items()}
            df = time_interleaved(keyed, repeats=cfg.repeats, number=cfg.number, device=dev)
            df[["arm", "phase"]] = df["name"].str.split("|", expand=True)
            frames.append(df.drop(columns="name").assign(
                device=dev.type, model=kind, threads=torch.get_num_threads()))
    return pd.concat(frames, ignore_index=True)


def overheads(df: pd.DataFrame, baseline: str = "plain") -> pd.DataFrame:
    """Per (device, model, phase, arm): the median time and the median paired ratio of the
    arm's time to ``baseline``'s within the same repeat (1.25 = 25 % slower)."""
    rows = []
    for (dev, model, phase), g in df.groupby(["device", "model", "phase"], sort=False):
        med = g.groupby("arm")["seconds"].median()
        for arm in g["arm"].unique():
            if arm == baseline:
                continue
            r = paired_ratio(g, arm, baseline, name="arm")
            rows.append({"device": dev, "model": model, "phase": phase, "arm": arm,
                         "baseline_us": med[baseline] * 1e6, "arm_us": med[arm] * 1e6,
                         "ratio": r["median"], "ratio_q25": r["q25"], "ratio_q75": r["q75"]})
    return pd.DataFrame(rows)


def _plot_cost(df: pd.DataFrame):
    import seaborn as sns

    from .. import plots
    panels = list(df[["device", "model"]].drop_duplicates().itertuples(index=False, name=None))
    fig, axes = plots.new_axes(len(panels), width=5.0)
    for ax, (dev, model) in zip(axes[0], panels):
        d = df[(df["model"] == model) & (df["device"] == dev)]
        d = d.assign(ms=d["seconds"] * 1e3)
        arms = [a for a in COST_ARMS if a in set(d["arm"])]
        sns.barplot(data=d, x="phase", y="ms", hue="arm", estimator="median",
                    errorbar=("pi", 50), ax=ax, order=["forward", "backward", "step"],
                    hue_order=arms, palette={a: plots.color(a) for a in arms})
        ax.set_title(f"{model.upper()} on the {dev.upper()}")
        ax.set_ylabel("milliseconds per call (median)")
        ax.set_xlabel("")
    return fig


# --- inference: folding BN away ---------------------------------------------------------

@dataclass(frozen=True)
class FoldConfig(Config):
    """Quick preset: the chapter's MLP and CNN with BN, eval mode, batch 128."""

    mlp_in: int = 784                 # the step_cost networks, so the two tables line up
    mlp_depth: int = 6
    mlp_width: int = 256
    cnn_shape: tuple[int, int, int] = (1, 28, 28)
    cnn_channels: tuple[int, ...] = (16, 32, 64)
    batch: int = 128                  # a serving batch
    warm_batches: int = 5             # train-mode passes that give the BN non-trivial statistics
    repeats: int = 12                 # interleaved repeats
    number: int = 2                   # calls per repeat

    FULL = {"mlp_width": 1024, "cnn_shape": (3, 32, 32),
            "cnn_channels": (64, 128, 256), "batch": 512, "repeats": 50,
            "number": 5, "seeds": (0,)}


def _bn_model(cfg: FoldConfig, kind: str) -> tuple[nn.Module, torch.Tensor]:
    net, x, g = _net(cfg, kind, "batch", "torch", cfg.batch)
    with torch.no_grad():
        net.train()
        for _ in range(cfg.warm_batches):     # running statistics away from (0, 1)
            net(1.5 * torch.randn(x.shape, generator=g) + 0.3)
        for m in net.modules():               # and γ, β away from (1, 0)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
    return net.eval(), x


@register("fold_speedup", FoldConfig, title="Inference with BN folded into the layer before it",
          chapter="13_cost", plot=lambda df: _plot_fold(df))
def fold_speedup(cfg: FoldConfig) -> pd.DataFrame:
    """Eval-mode forward time of each model with BN and with BN folded, interleaved.

    One row per (``device``, ``model``, ``arm``, ``repeat``): ``arm`` is ``"BN"`` or
    ``"folded"``; ``max_abs_diff`` is the largest |output difference| between the two on
    the timed batch, ``max_abs_out`` the largest |output| (for a relative reading).
    """
    frames = []
    for dev in cost_devices(cfg.device):
        for kind in ("mlp", "cnn"):
            net, x = _bn_model(cfg, kind)
            folded = fold_batchnorm(net)
            net, folded, xd = net.to(dev), folded.to(dev), x.to(dev)
            with torch.inference_mode():
                ref, out = net(xd), folded(xd)
                diff = (ref - out).abs().max().item()
                scale = ref.abs().max().item()

            def runner(model):
                def fn():
                    with torch.inference_mode():
                        model(xd)
                return fn

            df = time_interleaved({"BN": runner(net), "folded": runner(folded)},
                                  repeats=cfg.repeats, number=cfg.number, device=dev)
            frames.append(df.rename(columns={"name": "arm"}).assign(
                device=dev.type, model=kind, max_abs_diff=diff, max_abs_out=scale,
                threads=torch.get_num_threads()))
    return pd.concat(frames, ignore_index=True)


def _plot_fold(df: pd.DataFrame):
    import seaborn as sns

    from .. import plots
    fig, axes = plots.new_axes(1)
    d = df.assign(ms=df["seconds"] * 1e3, where=df["model"] + " / " + df["device"])
    sns.barplot(data=d, x="where", y="ms", hue="arm", estimator="median", errorbar=("pi", 50),
                ax=axes[0, 0], hue_order=["BN", "folded"],
                palette={a: plots.color(a) for a in ("BN", "folded")})
    axes[0, 0].set_ylabel("milliseconds per forward pass")
    axes[0, 0].set_xlabel("")
    return fig


# --- why BN is memory-bound: an analytic count ------------------------------------------

def intensity_table(*, batch: int = 64, features: int = 256, channels: int = 64,
                    hw: int = 32, kernel: int = 3, bytes_per_value: int = 4) -> pd.DataFrame:
    """FLOPs, bytes moved and FLOPs per byte of the layers of one block, counted by hand.

    Two settings: a Linear layer ``features → features`` on ``batch`` rows, and a
    ``kernel×kernel`` convolution ``channels → channels`` on ``batch`` maps of ``hw×hw``
    (same padding). Each is followed by a BN on its output. Counting conventions (per
    output element ``E`` of the layer, one multiply-add = 2 FLOPs, each tensor read or
    written once per pass, per-channel vectors and weights of BN negligible):

    * Linear: ``2·N·C_in·C_out`` FLOPs; bytes = read input + read weights + write output;
    * Conv: ``2·N·H·W·C_out·C_in·k²`` FLOPs; bytes likewise (input, weights, output);
    * BN forward (training): a statistics pass reads ``x`` (mean and sum of squares:
      3 FLOPs), a normalising pass reads ``x`` and writes ``y = a·x + b`` (2 FLOPs), plus
      1 FLOP for centring the sum of squares: ~6 FLOPs, 3 tensor accesses per element;
    * BN backward: a reduction pass reads ``dy`` and ``x`` (Σdy, Σdy·x̂: 5 FLOPs), a second
      pass reads both again and writes ``dx`` (6 FLOPs): ~11 FLOPs, 5 accesses;
    * BN at inference (unfolded): read ``x``, write ``y = a·x + b``: 2 FLOPs, 2 accesses;
      folded into the layer: nothing;
    * ReLU, for scale: 1 FLOP, 2 accesses.

    The layer's backward pass computes the gradients of its input and of its weights (twice
    the forward FLOPs; reads ``dy``, ``x`` and ``W``, writes ``dx`` and ``dW``).

    Returns one row per (setting, layer) with ``flops``, ``bytes``, ``flops_per_byte``, and,
    for the rows after the weight layer, their share of the FLOPs and bytes of
    (weight layer + that row) in the matching phase (forward or backward).
    """
    for name, v in dict(batch=batch, features=features, channels=channels, hw=hw,
                        kernel=kernel, bytes_per_value=bytes_per_value).items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    b = bytes_per_value
    n_hw = batch * hw * hw
    settings = {  # (forward FLOPs, forward bytes, backward FLOPs, backward bytes, output elements)
        f"Linear {features}→{features}, batch {batch}": (
            2 * batch * features * features,
            b * (2 * batch * features + features * features),
            4 * batch * features * features,          # grad of input and of weights
            b * (4 * batch * features + 2 * features * features),  # read dy, x, W; write dx, dW
            batch * features),
        f"Conv {kernel}×{kernel} {channels}→{channels}, {batch}×{hw}×{hw}": (
            2 * n_hw * channels * channels * kernel * kernel,
            b * (2 * n_hw * channels + channels * channels * kernel * kernel),
            4 * n_hw * channels * channels * kernel * kernel,
            b * (4 * n_hw * channels + 2 * channels * channels * kernel * kernel),
            n_hw * channels),
    }
    per_elem = {  # name: (FLOPs, tensor accesses) per element, and the layer phase it goes with
        "BN forward (training)": (6, 3, "forward"), "BN backward": (11, 5, "backward"),
        "BN at inference (unfolded)": (2, 2, "forward"),
        "BN folded into the layer": (0, 0, "forward"), "ReLU forward": (1, 2, "forward"),
    }
    rows = []
    for setting, (ff, fb, bf, bb, elems) in settings.items():
        name = setting.split(" ")[0]
        layer = {"forward": (ff, fb), "backward": (bf, bb)}
        for phase, (f, by) in layer.items():
            rows.append({"setting": setting, "layer": f"{name} {phase}", "flops": f, "bytes": by,
                         "flop_share": float("nan"), "byte_share": float("nan")})
        for lname, (f, acc, phase) in per_elem.items():
            lf, lb = layer[phase]
            fl, by = f * elems, acc * b * elems
            rows.append({"setting": setting, "layer": lname, "flops": fl, "bytes": by,
                         "flop_share": fl / (fl + lf), "byte_share": by / (by + lb)})
    df = pd.DataFrame(rows)
    df["flops_per_byte"] = (df["flops"] / df["bytes"]).where(df["bytes"] > 0)
    df = df[["setting", "layer", "flops", "bytes", "flops_per_byte", "flop_share", "byte_share"]]
    return df
