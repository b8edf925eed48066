"""Chapter 22: the batch-norm bug museum.

Five classic batch-norm bugs, each as a *bug* arm and a *fix* arm trained on the same seed,
the symptom measured on a real run (a small MLP on ``digits``), and the
:func:`bnlib.doctor.diagnose` finding that would have caught it:

* ``keras_momentum``: ``momentum=0.99`` written in PyTorch's convention (Keras' 0.99 is
  PyTorch's 0.01): the running statistics are essentially the last batch's, so eval-mode
  accuracy drops;
* ``no_running_stats``: ``track_running_stats=False``: test accuracy depends on the size
  of the test batch;
* ``params_only_checkpoint``: a checkpoint of ``named_parameters()`` (no buffers) loaded
  with ``strict=False``: the reloaded model normalises with mean 0, variance 1;
* ``one_value_per_channel``: a loop that keeps the ragged last batch, of one example:
  "Expected more than 1 value per channel when training";
* ``frozen_bn_finetune``: fine-tuning a new head on a new domain with the backbone's
  parameters frozen (``requires_grad=False``) but the model in train mode: the batch
  norms' running statistics still move, so the "frozen" backbone forgets the old task.

The result is one tidy table (:func:`bug_museum`): ``exhibit, arm, seed, accuracy`` plus
``eval_batch`` (the test batch size, for ``no_running_stats``), ``note`` and ``findings``
(the doctor's report on the bug arm's model).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from torch import Tensor, nn

from .. import cache
from .. import data as datasets
from ..config import override
from ..doctor import diagnose
from ..inference import evaluate
from ..models import MLPSpec
from ..nn import batchnorm_layers
from ..train import TrainSpec, train
from . import Config, register

__all__ = ["MuseumConfig", "EXHIBITS", "bug_museum", "plot_museum", "fit", "build",
           "keras_momentum", "no_running_stats", "params_only_checkpoint",
           "one_value_per_channel", "frozen_bn_finetune"]


@dataclass(frozen=True)
class MuseumConfig(Config):
    """A small BN MLP per exhibit and seed; bug and fix arms share the seed."""

    data: str = "digits"
    exhibits: tuple[str, ...] = ("keras_momentum", "no_running_stats", "params_only_checkpoint",
                                 "one_value_per_channel", "frozen_bn_finetune")
    model: MLPSpec = MLPSpec(depth=2, width=64, norm="batch")
    train: TrainSpec = TrainSpec(steps=200, batch_size=16, lr=0.1)   # plain SGD
    finetune_steps: int = 100
    eval_batches: tuple[int, ...] = (2, 8, 32, 512)

    FULL = {"data": "mnist5k", "train.steps": 1500, "finetune_steps": 500,
            "model.width": 256, "seeds": tuple(range(8))}


@functools.lru_cache(maxsize=4)
def _load(name: str) -> datasets.Dataset:
    return datasets.load(name)


def build(cfg: MuseumConfig, seed: int, **bn_options) -> nn.Module:
    """The exhibits' model, ``cfg.model`` built with ``seed``, every batch norm's constructor
    options replaced by ``bn_options`` (e.g. ``momentum=0.99``)."""
    net = cfg.model.build(seed, _load(cfg.data))
    for block in net.blocks if bn_options else ():
        old = block.norm
        opts = dict(eps=old.eps, momentum=old.momentum, track_running_stats=old.track_running_stats)
        block.norm = type(old)(old.num_features, **{**opts, **bn_options})
    return net


def _ragged(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled epochs that keep the ragged last batch (the bug of ``one_value_per_channel``)."""
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


class _BatchNormsInEval:
    """A callback of :func:`bnlib.train.train` that keeps every batch norm in eval mode."""

    def on_train_start(self, model: nn.Module) -> None:
        for bn in batchnorm_layers(model):
            bn.eval()

    def __call__(self, info) -> None:
        self.on_train_start(info.model)


def fit(model: nn.Module, x: Tensor, y: Tensor, spec: TrainSpec, seed: int, *,
        bn_eval: bool = False, drop_last: bool = True) -> int:
    """Train ``model`` on ``(x, y)`` with :func:`bnlib.train.train` (``spec``'s optimiser,
    steps and batch size; no evaluation); returns the steps done. ``bn_eval`` keeps the batch
    norms in eval mode (the fine-tuning fix); ``drop_last=False`` keeps the ragged last batch
    of each epoch (the bug of exhibit ``one_value_per_channel``)."""
    ds = datasets.Dataset("museum", datasets.Split(x, y), datasets.Split(x[:0], y[:0]),
                          datasets.Split(x[:0], y[:0]), tuple(x.shape[1:]), int(y.max()) + 1)
    h = train(model, ds, steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size,
              optimizer=spec.optimizer, momentum=spec.momentum, weight_decay=spec.weight_decay,
              seed=seed, device="cpu", eval_splits=(), show_progress=False,
              callbacks=[_BatchNormsInEval()] if bn_eval else (),
              sampler=None if drop_last else _ragged)
    return int(h.attrs["steps"])


