"""The experiment protocol: arms × grid × seeds of one config, trained with one ``fit``.

A :class:`Protocol` config holds the data set's name, a model spec, a training spec, the arms
(name → overrides of the config, e.g. ``{"model.norm": "batch"}``), the reported seeds and a
:class:`Tuning` block. :func:`runs` trains every (arm, grid point, seed), many at once where the
stacked engine supports the network (:mod:`bnlib.stacked`), one by one otherwise, and returns
one tidy history. :func:`tuned` chooses each arm's hyperparameter on the validation split with
the tuning seeds (never the reported ones; never at the edge of the grid unless the config
allows it) and then trains the reported seeds at the choice.

Result frames carry a ``kind`` column (``"history"``, ``"tuning"``, or a chapter's own kinds
such as ``"timing"``); read a kind with :func:`rows`.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from . import cache, progress
from . import data as datasets
from .config import Config, override
from .models import CNNSpec, MLPSpec
from .probes import Probe, WeightNormTracker
from .train import TrainSpec, fit

__all__ = ["Tuning", "Protocol", "arm_config", "load_data", "train_spec", "runs", "choose", "tuned",
           "trained", "probed", "rows", "column", "HiddenWeightNorms"]


@dataclass(frozen=True)
class Tuning:
    """How a hyperparameter is chosen: on the validation split, by seeds disjoint from the
    reported ones, and never at the edge of its grid unless ``allow_edge`` says so (a chapter
    that allows it must say why in its text)."""

    param: str = "train.lr"
    grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    seeds: tuple[int, ...] = (1000, 1001, 1002)
    objective: str = "final"          # "final" metric, "speed" (restricted mean time to target)
    metric: str = "accuracy"          # or "reached" (fraction that got there, then speed)
    target: float | None = None       # the metric's target, for "speed" and "reached"
    allow_edge: bool = False


def _default_arms() -> dict[str, dict[str, Any]]:
    return {"plain": {"model.norm": "none"}, "BN": {"model.norm": "batch"}}


@dataclass(frozen=True)
class Protocol(Config):
    """An experiment on the protocol: data, model, training, arms, seeds and tuning."""

    data: str = "digits"              # ships with scikit-learn: no download
    preprocessing: str = "scaled"
    n_train: int | None = None
    model: MLPSpec | CNNSpec = MLPSpec()
    train: TrainSpec = TrainSpec()
    arms: dict[str, dict[str, Any]] = field(default_factory=_default_arms)
    seeds: tuple[int, ...] = tuple(range(8))  # 8 paired seeds: the house minimum for a reported claim
    tuning: Tuning = Tuning()

    def prepare(self, data: datasets.Dataset) -> datasets.Dataset:
        """The loaded data set as this experiment feeds it (default: unchanged). A chapter's
        config may override it, e.g. to rescale the inputs by one of its fields."""
        return data


def column(key: str) -> str:
    """The result column of a config key: its last part (``"train.lr"`` → ``"lr"``)."""
    return key.rsplit(".", 1)[-1]


def arm_config(cfg: Protocol, arm: str) -> Protocol:
    """``cfg`` with arm ``arm``'s overrides applied."""
    if arm not in cfg.arms:
        raise KeyError(f"no arm {arm!r}; arms: {', '.join(cfg.arms)}")
    return override(cfg, cfg.arms[arm])


_DATA: dict[tuple, datasets.Dataset] = {}


def load_data(cfg: Protocol) -> datasets.Dataset:
    """The config's data set (loaded once per process), through ``cfg.prepare``."""
    k = (cfg.data, cfg.preprocessing, cfg.n_train)
    if k not in _DATA:
        _DATA[k] = datasets.load(cfg.data, preprocessing=cfg.preprocessing, n_train=cfg.n_train)
    return cfg.prepare(_DATA[k])


def train_spec(cfg: Protocol) -> TrainSpec:
    """The config's training spec, on the config's device when one was asked for."""
    if cfg.device != "auto" and cfg.train.device == "auto":
        return dataclasses.replace(cfg.train, device=cfg.device)
    return cfg.train


