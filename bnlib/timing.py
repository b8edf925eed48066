"""The timing harness: fair per-step costs on a noisy, shared machine.

:func:`time_interleaved` calls several functions in a fresh random order in every repeat and
keeps one row per (function, repeat), so a slow spell of a shared CPU hits every arm alike;
:func:`step_phases` gives the forward, backward and full-step callables of a model;
:func:`timing_summary` and :func:`paired_ratio` reduce the rows to medians. On a CPU the
stopwatch is the process's CPU time (:func:`clock`), on a GPU wall time between
synchronisations. Chapters 2, 4 and 13 and the benchmarks time with it.
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .train import make_optimizer, resolve_device

__all__ = ["clock", "time_interleaved", "step_phases", "timing_summary", "paired_ratio"]


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: str | torch.device | None = None) -> Callable[[], float]:
    """The stopwatch the timing harness uses on ``device``.

    On the CPU: this process's CPU time (``time.process_time``, all its threads). A shared
    machine deschedules a process at random moments; wall-clock time then charges the
    waiting to whichever arm happened to run, while CPU time counts only the work the step
    did. On a GPU: wall-clock time between synchronisations, the time the GPU was busy.
    """
    dev = torch.device(device) if isinstance(device, str) else device
    return time.perf_counter if dev is not None and dev.type != "cpu" else time.process_time


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 20,
                     number: int = 3, warmup: int = 2, seed: int = 0,
                     device: str | torch.device | None = None) -> pd.DataFrame:
    """Time several zero-argument callables fairly on a noisy machine.

    Every repeat calls each function ``number`` times, the functions in a fresh random
    order (seeded by ``seed``), so a slow spell of a shared CPU hits every arm alike
    instead of one arm's whole block. ``warmup`` untimed rounds come first (allocator,
    caches, lazy initialisation). Returns one row per (``name``, ``repeat``) with
    ``seconds`` per call; take medians (:func:`timing_summary`), never means.

    A function may time itself: if it returns a Python ``float``, that is its duration (for a phase
    that needs untimed set-up, e.g. a backward pass needs a forward pass first). On CUDA
    (``device``) the GPU is synchronised before and after each timed call. Times come from
    :func:`clock`: CPU time on the CPU, wall time on a GPU.
    """
    if not fns:
        raise ValueError("give at least one function to time")
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError(f"need repeats ≥ 1, number ≥ 1, warmup ≥ 0; got {repeats}, {number}, {warmup}")
    dev = torch.device(device) if isinstance(device, str) else device
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(dev)
    rng = random.Random(seed)
    now = clock(dev)
    rows = []
    for r in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            total = 0.0
            for _ in range(number):
                _sync(dev)
                t0 = now()
                out = fns[name]()
                _sync(dev)
                wall = now() - t0
                total += out if type(out) is float else wall
            rows.append({"name": name, "repeat": r, "seconds": total / number})
    return pd.DataFrame(rows)


def step_phases(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float = 0.01,
                momentum: float = 0.9, device: str | torch.device = "cpu"
                ) -> dict[str, Callable[[], Any]]:
    """The three timed phases of one training step of ``model`` on the batch ``(x, y)``.

    ``forward``: train-mode forward pass and cross-entropy loss (building the graph);
    ``backward``: the backward pass alone (its forward pass runs untimed first);
    ``step``: the whole step as :func:`bnlib.train.train` runs it (zero grads, forward,
    loss, backward, SGD update). The model is moved to ``device`` and trained in place.
    """
    dev = resolve_device(device)
    model.to(dev).train()
    x, y = x.to(dev), y.to(dev)
    opt = make_optimizer(model.parameters(), "sgd", lr, momentum)

    def forward() -> None:
        F.cross_entropy(model(x), y)

    now = clock(dev)

    def backward() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        _sync(dev)
        t0 = now()
        loss.backward()
        _sync(dev)
        return now() - t0

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return {"forward": forward, "backward": backward, "step": step}


def timing_summary(df: pd.DataFrame, by: Sequence[str] = ("name",)) -> pd.DataFrame:
    """Median, quartiles and count of ``seconds`` per group (microseconds, for reading)."""
    by = list(by)
    g = df.groupby(by, sort=False)["seconds"]
    out = pd.DataFrame({"median_us": g.median() * 1e6, "q25_us": g.quantile(0.25) * 1e6,
                        "q75_us": g.quantile(0.75) * 1e6, "n": g.size()})
    return out.reset_index()


def paired_ratio(df: pd.DataFrame, a: str, b: str, *, name: str = "name",
                 pair_on: Sequence[str] = ("repeat",)) -> dict:
    """Median over repeats of ``seconds[a] / seconds[b]`` within the same repeat.

    Interleaved repeats pair naturally: both arms ran within moments of each other, so the
    per-repeat ratio cancels most of the machine's drift. Also returns the quartiles."""
    keys = list(pair_on)
    left = df[df[name] == a].set_index(keys)["seconds"]
    right = df[df[name] == b].set_index(keys)["seconds"]
    ratio = (left / right).dropna()
    if ratio.empty:
        raise ValueError(f"no repeats pair {a!r} with {b!r}")
    return {"a": a, "b": b, "n": len(ratio), "median": float(ratio.median()),
            "q25": float(ratio.quantile(0.25)), "q75": float(ratio.quantile(0.75))}