def _report(model: nn.Module, batch: Tensor) -> str:
    return "\n".join(str(f) for f in diagnose(model, batch))


def _train(cfg: MuseumConfig, seed: int, **bn_options) -> nn.Module:
    """A model trained for ``cfg.train.steps``; the default one (no ``bn_options``) is trained
    once per (config, seed) and shared by the exhibits as a copy."""
    if not bn_options:
        return copy.deepcopy(_trained_default(cfg, seed))
    return _fitted(cfg, seed, **bn_options)


@functools.lru_cache(maxsize=16)
def _trained_default(cfg: MuseumConfig, seed: int) -> nn.Module:
    return _fitted(cfg, seed)


def _fitted(cfg: MuseumConfig, seed: int, **bn_options) -> nn.Module:
    ds = _load(cfg.data)
    net = build(cfg, seed, **bn_options)
    fit(net, ds.train.x, ds.train.y, cfg.train, seed)
    return net


def keras_momentum(cfg: MuseumConfig, seed: int) -> list[dict]:
    """``BatchNorm1d(width, momentum=0.99)`` (bug) vs the default 0.1 (fix)."""
    ds = _load(cfg.data)
    rows = []
    for arm, mom in (("bug", 0.99), ("fix", None)):
        net = _train(cfg, seed, momentum=0.99) if mom else _train(cfg, seed)
        rows.append(dict(arm=arm, accuracy=evaluate(net, ds.test, batch_size=4096)[1],
                         findings=_report(net, ds.train.x[:cfg.train.batch_size]) if arm == "bug" else ""))
    return rows


def no_running_stats(cfg: MuseumConfig, seed: int) -> list[dict]:
    """``track_running_stats=False`` (bug) vs the default (fix), tested in batches of
    every size in ``cfg.eval_batches``."""
    ds = _load(cfg.data)
    rows = []
    for arm in ("bug", "fix"):
        net = _train(cfg, seed, track_running_stats=False) if arm == "bug" else _train(cfg, seed)
        report = _report(net, ds.train.x[:cfg.train.batch_size]) if arm == "bug" else ""
        for b in cfg.eval_batches:
            rows.append(dict(arm=arm, eval_batch=b, findings=report,
                             accuracy=evaluate(net, ds.test, batch_size=b)[1]))
    return rows


def params_only_checkpoint(cfg: MuseumConfig, seed: int) -> list[dict]:
    """Save ``{k: v for k, v in model.named_parameters()}`` and reload it with
    ``strict=False`` (bug) vs save and reload ``model.state_dict()`` (fix)."""
    ds = _load(cfg.data)
    net = _train(cfg, seed)
    rows = []
    for arm in ("bug", "fix"):
        ckpt = ({k: v.detach().clone() for k, v in net.named_parameters()} if arm == "bug"
                else copy.deepcopy(net.state_dict()))
        fresh = build(cfg, seed + 1000)
        fresh.load_state_dict(ckpt, strict=False)
        fresh.eval()
        rows.append(dict(arm=arm, accuracy=evaluate(fresh, ds.test, batch_size=4096)[1],
                         findings=_report(fresh, ds.train.x[:cfg.train.batch_size]) if arm == "bug" else ""))
    return rows


def one_value_per_channel(cfg: MuseumConfig, seed: int) -> list[dict]:
    """A training set of ``k · batch_size + 1`` examples, one epoch: keeping the ragged
    last batch (bug) fails at its end; dropping it (fix) trains."""
    ds = _load(cfg.data)
    k = len(ds.train.y) // cfg.train.batch_size - 1
    n = k * cfg.train.batch_size + 1
    x, y = ds.train.x[:n], ds.train.y[:n]
    rows = []
    for arm in ("bug", "fix"):
        net = build(cfg, seed)
        note, acc, findings = "", float("nan"), ""
        try:
            done = fit(net, x, y, override(cfg.train, {"steps": k + 1}), seed,
                       drop_last=arm == "fix")
            acc, note = evaluate(net, ds.test, batch_size=4096)[1], f"trained {done} steps"
        except ValueError as e:
            note = str(e)
            findings = _report(net, x[-1:])  # the ragged last batch: one example
        rows.append(dict(arm=arm, accuracy=acc, note=note, findings=findings))
    return rows