def trained(cfg: Protocol, *, arms: Sequence[str] | None = None,
            seeds: Sequence[int] | None = None, stacked: bool = False):
    """Train each arm × seed with :func:`fit` for measurements that need the trained network
    (probes after training): yields ``(arm, seed, history, net, data)``, ``data`` as the
    network reads it. With ``stacked``, an arm the stacked engine supports trains all its
    seeds at once (the same runs up to floating-point rounding); the rest one by one."""
    from .distributed import launched
    engine = _stacked() if stacked and not launched() else None
    seeds = list(cfg.seeds if seeds is None else seeds)
    for arm in (cfg.arms if arms is None else arms):
        acfg = arm_config(cfg, arm)
        data = acfg.model.inputs(load_data(acfg))
        spec = train_spec(acfg)
        if engine is not None and engine.supports(acfg.model, spec):
            hs = cache.cell({"trained": acfg, "train": spec, "seeds": seeds}, lambda: engine.fit_many(
                acfg.model, spec, data, [engine.Member(seed=s) for s in seeds]))
        else:
            hs = (cache.cell({"trained": acfg, "train": spec, "seed": s},
                             lambda s=s: fit(acfg.model, spec, data, s)) for s in seeds)
        for seed, h in zip(seeds, hs):
            h = h.copy()  # a checkpointed history keeps its network for the next reader
            yield arm, seed, h, h.attrs.pop("model"), data


class HiddenWeightNorms(Probe):
    """:class:`bnlib.probes.WeightNormTracker` (as ``.tracker``) on every hidden layer of the
    network that :func:`fit` builds (its layers exist only once training starts)."""

    def __init__(self, lr: float = 1.0, every: int = 25) -> None:
        self.lr, self.every, self.tracker = lr, every, None

    def on_train_start(self, model) -> None:
        self.tracker = WeightNormTracker([b.layer for b in model.blocks], lr=self.lr, every=self.every)

    def __call__(self, info) -> None:
        self.tracker(info)


