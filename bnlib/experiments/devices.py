"""Chapter 21: batch norm across devices.

Data-parallel training on ``k`` devices cuts every global batch of ``B`` examples into
``k`` slices of ``B / k``. A plain batch norm on each device normalises its slice with the
slice's statistics: that *is* ghost batch norm with ghost batches of ``B / k``
(:class:`bnlib.nn.GhostBatchNorm`, running statistics of ghost batch 0 as on rank 0). A
synchronised batch norm (:class:`bnlib.distributed.SyncBatchNorm`) normalises with the
statistics of the whole global batch: that is full-batch BN on one device. Three measurements:

* :func:`across_devices` (registered as ``across_devices``): test accuracy, and the
  train/eval gap, of an MLP trained with per-device statistics for ``k`` devices
  (simulated as ghost BN) against synchronised statistics, paired over seeds;
* :func:`real_runs_match`: real 2-process gloo runs on the CPU, checking that per-device
  BN *is* ghost BN and SyncBN *is* full-batch BN (same final weights);
* :func:`sync_cost`: the per-step time of a SyncBN forward+backward against a local BN in
  2 CPU processes joined by gloo (loopback TCP; not a statement about GPUs and NCCL).

Paired differences and equivalence tests are :mod:`bnlib.analysis`'s (pair on the seed, arm
column ``devices``).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass, fields
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import cache
from .. import data as datasets
from .. import distributed as D
from .. import progress
from ..distributed import per_device
from ..models import MLPSpec, mlp
from ..nn import BatchNorm1d, BatchNorm2d, use_ghost_batchnorm
from ..train import TrainSpec, fit, seeded, train
from . import Config, register

__all__ = ["PerDeviceMLPSpec", "DevicesConfig", "fit_devices", "across_devices",
           "real_runs_match", "sync_cost", "plot_devices"]


@functools.lru_cache(maxsize=4)
def _load(name: str) -> datasets.Dataset:
    return datasets.load(name)


@dataclass(frozen=True)
class PerDeviceMLPSpec(MLPSpec):
    """A BN MLP whose batch norms compute what ``devices`` data-parallel devices do with
    slices of ``per_device_batch`` examples (:func:`bnlib.distributed.per_device`;
    ``devices=1``: plain BN)."""

    kind: ClassVar[str] = "per-device mlp"
    norm: str = "batch"
    devices: int = 1
    per_device_batch: int = 2

    def build(self, seed: int, data: datasets.Dataset) -> nn.Module:
        net = MLPSpec(**{f.name: getattr(self, f.name) for f in fields(MLPSpec)}).build(seed, data)
        return per_device(net, self.per_device_batch) if self.devices > 1 else net


@dataclass(frozen=True)
class DevicesConfig(Config):
    """Per-device vs synchronised BN statistics as the per-device batch shrinks."""

    seeds: tuple[int, ...] = tuple(range(8))
    data: str = "digits"
    devices: tuple[int, ...] = (1, 2, 4, 8)
    model: MLPSpec = MLPSpec(depth=2, width=64, norm="batch")
    # the global batch B; evaluated once, at the end
    train: TrainSpec = TrainSpec(momentum=0.9, steps=100, batch_size=32, eval_every=100)
    margin: float = 0.015                # equivalence margin on test accuracy, declared up front

    FULL = {"data": "mnist5k", "devices": (1, 2, 4, 8, 16, 32, 64),
            "train.batch_size": 256, "train.steps": 3000,
            "train.eval_every": 3000, "model.width": 256, "model.depth": 3,
            "seeds": tuple(range(10))}


def fit_devices(cfg: DevicesConfig, seed: int, devices: int) -> dict:
    """Train one MLP with per-device BN statistics for ``devices`` devices (``devices=1``:
    full-batch statistics, i.e. SyncBN on any number of devices) with :func:`bnlib.train.fit`
    and return its final ``test_acc`` and ``val_acc`` (eval mode: running statistics),
    ``val_acc_train_mode`` (the same validation examples in batches of ``B``, train mode, so
    each slice of ``B / devices`` normalised on its own) and ``gap`` = train-mode minus
    eval-mode validation accuracy."""
    b = cfg.train.batch_size
    if devices < 1 or b % devices or b // devices < 2:
        raise ValueError(f"batch_size {b} must split into {devices} slices of ≥ 2")
    spec = PerDeviceMLPSpec(**dataclasses.asdict(cfg.model), devices=devices, per_device_batch=b // devices)
    ds = _load(cfg.data)
    train_spec = cfg.train if cfg.device == "auto" else dataclasses.replace(cfg.train, device=cfg.device)
    hist = fit(spec, train_spec, ds, seed)
    net = hist.attrs.pop("model")
    last = hist[hist["step"] == hist["step"].max()].set_index("split")["accuracy"]
    val = ds.to(next(net.parameters()).device).val
    with torch.no_grad():
        m, n = copy.deepcopy(net).train(), len(val) - len(val) % b   # a copy: running stats stay
        hits = sum((m(val.x[i:i + b]).argmax(1) == val.y[i:i + b]).sum().item() for i in range(0, n, b))
    return dict(devices=devices, per_device=b // devices, test_acc=last["test"], val_acc=last["val"],
                val_acc_train_mode=hits / n, gap=hits / n - last["val"],
                diverged=bool(hist["diverged"].any()))


def plot_devices(df: pd.DataFrame):
    """Test accuracy and train/eval gap against the per-device batch (mean ± 95% CI)."""
    import matplotlib.pyplot as plt
    from scipy import stats
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, col, label in zip(axes, ["test_acc", "gap"],
                              ["test accuracy (eval mode)", "train-mode − eval-mode val accuracy"]):
        s = df.groupby("per_device")[col].agg(["mean", "sem", "count"]).reset_index()
        half = s["sem"] * stats.t.ppf(0.975, s["count"] - 1)          # 95% t-interval
        s = s.assign(ci_low=s["mean"] - half, ci_high=s["mean"] + half)
        sync = s[s["per_device"] == s["per_device"].max()].iloc[0]
        ax.errorbar(s["per_device"], s["mean"], yerr=[s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]],
                    marker="o", capsize=3, label="per-device BN (= ghost BN)")
        ax.axhspan(sync["ci_low"], sync["ci_high"], color="C1", alpha=0.25, lw=0)
        ax.axhline(sync["mean"], color="C1", label="SyncBN (= full-batch BN)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["per_device"], [f"{int(v)}" for v in s["per_device"]])
        ax.minorticks_off()
        ax.set_xlabel(f"per-device batch (global batch {int(s['per_device'].max())})")
        ax.set_ylabel(label)
        if col == "gap":
            ax.axhline(0, color="k", lw=0.6)
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    return fig


@register("across_devices", DevicesConfig, title="Batch norm across devices: per-device vs synced",
          chapter="21_across_devices", plot=plot_devices)
def across_devices(cfg: DevicesConfig) -> pd.DataFrame:
    """One row per (devices k, seed): ``test_acc, val_acc, val_acc_train_mode, gap,
    per_device, diverged``. Runs with the same seed share initialisation and batch order."""
    b = cfg.train.batch_size
    bad = [k for k in cfg.devices if b % k or b // k < 2]
    if bad or 1 not in cfg.devices:
        raise ValueError(f"devices must include 1 and divide batch_size {b} into slices of ≥ 2; "
                         f"bad: {bad}")
    rows = [dict(seed=seed, **cache.cell({"devices": cfg, "k": k, "seed": seed},
                                         lambda: fit_devices(cfg, seed, k)))
            for k in progress.bar(cfg.devices, desc="devices") for seed in cfg.seeds]
    return pd.DataFrame(rows)


# --- real processes -------------------------------------------------------------------

def _digits64(n_train: int) -> datasets.Dataset:
    ds = _load("digits")
    cast = lambda s, n=None: datasets.Split(s.x[:n].double(), s.y[:n])  # noqa: E731
    return datasets.Dataset("digits", cast(ds.train, n_train), cast(ds.val), cast(ds.test),
                            ds.input_shape, ds.num_classes)


def _real_kwargs(batch_size: int, steps: int) -> dict:
    return dict(steps=steps, lr=0.1, momentum=0.9, batch_size=batch_size, eval_every=steps)


def _builder(ds: datasets.Dataset, width: int):
    return functools.partial(_double_mlp, ds.num_features, ds.num_classes, width)


def _double_mlp(features: int, classes: int, width: int) -> nn.Module:
    return mlp(features, classes, depth=2, width=width, norm="batch").double()


def _real_worker(rank: int, world: int, batch_size: int, steps: int, width: int, n_train: int):
    ds = _digits64(n_train)
    out = {}
    for sync in (True, False):
        _, model = D.train_data_parallel(_builder(ds, width), ds, seed=0, sync_bn=sync, ddp=False,
                                         device="cpu", **_real_kwargs(batch_size, steps))
        out["SyncBN" if sync else "per-device BN"] = model.state_dict()
    return out


def real_runs_match(batch_size: int = 32, steps: int = 30, width: int = 32, n_train: int = 512,
                    world: int = 2) -> pd.DataFrame:
    """Train the same float64 MLP on ``digits`` for ``steps`` SGD steps four ways: in
    ``world`` real gloo processes with SyncBN and with per-device BN (gradients averaged
    by an all-reduce), and in this process with full-batch BN and with ghost BN (ghost
    batches of ``batch_size / world``). Returns, for each (distributed run, single-process
    run) pair, the largest absolute difference between their final weights
    (``max_abs_diff``) and between their running statistics (``max_abs_diff_running``, on
    rank 0 for per-device BN; ghost BN updates them per ghost batch, so there they differ)."""
    ranks = D.launch(_real_worker, world, (batch_size, steps, width, n_train), timeout=120)
    ds = _digits64(n_train)
    single = {}
    for name in ("full-batch BN", "ghost BN", "per-device BN (1 process)"):
        net = seeded(0, _builder(ds, width))
        if name == "ghost BN":
            use_ghost_batchnorm(net, virtual_batch_size=batch_size // world)
        elif name.startswith("per-device"):
            per_device(net, batch_size // world)
        train(net, ds, seed=0, device="cpu", **_real_kwargs(batch_size, steps))
        single[name] = net.state_dict()
    start = seeded(0, _builder(ds, width)).state_dict()
    rows = []
    for dist_name in ("SyncBN", "per-device BN"):
        for single_name, weights in single.items():
            def diff(rs, running: bool) -> float:
                return max((r[dist_name][k].double() - weights[k].double()).abs().max().item()
                           for r in rs for k in r[dist_name]
                           if ("running" in k) == running and "num_batches" not in k)
            # every rank's weights; running statistics: rank 0's for per-device BN
            rows.append(dict(distributed=dist_name, single_process=single_name,
                             max_abs_diff=diff(ranks, False),
                             max_abs_diff_running=diff(
                                 ranks[:1] if dist_name.startswith("per-device") else ranks, True)))
    moved = max((single["full-batch BN"][k] - start[k]).abs().max().item()
                for k in start if "running" not in k and "num_batches" not in k)
    return pd.DataFrame(rows).assign(weights_moved=moved)


def _cost_worker(rank: int, world: int, shapes: Sequence[tuple[int, ...]], reps: int, repeats: int):
    torch.manual_seed(rank)
    rows = []
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        local = (BatchNorm2d if len(shape) == 4 else BatchNorm1d)(shape[1])
        layers = {"local BN": local, "SyncBN": D.SyncBatchNorm(shape[1])}
        times: dict[str, list[float]] = {name: [] for name in layers}
        for layer in layers.values():
            for _ in range(3):  # warm-up
                layer(x).backward(dy)
        for _ in range(repeats):  # the arms alternate, so a slow spell of the machine hits both
            for name, layer in layers.items():
                torch.distributed.barrier()
                t0 = time.perf_counter()
                for _ in range(reps):
                    layer(x).backward(dy)
                times[name].append((time.perf_counter() - t0) / reps)
        for name, t in times.items():
            rows.append(dict(rank=rank, shape=str(tuple(shape)), layer=name,
                             us_per_step=1e6 * float(np.min(t))))
    return rows


def sync_cost(shapes: Sequence[tuple[int, ...]] = ((32, 128), (16, 32, 8, 8)), reps: int = 5,
              repeats: int = 10, world: int = 2) -> pd.DataFrame:
    """Per-step time (the fastest of ``repeats`` rounds of ``reps`` forward+backward passes:
    on a shared machine the minimum is the least disturbed estimate) of a local
    BN and a SyncBN on each rank's input of each shape, in ``world`` CPU processes joined by
    gloo over loopback TCP. Columns ``shape, layer, us_per_step`` (mean over ranks) and
    ``overhead_us`` (SyncBN minus local). CPU/gloo numbers: NCCL on GPUs differs."""
    ranks = D.launch(_cost_worker, world, (tuple(shapes), reps, repeats), timeout=120)
    df = pd.DataFrame([row for r in ranks for row in r])
    out = df.groupby(["shape", "layer"], sort=False)["us_per_step"].mean().unstack("layer")
    out["overhead_us"] = out["SyncBN"] - out["local BN"]
    out["ratio"] = out["SyncBN"] / out["local BN"]
    return out.reset_index()