def _invert(x: Tensor) -> Tensor:
    """The new domain: pixel values flipped (scaled inputs lie in [0, 1])."""
    return 1.0 - x


def frozen_bn_finetune(cfg: MuseumConfig, seed: int) -> list[dict]:
    """Pretrain on the task, then fine-tune a copy of the head on inverted images with
    every backbone parameter frozen. Bug: ``model.train()`` during fine-tuning (the batch
    norms' running statistics move to the new domain); fix: batch norms kept in eval mode.
    ``accuracy`` is the *old* task (original head, original test images) after
    fine-tuning; ``new_task`` the fine-tuned head on inverted test images."""
    ds = _load(cfg.data)
    pre = _train(cfg, seed)
    rows = [dict(arm="pretrained", accuracy=evaluate(pre, ds.test, batch_size=4096)[1])]
    for arm in ("bug", "fix"):
        net = copy.deepcopy(pre)
        old_head = copy.deepcopy(net.head)
        for p in net.parameters():
            p.requires_grad_(False)
        for p in net.head.parameters():
            p.requires_grad_(True)
        findings = _report(net, ds.train.x[:cfg.train.batch_size]) if arm == "bug" else ""

        fit(net, _invert(ds.train.x), ds.train.y, override(cfg.train, {"steps": cfg.finetune_steps}),
            seed, bn_eval=arm == "fix")
        new_task = evaluate(net, datasets.Split(_invert(ds.test.x), ds.test.y), batch_size=4096)[1]
        net.head = old_head
        rows.append(dict(arm=arm, accuracy=evaluate(net, ds.test, batch_size=4096)[1],
                         new_task=new_task, findings=findings))
    return rows


EXHIBITS: dict[str, Callable[[MuseumConfig, int], list[dict]]] = {
    "keras_momentum": keras_momentum,
    "no_running_stats": no_running_stats,
    "params_only_checkpoint": params_only_checkpoint,
    "one_value_per_channel": one_value_per_channel,
    "frozen_bn_finetune": frozen_bn_finetune,
}


def plot_museum(df: pd.DataFrame):
    """Test accuracy of the bug and fix arms of every exhibit (mean over seeds; for
    ``no_running_stats`` at the smallest test batch)."""
    import matplotlib.pyplot as plt
    view = df.copy()
    if "eval_batch" in view:
        small = view.groupby("exhibit")["eval_batch"].transform("min")
        view = view[view["eval_batch"].isna() | (view["eval_batch"] == small)]
    view = view[view["arm"].isin(["bug", "fix"])]
    mean = view.groupby(["exhibit", "arm"], sort=False)["accuracy"].mean().unstack("arm")
    ax = plt.gca()
    mean = mean.reindex(columns=["bug", "fix"])
    mean.plot.barh(ax=ax, color=["tab:red", "tab:green"])
    for i, value in enumerate(mean["bug"]):
        if value != value:  # NaN: the bug arm crashed
            ax.text(0.01, i - 0.12, "crashed", va="center", fontsize=8, color="tab:red")
    ax.invert_yaxis()  # the exhibits top to bottom, in museum order
    ax.legend(title="", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_xlabel("test accuracy (eval mode)")
    ax.set_ylabel("")
    ax.set_xlim(0, 1)
    return ax


@register("bug_museum", MuseumConfig, title="The batch-norm bug museum", chapter="22_bug_museum",
          plot=plot_museum)
def bug_museum(cfg: MuseumConfig) -> pd.DataFrame:
    """Every exhibit × seed; columns ``exhibit, arm, seed, accuracy, eval_batch, new_task,
    note, findings`` (absent values NaN or empty)."""
    unknown = [e for e in cfg.exhibits if e not in EXHIBITS]
    if unknown:
        raise ValueError(f"unknown exhibits {unknown}; choose from {list(EXHIBITS)}")
    rows = [dict(exhibit=name, seed=seed, **row) for seed in cfg.seeds for name in cfg.exhibits
            for row in cache.cell({"exhibit": name, "cfg": cfg, "seed": seed},
                                  lambda: EXHIBITS[name](cfg, seed))]
    df = pd.DataFrame(rows)
    for col, fill in (("eval_batch", float("nan")), ("new_task", float("nan")), ("note", ""),
                      ("findings", "")):
        df[col] = df[col].fillna(fill) if col in df else fill
    return df[["exhibit", "arm", "seed", "accuracy", "eval_batch", "new_task", "note", "findings"]]