def probed(cfg: Protocol, make: Callable[[Protocol, datasets.Dataset], Any], *,
           arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> pd.DataFrame:
    """Train each arm × seed with :func:`fit` and fresh probes, one by one.

    ``make(arm_cfg, data)`` returns one :class:`bnlib.probes.Probe` (or a sequence of them)
    for a run; ``data`` is the data set as the network reads it. Returns the histories
    (``record == "history"``) and every probe's :meth:`frame` (``record`` = the probe's
    ``name`` attribute, else ``"probe"``), each row with ``arm``, ``seed`` and the run's
    ``diverged``."""
    frames = []
    for arm in (cfg.arms if arms is None else arms):
        acfg = arm_config(cfg, arm)
        data = acfg.model.inputs(load_data(acfg))
        for seed in (cfg.seeds if seeds is None else seeds):
            frames += cache.cell({"probed": make, "defaults": make.__defaults__, "cfg": acfg,
                                  "seed": seed}, lambda: _probed_run(acfg, make, data, arm, seed))
    return pd.concat(frames, ignore_index=True)


def _probed_run(acfg: Protocol, make: Callable, data: datasets.Dataset, arm: str,
                seed: int) -> list[pd.DataFrame]:
    made = make(acfg, data)
    made = list(made) if isinstance(made, (list, tuple)) else [made]
    h = fit(acfg.model, train_spec(acfg), data, seed, callbacks=made)
    h.attrs = {}
    div = bool(h["diverged"].any())
    return [h.assign(record="history", arm=arm, seed=seed),
            *(p.frame().assign(record=getattr(p, "name", "probe"), arm=arm, seed=seed, diverged=div)
              for p in made)]


def _stacked():
    try:
        from . import stacked
    except ImportError:
        return None
    return stacked


def _bare(histories: Sequence[pd.DataFrame]) -> list[pd.DataFrame]:
    """The histories without their ``attrs`` (the trained network stays out of results)."""
    for h in histories:
        h.attrs = {}
    return list(histories)


def runs(cfg: Protocol, *, seeds: Sequence[int] | None = None,
         grid: Mapping[str, Sequence[Any]] | None = None, arms: Sequence[str] | None = None,
         callbacks: Callable[[], Sequence[Callable]] | None = None,
         stacked: bool = True) -> pd.DataFrame:
    """Train every arm × grid point × seed and return the stacked histories.

    ``grid`` maps config keys to values (``{"train.lr": (0.01, 0.1)}``); each key becomes a
    column named by its last part. Arms are paired: for a given seed every arm and grid
    point starts from the same random stream and sees the same batches. Runs that the stacked
    engine supports (plain, batch-norm and ghost-BN MLPs with SGD, no probes) train together as one
    model; the rest train one by one. ``callbacks()`` makes fresh probes for each run (and
    forces sequential runs). Under :func:`bnlib.cache.checkpointing` every finished stack or
    run is kept, so a killed computation resumes where it stopped.
    """
    seeds = list(cfg.seeds if seeds is None else seeds)
    grid = dict(grid or {})
    names = list(cfg.arms if arms is None else arms)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    from .distributed import launched
    engine = _stacked() if stacked and callbacks is None and not launched() else None
    frames = []
    per_member = ("train.lr", "model.dropout")  # what one stack can vary between its runs
    for arm in names:
        acfg = arm_config(cfg, arm)
        by_rest: dict[str, list[dict]] = {}
        for point in points:  # group points that differ only in what a stack can vary
            rest = {k: v for k, v in point.items() if k not in per_member}
            by_rest.setdefault(repr(sorted(rest.items())), []).append(point)
        for group in by_rest.values():
            base = override(acfg, {k: v for k, v in group[0].items() if k not in per_member})
            data = load_data(base)
            spec = train_spec(base)
            models = [override(base, {k: v for k, v in p.items() if k == "model.dropout"}).model
                      for p in group]
            cells = [(s, p, m) for s in seeds for p, m in zip(group, models)]
            columns = lambda p: {column(k): v for k, v in p.items()}  # noqa: E731 (grid columns)
            if engine is not None and all(engine.supports(m, spec) for m in models):
                members = [engine.Member(seed=s, lr=p.get("train.lr", spec.lr),
                                         dropout=m.dropout) for s, p, m in cells]
                histories = cache.cell({"runs": base, "train": spec, "members": members},
                                       lambda: _bare(engine.fit_many(base.model, spec, data, members)))
                frames += [h.assign(arm=arm, seed=s, **columns(p)) for (s, p, _), h in zip(cells, histories)]
                continue
            for s, p, m in progress.bar(cells, total=len(cells), desc=arm):
                one = dataclasses.replace(spec, lr=p.get("train.lr", spec.lr))
                if callbacks:  # the caller reads its probes afterwards: never from a checkpoint
                    h = _bare([fit(m, one, data, s, callbacks=callbacks())])[0]
                else:
                    h = cache.cell({"runs": base, "model": m, "train": one, "seed": s},
                                   lambda: _bare([fit(m, one, data, s)])[0])
                frames.append(h.assign(arm=arm, seed=s, **columns(p)))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return df.assign(kind="history")


def choose(cfg: Protocol, *, arms: Sequence[str] | None = None,
           overrides: Mapping[str, Any] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tune ``cfg.tuning.param`` per arm on the validation split with the tuning seeds:
    the tuning runs (``kind == "tuning"``, with the grid column) and each arm's choice
    (:func:`bnlib.analysis.tune`, which raises :class:`bnlib.analysis.GridEdgeError` when a
    choice lies at the edge of the grid and the config does not allow it). ``overrides``
    (dotted keys) apply to the tuning runs only, e.g. to evaluate just what the objective
    reads: ``{"train.eval_splits": ("val",)}``."""
    from . import analysis
    t = cfg.tuning
    sweep = runs(override(cfg, overrides) if overrides else cfg, seeds=t.seeds,
                 grid={t.param: t.grid}, arms=arms).assign(kind="tuning")
    choice = analysis.tune(sweep, param=column(t.param), metric=t.metric, objective=t.objective,
                           target=t.target, by=("arm",), allow_edge=t.allow_edge,
                           seeds=t.seeds, report_seeds=cfg.seeds)
    return sweep, choice


def tuned(cfg: Protocol, *, arms: Sequence[str] | None = None,
          tuning_overrides: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """:func:`choose` each arm's value, then train the reported seeds at it: the tuning runs
    (``kind == "tuning"``, with the grid column) and the reported runs (``kind ==
    "history"``, with the chosen value in the same column). ``tuning_overrides`` apply to
    the tuning runs only (:func:`choose`)."""
    t = cfg.tuning
    col = column(t.param)
    sweep, choice = choose(cfg, arms=arms, overrides=tuning_overrides)
    frames = [sweep]
    for arm, value in zip(choice["arm"], choice[col]):
        rep = runs(override(cfg, {t.param: value}), arms=[arm])
        frames.append(rep.assign(**{col: value}))
    return pd.concat(frames, ignore_index=True)


def rows(df: pd.DataFrame, kind: str = "history") -> pd.DataFrame:
    """The rows of one kind (``history``, ``tuning``, ``timing``, ...), without the columns
    that only other kinds use."""
    if "kind" not in df:
        raise KeyError("this result has no 'kind' column")
    out = df[df["kind"] == kind]
    if out.empty:
        raise KeyError(f"no rows of kind {kind!r}; kinds: {', '.join(map(str, df['kind'].unique()))}")
    return out.dropna(axis=1, how="all").reset_index(drop=True)
