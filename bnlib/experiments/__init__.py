"""The experiment registry: presets, the results cache and paired sweeps.

An experiment is a function ``fn(config) -> pandas.DataFrame`` registered under a name, with a
config dataclass (:class:`bnlib.config.Config`) whose defaults are the quick preset (each field
with a one-line reason) and whose ``FULL`` overrides a few of them::

    @dataclass(frozen=True)
    class SpeedConfig(Config):
        data: str = "digits"          # ships with scikit-learn: no download
        train: TrainSpec = TrainSpec(steps=300)

        FULL = {"data": "mnist", "train.steps": 5000}

    @register("speed", SpeedConfig, title="Steps to a target accuracy", chapter="04_speed",
              plot=plot)
    def speed(cfg: SpeedConfig) -> pd.DataFrame: ...

Each chapter's experiments live in their own module of this package (found automatically);
nothing in a chapter module imports another chapter module. Run one with
``bnlib.experiments.run("speed", scale="quick", **{"train.lr": 0.1})`` or
``python -m bnlib run speed train.lr=0.1``: both resolve the config the same way and share the
results cache (:mod:`bnlib.cache`), so a result computed once (by nbval, by the book build, by
the command line) is reused everywhere until the library or the config changes.
"""
from __future__ import annotations

import datetime as dt
import importlib
import itertools
import pkgutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

from .. import cache, progress, runtime
from .. import scale as current_scale
from ..config import Config, ConfigError, config_hash, override, to_dict

