"""The one training engine every experiment uses.

``train(model, data, steps=..., lr=..., seed=...)`` runs mini-batch training and returns a
tidy :class:`pandas.DataFrame` with one row per (evaluation step, split)::

    step  split  loss  accuracy  elapsed  diverged

``elapsed`` counts training seconds only (evaluation excluded). Split ``"batch"`` is the
mean training-batch loss and accuracy since the previous evaluation (train mode, as the
optimiser saw them); the other splits are evaluated in eval mode on the whole split.

Fair comparisons: the batch order comes from a generator seeded with ``seed``, so two arms
trained with the same seed see exactly the same batches; seed the model's initialisation
yourself (``torch.manual_seed(seed)`` before building it), or use :func:`seeded`.

Divergence is data, not a crash: when the loss becomes NaN/inf or a weight's norm
exceeds ``max_weight_norm``, training stops, the rows so far are returned and every row
of the run carries ``diverged=True`` (with ``diverged_step`` in ``df.attrs``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import progress, runtime
from .data import Dataset, Split
from .optim import SGD

if TYPE_CHECKING:
    from .models import ModelSpec

__all__ = ["TrainSpec", "fit", "train", "evaluate", "resolve_device", "seeded", "make_optimizer",
           "StepInfo", "batches", "loss_fn", "HISTORY_COLUMNS"]

HISTORY_COLUMNS = ["step", "split", "loss", "accuracy", "elapsed", "diverged"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple's MPS, then the CPU; other names are checked."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but no CUDA GPU is available; "
                           "use device='auto' or 'cpu'")
    return dev


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model right after ``torch.manual_seed(seed)``: paired arms get paired inits."""
    torch.manual_seed(seed)
    return build()