__all__ = ["Config", "Experiment", "register", "get", "names", "run", "resolve", "sweep",
           "config_hash", "ConfigError", "override"]


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its function, config class and how to plot its result."""

    name: str
    fn: Callable[[Config], pd.DataFrame]
    config: type
    title: str = ""
    chapter: str = ""
    plot: Callable[[pd.DataFrame], Any] | None = None

    def run(self, cfg: Config | None = None, **overrides: Any) -> pd.DataFrame:
        cfg = cfg if cfg is not None else self.config.preset(**overrides)
        if overrides and cfg is not None:
            cfg = override(cfg, overrides)
        return self.fn(cfg)


_REGISTRY: dict[str, Experiment] = {}


def register(name: str, config: type, *, title: str = "", chapter: str = "",
             plot: Callable[[pd.DataFrame], Any] | None = None) -> Callable:
    """Decorator: register ``fn(config) -> DataFrame`` as experiment ``name``."""
    if not (isinstance(config, type) and issubclass(config, Config)):
        raise TypeError(f"config of {name!r} must be a subclass of bnlib.experiments.Config")

    def deco(fn: Callable[[Config], pd.DataFrame]) -> Callable[[Config], pd.DataFrame]:
        if name in _REGISTRY and _REGISTRY[name].fn.__module__ != fn.__module__:
            raise ValueError(f"experiment {name!r} is registered twice")
        _REGISTRY[name] = Experiment(name, fn, config, title or name, chapter, plot)
        return fn

    return deco


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def names() -> list[str]:
    """The registered experiment names, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> Experiment:
    """The experiment registered as ``name`` (a clear error lists the valid names)."""
    _discover()
    if name not in _REGISTRY:
        raise KeyError(f"no experiment named {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Python keyword overrides: ``train__lr=0.1`` means ``train.lr``."""
    return {k.replace("__", "."): v for k, v in overrides.items()}


def resolve(name: str, scale: str | None = None,
            overrides: Mapping[str, Any] | Iterable[str] | None = None, **kw: Any) -> Config:
    """The config experiment ``name`` runs with: its preset at ``scale``, then the overrides."""
    exp = get(name)
    cfg = exp.config.preset(scale)
    cfg = override(cfg, overrides)
    return override(cfg, _dotted(kw))


_MEMO: dict[str, tuple[pd.DataFrame, dict]] = {}


def run(name: str, scale: str | None = None, *, cache_results: bool = True,
        overrides: Mapping[str, Any] | Iterable[str] | None = None, **kw: Any) -> pd.DataFrame:
    """Run experiment ``name`` (or fetch its cached result) and return the tidy DataFrame.

    ``scale`` is ``"quick"`` or ``"full"`` (default ``bnlib.scale()``); ``overrides`` and
    keyword arguments override config fields (``seeds=(0, 1)``, ``train__lr=0.1``). The run
    uses bnlib's thread count, so the result does not depend on the machine's settings. The
    result's ``attrs["provenance"]`` says where, when and how it was first computed, and
    ``attrs["config"]`` holds the resolved config. While it computes, finished cells are
    kept (:func:`bnlib.cache.checkpointing`), so a run killed after hours resumes where it
    stopped when it is started again with the same config.
    """
    from ..provenance import record
    from ..train import resolve_device
    exp = get(name)
    cfg = resolve(name, scale, overrides, **kw)
    device = resolve_device(getattr(cfg, "device", "auto"))
    k = cache.key(name, cfg, device.type)
    hit = _MEMO.get(k) or (cache.load(name, k) if cache_results else None)
    if hit is None:
        from ..distributed import is_main
        started, t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
        partial = cache.partial_folder(name, k) if cache_results else None
        resumed = len(list(partial.glob("cell-*.pkl"))) if partial is not None and partial.exists() else 0
        with runtime.pinned_threads(), cache.checkpointing(partial, remove=is_main()):
            df = exp.fn(cfg)  # a killed run resumes from its finished cells
        seconds = time.perf_counter() - t0
        command = " ".join(["python -m bnlib run", name, "--scale", scale or current_scale(),
                            *(f"{k}={v}" for k, v in sorted(_dotted(kw).items()))])
        prov = record(device=device, started=started, seconds=seconds, experiment=name,
                      command=command,
                      scale=scale or current_scale(), config=to_dict(cfg), rows=len(df),
                      cache_key=k)
        if resumed:  # the time above is this session's only
            prov["resumed_cells"] = resumed
        if cache_results and is_main():  # under torchrun, rank 0 alone writes
            cache.save(name, k, df, prov)
        hit = (df, prov)
    _MEMO[k] = hit
    df = hit[0].copy()
    df.attrs = {"provenance": hit[1], "config": cfg}
    return df


# --- sweeps ---------------------------------------------------------------------------

def sweep(fn: Callable[..., pd.DataFrame], *, seeds: Sequence[int],
          arms: Mapping[str, Mapping[str, Any]] | None = None,
          grid: Mapping[str, Sequence[Any]] | None = None,
          common: Mapping[str, Any] | None = None, desc: str = "sweep") -> pd.DataFrame:
    """Run ``fn`` for every arm × grid point × seed and stack the results.

    ``fn(seed=..., **common, **arm_kwargs, **grid_point)`` returns a DataFrame (e.g. a
    training history); columns ``arm``, one per grid key, and ``seed`` are added. Arms are
    *paired*: for a given seed every arm and grid point gets the same seed, so the same
    initialisation stream and batch order. Seeds run in the outer loop, so a cut-short
    run still holds complete pairs; under :func:`bnlib.cache.checkpointing` a finished cell
    is kept, and a rerun after a kill starts where it stopped.
    """
    arms = dict(arms or {"default": {}})
    grid = dict(grid or {})
    common = dict(common or {})
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    cells = [(seed, arm, point) for seed in seeds for arm in arms for point in points]

    def one(seed: int, arm: str, point: dict) -> pd.DataFrame:
        df = fn(seed=seed, **common, **arms[arm], **point)
        if not isinstance(df, pd.DataFrame):
            df = pd.DataFrame([df] if isinstance(df, Mapping) else df)
        return df.assign(arm=arm, seed=seed, **point)

    frames = [cache.cell({"sweep": fn, "arm": arm, "arm_kwargs": arms[arm], "point": point,
                          "common": common, "seed": seed}, lambda: one(seed, arm, point))
              for seed, arm, point in progress.bar(cells, total=len(cells), desc=desc)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