def loss_fn(data: Dataset) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy for classification, mean squared error for regression."""
    return F.cross_entropy if data.num_classes is not None else F.mse_loss


def make_optimizer(params: Iterable[nn.Parameter], name: str = "sgd", lr: float = 0.1,
                   momentum: float = 0.0, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``"sgd"`` (with optional heavy-ball momentum: :class:`bnlib.optim.SGD`, torch's update
    without the seconds of importing ``torch._dynamo``) or ``"adam"`` (``torch.optim.Adam``)."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate must be a positive finite number, got {lr}")
    if name == "sgd":
        return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterable[Tensor]:
    """Endless stream of index batches: reshuffle every epoch, drop the ragged last batch
    (a batch norm must never see a batch of one)."""
    if batch_size >= n:
        while True:
            yield torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def evaluate(model: nn.Module, split: Split, *, loss: Callable | None = None,
             batch_size: int = 2048, classification: bool = True) -> tuple[float, float]:
    """Loss and accuracy of ``model`` on ``split`` in eval mode (mode restored after): the
    engine's call into :func:`bnlib.inference.evaluate`, the book's one evaluator."""
    from .inference import evaluate as _evaluate
    return _evaluate(model, split, batch_size=batch_size, loss=loss)


@dataclass
class StepInfo:
    """What a callback sees after each optimiser step."""

    step: int
    model: nn.Module
    loss: Tensor
    x: Tensor
    y: Tensor
    optimizer: torch.optim.Optimizer


def _weights_exploded(model: nn.Module, limit: float) -> bool:
    return any(not torch.isfinite(p).all() or p.norm() > limit for p in model.parameters())


def train(model: nn.Module, data: Dataset, *, steps: int | None = None, epochs: float | None = None,
          lr: float = 0.1, batch_size: int = 64, optimizer: str | Callable = "sgd",
          momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0,
          device: str | torch.device = "auto", eval_every: int | None = None,
          eval_splits: Sequence[str] = ("val",), callbacks: Sequence[Callable[[StepInfo], None]] = (),
          max_weight_norm: float = 1e6, show_progress: bool | None = None,
          sampler: Callable[[int, int, torch.Generator], Iterable[Tensor]] | None = None) -> pd.DataFrame:
    """Train ``model`` on ``data.train`` and return the evaluation history.

    Give ``steps`` or ``epochs``. ``optimizer`` is ``"sgd"``, ``"adam"`` or a callable
    ``params -> torch.optim.Optimizer``. ``eval_every`` defaults to about 10 evaluations.
    ``callbacks`` run after every step with a :class:`StepInfo` (probes use this); a
    callback with an ``on_train_start(model)`` method also sees the untrained model.
    ``sampler`` (optional) replaces :func:`batches`, the i.i.d. reshuffling batch order:
    a callable ``(n, batch_size, generator) -> endless iterator of index tensors`` into
    ``data.train`` (chapter 16 uses it for class-sorted, non-i.i.d. batches).
    The model is trained in place and left in eval mode on ``device``.
    """
    n = len(data.train)
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (batch norm needs two examples), got {batch_size}")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    steps = int(steps if steps is not None else math.ceil(epochs * max(n // batch_size, 1)))
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    for s in eval_splits:
        data.split(s)  # raises on a bad name
    eval_every = eval_every or max(steps // 10, 1)
    dev = resolve_device(device)
    model.to(dev)
    data = data.to(dev)
    classification = data.num_classes is not None
    criterion = loss_fn(data)
    opt = optimizer(model.parameters()) if callable(optimizer) else make_optimizer(
        model.parameters(), optimizer, lr, momentum, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    stream = iter((sampler or batches)(n, batch_size, gen))

    rows: list[dict] = []
    elapsed, diverged_step = 0.0, None
    run_loss, run_correct, run_count, run_seen = 0.0, 0, 0, 0

    def log(step: int) -> bool:
        """Evaluate every split; return False when the run has diverged."""
        nonlocal run_loss, run_correct, run_count, run_seen
        if run_count:
            rows.append(dict(step=step, split="batch", loss=run_loss / run_count,
                             accuracy=run_correct / run_seen if classification else float("nan"),
                             elapsed=elapsed))
            run_loss, run_correct, run_count, run_seen = 0.0, 0, 0, 0
        ok = True
        for s in eval_splits:
            loss, acc = evaluate(model, data.split(s), loss=criterion, classification=classification)
            ok &= math.isfinite(loss)
            if math.isfinite(loss):
                rows.append(dict(step=step, split=s, loss=loss, accuracy=acc, elapsed=elapsed))
        return ok and not _weights_exploded(model, max_weight_norm)

    model.train()
    for cb in callbacks:  # e.g. a probe that records the untrained network at step 0
        start = getattr(cb, "on_train_start", None)
        if start is not None:
            start(model)
    if not log(0):
        diverged_step = 0
    steps_iter = progress.bar(range(1, steps + 1), total=steps, desc="train", show=show_progress)
    for step in ([] if diverged_step is not None else steps_iter):
        idx = next(stream).to(dev)
        x, y = data.train.x[idx], data.train.y[idx]
        t0 = time.perf_counter()
        out = model(x)  # train mode: set above; evaluate() and the probes restore it
        loss = criterion(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elapsed += time.perf_counter() - t0
        value = loss.item()
        if not math.isfinite(value):
            diverged_step = step
            break
        run_loss += value
        run_count += 1
        run_seen += len(y)  # the whole set when batch_size >= n
        if classification:
            run_correct += (out.argmax(1) == y).sum().item()
        for cb in callbacks:
            cb(StepInfo(step, model, loss.detach(), x, y, opt))
        if callbacks and not model.training:  # a callback left the model in eval mode
            model.train()
        if step % eval_every == 0 or step == steps:
            if not log(step):
                diverged_step = step
                break
    model.eval()
    df = pd.DataFrame(rows, columns=["step", "split", "loss", "accuracy", "elapsed"])
    df["diverged"] = diverged_step is not None
    df.attrs["diverged_step"] = diverged_step
    df.attrs["steps"] = steps
    return df


# --- the protocol's one training call -----------------------------------------------------

@dataclass(frozen=True)
class TrainSpec:
    """How a network is trained, as data (the optimiser, its schedule and what is logged).

    ``eval_every`` sets how often the val/test splits are evaluated: a time to target is
    interpolated between evaluations (``bnlib.analysis``), so it is not set by this interval.
    """

    optimizer: str = "sgd"            # "sgd" (heavy-ball momentum) or "adam"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    steps: int = 300
    batch_size: int = 64
    eval_every: int = 10
    eval_splits: tuple[str, ...] = ("val", "test")
    device: str = "auto"              # auto | cpu | cuda | cuda:N | mps
    sync_bn: bool = False             # under torchrun: synced batch statistics across ranks


def fit(model: "ModelSpec", spec: TrainSpec, data: Dataset | str, seed: int, *,
        callbacks: Sequence[Callable[[StepInfo], None]] = (),
        sampler: Callable[[int, int, torch.Generator], Iterable[Tensor]] | None = None,
        max_weight_norm: float = 1e6) -> pd.DataFrame:
    """Train ``model`` (a spec, built with ``seed``) on ``data`` with ``spec``: one run.

    The model's initialisation and the batch order both come from ``seed``, so arms that
    share a seed are paired. Launched by ``torchrun --nproc_per_node N``, every rank trains
    its shard of each global batch in ``DistributedDataParallel`` (gloo on the CPU, NCCL on
    GPUs; :mod:`bnlib.distributed`), with batch norm per device or synced (``spec.sync_bn``). Runs with bnlib's thread count (:mod:`bnlib.runtime`), so the
    history is the same on every machine setting. Returns the tidy history
    (``step, split, loss, accuracy, elapsed, diverged``); the trained network is in
    ``df.attrs["model"]`` for probes that need it afterwards.
    """
    from . import data as datasets
    from . import distributed
    ds = datasets.load(data) if isinstance(data, str) else data
    ds = model.inputs(ds)
    dtype = ds.train.x.dtype if ds.train.x.is_floating_point() else None
    if distributed.launched():  # under torchrun: this rank's share of data-parallel training
        distributed.init_from_env()
        with runtime.pinned_threads():
            df, net = distributed.train_data_parallel(
                lambda: model.build(seed, ds).to(dtype), ds, seed=seed, sync_bn=spec.sync_bn, ddp=True,
                device=None if spec.device == "auto" else spec.device, steps=spec.steps,
                lr=spec.lr, batch_size=spec.batch_size, optimizer=spec.optimizer,
                momentum=spec.momentum, weight_decay=spec.weight_decay,
                eval_every=spec.eval_every, eval_splits=spec.eval_splits, callbacks=callbacks,
                max_weight_norm=max_weight_norm)
        df.attrs["model"] = net
        return df
    with runtime.pinned_threads():
        net = model.build(seed, ds).to(dtype)  # float64 data trains a float64 network
        df = train(net, ds, steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size,
                   optimizer=spec.optimizer, momentum=spec.momentum,
                   weight_decay=spec.weight_decay, seed=seed, device=spec.device,
                   eval_every=spec.eval_every, eval_splits=spec.eval_splits,
                   callbacks=callbacks, max_weight_norm=max_weight_norm, sampler=sampler)
    df.attrs["model"] = net
    return df
