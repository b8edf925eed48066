"""``bnlib doctor``: find the usual batch-norm mistakes in a model, before they cost a run.

``diagnose(model, example_batch)`` returns a list of :class:`Finding` (empty for a healthy
model). It works with torch's and bnlib's batch-norm layers and leaves the model exactly as
it found it: every forward pass runs on a deep copy (or, for a model that cannot be copied,
on the model itself with parameters, buffers, ``requires_grad`` and train/eval flags
restored afterwards).

The structure (which module feeds which) is found by *tracing*: one forward pass with hooks
on every leaf module records, for each call, the calls that produced its input tensors. So
it sees through ``nn.Sequential``, custom ``forward`` methods (``bnlib.models.Net`` and
``Block``) and ``nn.Identity``; an arithmetic step written in ``forward`` (``x + h``,
``torch.flatten``) breaks a "directly feeds" link, as it should.

The checks (``Finding.code``):

* ``bias-before-bn``: a Linear/Conv with a bias feeds a batch norm directly; BN subtracts
  the mean, so the bias is a wasted parameter (β plays its role);
* ``keras-momentum``: ``momentum >= 0.5``; PyTorch's momentum weighs the *new* batch, so
  Keras' 0.99 is PyTorch's 0.01; ``zero-momentum``: ``momentum=0`` never updates the stats;
* ``bn-on-logits``: a batch norm is the last module, producing the model's output;
* ``dropout-before-bn``: dropout feeds a batch norm, directly or through a Linear/Conv
  (the train/test "variance shift");
* ``no-running-stats`` / ``train-mode-in-eval`` / ``eval-batch-dependent``: in eval mode,
  a sample's output depends on the rest of the batch; measured by running the model in
  eval mode on the batch and on a different batch that contains the same first sample;
* ``one-value-per-channel`` (a train-mode forward fails: "Expected more than 1 value per
  channel when training") and ``few-values-per-channel``: fewer than ``min_values``
  (default :data:`MIN_VALUES`, 8) values per channel in the example batch give noisy
  batch statistics;
* ``bad-running-stats``: a NaN or infinite running mean or variance, or a running variance
  ≤ 0;
* ``stats-never-updated``: a layer in eval mode still has the initial statistics (mean 0,
  variance 1, no batch tracked): the model was never trained, or the buffers were not
  saved/loaded;
* ``frozen-but-updating``: γ and β are frozen (``requires_grad=False``) while other
  parameters train, yet after ``model.train()`` a forward pass still moves the layer's
  running statistics.

Command line: ``python -m bnlib doctor FILE.py:FACTORY`` or ``module.path:FACTORY`` (see
:func:`main`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import math
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .nn import _BatchNorm as _BnlibBatchNorm

__all__ = ["Finding", "diagnose", "main", "MIN_VALUES", "CODES"]

MIN_VALUES = 8
"""Fewer values than this per channel in a training batch is flagged: with m values the
batch variance has a relative standard deviation of about √(2/(m−1)), over 50 % at m = 8."""

CODES = ("bias-before-bn", "keras-momentum", "zero-momentum", "bn-on-logits",
         "dropout-before-bn", "no-running-stats", "train-mode-in-eval", "eval-batch-dependent",
         "one-value-per-channel", "few-values-per-channel", "bad-running-stats",
         "stats-never-updated", "frozen-but-updating")

_BN_KINDS = (_BnlibBatchNorm, nn.modules.batchnorm._BatchNorm)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# modules that only reshape or pass a tensor on: "A feeds B" looks through them
_PASS = (nn.Identity, nn.Flatten, nn.Unflatten)
# elementwise or pooling modules that keep dropout's variance shift on its way to a BN
_TRANSPARENT = _PASS + (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.ELU, nn.SiLU, nn.Tanh,
                        nn.Sigmoid, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class Finding:
    """One problem: a ``code`` (see :data:`CODES`), the ``layer`` (qualified module name,
    ``""`` for the whole model), what is wrong, why it matters and the fix."""

    code: str
    layer: str
    what: str
    why: str
    fix: str

    def __str__(self) -> str:
        where = self.layer or "(model)"
        return f"[{self.code}] {where}: {self.what}\n    why: {self.why}\n    fix: {self.fix}"


# --- helpers ------------------------------------------------------------------------------

def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BN_KINDS)


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in a (nested) tuple/list/dict, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _take(batch: Any, idx: Tensor) -> Any:
    """The examples ``idx`` (along dim 0) of every tensor in ``batch``."""
    if isinstance(batch, Tensor):
        return batch[idx.to(batch.device)]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(b, idx) for b in batch)
    if isinstance(batch, dict):
        return {k: _take(v, idx) for k, v in batch.items()}
    return batch


def _batch_size(batch: Any) -> int:
    ts = _tensors(batch)
    return int(ts[0].shape[0]) if ts and ts[0].dim() > 0 else 0


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, Tensor)}


@contextlib.contextmanager
def _sandbox(model: nn.Module) -> Iterator[nn.Module]:
    """A copy of ``model`` to run forward passes on; when the model cannot be deep-copied,
    the model itself, with its state, ``requires_grad`` and train/eval flags restored."""
    try:
        work = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - e.g. a module holding an un-copyable handle
        work = None
    if work is not None:
        yield work
        return
    saved = _state(model)
    flags = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    finally:
        with torch.no_grad():
            live = model.state_dict(keep_vars=True)
            for k, v in saved.items():
                live[k].data.copy_(v)
        for m, t in flags:
            m.training = t
        for p, g in grads:
            p.requires_grad_(g)


@dataclass
class _Call:
    name: str
    module: nn.Module
    training: bool
    inputs: list[Tensor]
    sources: list["_Call | None"]
    outputs: list[Tensor] = field(default_factory=list)


@dataclass
class _Trace:
    calls: list[_Call]
    output: list[Tensor]
    producer: dict[int, _Call]
    error: BaseException | None = None

    def source(self, t: Tensor) -> _Call | None:
        return self.producer.get(id(t))


def _trace(model: nn.Module, batch: Any) -> _Trace:
    """One forward pass (no gradients) recording every leaf-module call and its sources."""
    calls: list[_Call] = []
    producer: dict[int, _Call] = {}
    keep: list[Tensor] = []  # hold every tensor so that no id() is reused during the trace
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def pre(module, args, kwargs=None):
        ins = _tensors(args) + _tensors(kwargs or {})
        keep.extend(ins)
        calls.append(_Call(names[module], module, module.training, ins,
                           [producer.get(id(t)) for t in ins]))

    def post(module, args, output):
        call = next(c for c in reversed(calls) if c.module is module and not c.outputs)
        call.outputs = _tensors(output)
        keep.extend(call.outputs)
        for t in call.outputs:
            producer[id(t)] = call

    for m in model.modules():
        if not any(True for _ in m.children()) or _is_bn(m):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    error, output = None, []
    try:
        with torch.no_grad():
            output = _tensors(_call(model, batch))
    except Exception as e:  # noqa: BLE001 - reported by the caller
        error = e
    finally:
        for h in handles:
            h.remove()
    return _Trace(calls, output, producer, error)


def _walk(call: _Call | None, through: tuple[type, ...]) -> _Call | None:
    """Follow single-input ``through`` modules back to the call that really made a tensor."""
    seen = 0
    while call is not None and isinstance(call.module, through) and len(call.sources) == 1:
        call, seen = call.sources[0], seen + 1
        if seen > 1000:
            break
    return call


def _channels(layer: nn.Module) -> int | None:
    return getattr(layer, "out_features", None) or getattr(layer, "out_channels", None)


# --- the checks ---------------------------------------------------------------------------

def _static_checks(model: nn.Module) -> list[Finding]:
    out: list[Finding] = []
    root_eval = not model.training
    for name, m in model.named_modules():
        if not _is_bn(m):
            continue
        mom = m.momentum
        if m.track_running_stats and mom is not None and mom >= 0.5:
            out.append(Finding(
                "keras-momentum", name, f"momentum={mom:g}",
                "PyTorch's momentum is the weight of the NEW batch (running = (1-m)·running + "
                f"m·batch); {mom:g} keeps almost only the last batch, so the inference "
                "statistics are as noisy as one batch. Keras' momentum=0.99 means the opposite.",
                f"use momentum={1 - mom:g} (PyTorch's convention), or the default 0.1"))
        if m.track_running_stats and mom == 0:
            out.append(Finding(
                "zero-momentum", name, "momentum=0: the running statistics never move",
                "eval mode normalises with mean 0 and variance 1 forever, whatever the data.",
                "use momentum=0.1 (or None for a cumulative average)"))
        if m.running_mean is None or m.running_var is None:
            out.append(Finding(
                "no-running-stats", name, "track_running_stats=False: no running statistics",
                "in eval mode the layer still normalises with the statistics of the current "
                "batch, so a prediction depends on the other samples in the batch and on its size.",
                "construct the layer with track_running_stats=True (the default) and train it"))
            continue
        if root_eval and m.training:
            out.append(Finding(
                "train-mode-in-eval", name, "the model is in eval mode but this layer is in train mode",
                "the layer normalises with batch statistics and keeps updating its running "
                "statistics at test time, so predictions depend on the batch.",
                "call model.eval() after any code that switches single layers to train()"))
        rm, rv = m.running_mean, m.running_var
        if not (torch.isfinite(rm).all() and torch.isfinite(rv).all()) or (rv <= 0).any():
            bad = int((~torch.isfinite(rv) | (rv <= 0)).sum() + (~torch.isfinite(rm)).sum())
            out.append(Finding(
                "bad-running-stats", name,
                f"{bad} running mean/variance entries are NaN, infinite or (variance) ≤ 0",
                "eval-mode outputs of those channels are NaN or garbage; usually a diverged or "
                "half-precision training step was folded into the running statistics.",
                "find the step that diverged, then recompute the statistics on clean data "
                "(reset_running_stats() and a few train-mode passes with momentum=None)"))
        elif (not m.training and int(m.num_batches_tracked) == 0
              and bool((rm == 0).all()) and bool((rv == 1).all())):
            out.append(Finding(
                "stats-never-updated", name,
                "in eval mode with the initial statistics (mean 0, variance 1, 0 batches tracked)",
                "eval mode normalises with statistics that never saw the data: the model was not "
                "trained, or its buffers were lost, e.g. a checkpoint built from "
                "named_parameters() instead of state_dict().",
                "save and load model.state_dict() (it holds the buffers), or train first"))
    return out


def _structure_checks(trace: _Trace, min_values: int,
                      training: set[int] | None = None) -> list[Finding]:
    """Checks read off a trace; ``training`` (module ids) says which layers count as in
    train mode for the values-per-channel check (default: their mode during the trace)."""
    out: list[Finding] = []
    done: set[tuple[str, str]] = set()

    def add(f: Finding) -> None:
        if (f.code, f.layer) not in done:
            done.add((f.code, f.layer))
            out.append(f)

    for call in trace.calls:
        if not _is_bn(call.module) or not call.inputs:
            continue
        bn, x = call.module, call.inputs[0]
        # values per channel, in a train-mode pass
        in_train = call.training if training is None else id(bn) in training
        if in_train and x.dim() >= 2:
            per = x.numel() // max(int(x.shape[1]), 1)
            if per <= 1:
                add(Finding(
                    "one-value-per-channel", call.name,
                    f"input {tuple(x.shape)} has {per} value per channel in train mode",
                    "torch raises 'Expected more than 1 value per channel when training': the "
                    "batch variance of one value is 0 (a batch of 1, or a 1×1 feature map at "
                    "batch size 1).",
                    "train with batches of ≥ 2 (drop the ragged last batch: drop_last=True), or "
                    "keep this layer in eval mode / use GroupNorm or LayerNorm"))
            elif per < min_values:
                add(Finding(
                    "few-values-per-channel", call.name,
                    f"input {tuple(x.shape)} has only {per} values per channel (< {min_values})",
                    "batch statistics from so few values are very noisy, and the running "
                    "statistics learned from them do not match the batch statistics training used.",
                    "use larger batches, or a batch-independent norm (GroupNorm, LayerNorm)"))
        src = call.sources[0] if call.sources else None
        # bias right before BN
        prev = _walk(src, _PASS)
        if (prev is not None and isinstance(prev.module, _WEIGHT_LAYERS)
                and prev.module.bias is not None and _channels(prev.module) == bn.num_features):
            add(Finding(
                "bias-before-bn", prev.name,
                f"{type(prev.module).__name__} with a bias feeds the batch norm {call.name}",
                "BN subtracts the per-channel mean, which removes any constant bias: the bias "
                "gets no useful gradient and only wastes parameters (BN's β is the bias).",
                f"build {prev.name} with bias=False"))
        # dropout → [Linear/Conv] → BN
        prev = _walk(src, _TRANSPARENT)
        if prev is not None and isinstance(prev.module, _WEIGHT_LAYERS) and len(prev.sources) == 1:
            prev = _walk(prev.sources[0], _TRANSPARENT)
        if prev is not None and isinstance(prev.module, _DROPOUTS) and prev.module.p > 0:
            add(Finding(
                "dropout-before-bn", call.name,
                f"{prev.name} ({type(prev.module).__name__}, p={prev.module.p:g}) feeds this batch norm",
                "dropout changes the variance of what BN sees between train and eval mode, so the "
                "running variance learned in training is wrong at test time (the 'variance shift').",
                "put dropout after the last batch norm (just before the classifier), or drop it"))
    # BN producing the output
    for t in trace.output:
        last = _walk(trace.source(t), _PASS)
        if last is not None and _is_bn(last.module):
            add(Finding(
                "bn-on-logits", last.name, "a batch norm produces the model's output",
                "normalising the logits forces every output to batch mean β and scale γ, which "
                "fights the loss (and in eval mode the outputs shift with the running statistics).",
                "remove the final batch norm; end with the Linear classifier"))
    return out


def _inference_mode(model: nn.Module) -> None:
    """The copy as it would predict: as handed when it is already in eval mode (so a layer
    left in train mode stays there), otherwise after ``model.eval()``."""
    if model.training:
        model.eval()


def _batch_dependence(model: nn.Module, batch: Any) -> float | None:
    """max |Δ output of sample 0| between the batch and a different batch holding sample 0
    (relative to the output scale), in inference mode; ``None`` for a batch of one."""
    n = _batch_size(batch)
    if n < 2:
        return None
    _inference_mode(model)
    other = [0] + list(range(n // 2 + 1, n))
    if len(other) < 2:
        other = [0, 0]
    with torch.no_grad():
        full = _tensors(_call(model, batch))
        part = _tensors(_call(model, _take(batch, torch.tensor(other))))
    worst = 0.0
    for a, b in zip(full, part):
        if a.dim() == 0 or b.dim() == 0 or not a.is_floating_point():
            continue
        a0, b0 = a[0].double(), b[0].double()
        if a0.shape != b0.shape:
            continue
        scale = 1.0 + float(a0.abs().max()) if a0.numel() else 1.0
        diff = float((a0 - b0).abs().max()) if a0.numel() else 0.0
        if not math.isfinite(diff):
            continue
        worst = max(worst, diff / scale)
    return worst


def _frozen_checks(model: nn.Module, work: nn.Module) -> list[Finding]:
    """``work`` is a copy after ``.train()`` and one forward: which frozen BNs moved?"""
    if not any(p.requires_grad for p in model.parameters()):
        return []  # a fully frozen model is an inference model, not a fine-tuning setup
    out = []
    theirs = dict(work.named_modules())
    for name, m in model.named_modules():
        if not (_is_bn(m) and m.affine and m.track_running_stats and m.running_mean is not None):
            continue
        params = [p for p in (m.weight, m.bias) if p is not None]
        if any(p.requires_grad for p in params):
            continue
        w = theirs.get(name)
        if w is None or w.running_mean is None:
            continue
        moved = not (torch.equal(w.running_mean, m.running_mean)
                     and torch.equal(w.running_var, m.running_var))
        if moved:
            out.append(Finding(
                "frozen-but-updating", name,
                "γ and β are frozen (requires_grad=False) but model.train() still updates the "
                "running statistics",
                "requires_grad only stops the gradient: in train mode the layer still normalises "
                "with batch statistics and overwrites the pretrained running statistics, so "
                "'frozen' layers drift during fine-tuning.",
                "keep these layers in eval mode during fine-tuning (call .eval() on them after "
                "every model.train()), or replace them with a frozen batch norm"))
    return out


def diagnose(model: nn.Module, example_batch: Any, *, min_values: int = MIN_VALUES,
             tolerance: float = 1e-4) -> list[Finding]:
    """The batch-norm problems of ``model``, checked on ``example_batch``.

    ``example_batch`` is what ``model`` takes: a tensor (examples along dim 0), a tuple of
    them (called as ``model(*batch)``) or a dict (``model(**batch)``). A healthy model
    gets ``[]``. ``min_values``: fewer values per channel in a train-mode pass is flagged.
    ``tolerance``: an eval-mode output that moves by more than this (relative) when the
    rest of the batch changes is flagged. The model is left exactly as it was (state,
    ``requires_grad`` and every train/eval flag). Raises ``ValueError`` when the model
    cannot run on the batch at all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose needs a torch.nn.Module, got {type(model).__name__}")
    findings = _static_checks(model)
    with _sandbox(model) as work:
        work.train()
        trace = _trace(work, example_batch)
        structure = _structure_checks(trace, min_values)
        if trace.error is not None:
            if not any(f.code == "one-value-per-channel" for f in structure):
                raise ValueError(f"the model fails on the example batch in train mode: "
                                 f"{type(trace.error).__name__}: {trace.error}") from trace.error
            # a batch of one cannot train: read the rest of the structure in eval mode (a
            # layer without running statistics may fail there too; keep what was traced)
            in_train = {id(m) for m in work.modules() if m.training}
            work.eval()
            trace = _trace(work, example_batch)
            seen = {(f.code, f.layer) for f in structure}
            structure += [f for f in _structure_checks(trace, min_values, in_train)
                          if (f.code, f.layer) not in seen]
        else:
            findings += _frozen_checks(model, work)
    findings += structure
    with _sandbox(model) as work:
        try:
            moved = _batch_dependence(work, example_batch)
        except Exception:  # noqa: BLE001 - e.g. a custom forward that needs a full batch
            moved = None
    culprits = {f.layer for f in findings if f.code in ("no-running-stats", "train-mode-in-eval")}
    if moved is not None and moved > tolerance:
        note = (f" (measured: in eval mode the model's output for one sample moved by "
                f"{moved:.3g}, relative, when the rest of the batch changed)")
        findings = [Finding(f.code, f.layer, f.what + note, f.why, f.fix)
                    if f.layer in culprits and f.code in ("no-running-stats", "train-mode-in-eval")
                    else f for f in findings]
        if not culprits:
            findings.append(Finding(
                "eval-batch-dependent", "",
                f"in eval mode, sample 0's output moved by {moved:.3g} (relative) when the rest "
                "of the batch changed",
                "a prediction must not depend on which other samples share its batch; some "
                "layer still uses batch statistics at test time.",
                "find the layer that normalises over the batch in eval mode (a custom norm, or a "
                "batch norm that ignores self.training) and give it running statistics"))
    return findings


# --- command line -------------------------------------------------------------------------

class _LoadError(Exception):
    """A one-line reason the target could not be loaded (exit status 2)."""


def _load_factory(target: str) -> Callable:
    if ":" not in target:
        raise _LoadError(f"expected FILE.py:FACTORY or module.path:FACTORY, got {target!r}")
    where, _, attr = target.rpartition(":")
    if not where or not attr:
        raise _LoadError(f"expected FILE.py:FACTORY or module.path:FACTORY, got {target!r}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise _LoadError(f"no such file: {where}")
        spec = importlib.util.spec_from_file_location(f"_bnlib_doctor_{uuid.uuid4().hex}", path)
        if spec is None or spec.loader is None:
            raise _LoadError(f"cannot import {where} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))  # its own sibling imports work
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:
            raise _LoadError(f"syntax error in {where}, line {e.lineno}: {e.msg}") from None
        except BaseException as e:  # noqa: BLE001 - any failure of user code is one line
            if isinstance(e, KeyboardInterrupt):
                raise
            raise _LoadError(f"importing {where} raised {type(e).__name__}: {e}") from None
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(where)
        except SyntaxError as e:
            raise _LoadError(f"syntax error in module {where}, line {e.lineno}: {e.msg}") from None
        except ImportError as e:
            raise _LoadError(f"cannot import module {where}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise _LoadError(f"importing {where} raised {type(e).__name__}: {e}") from None
    if not hasattr(module, attr):
        raise _LoadError(f"{where} has no attribute {attr!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise _LoadError(f"{where}:{attr} is a {type(factory).__name__}, not a callable")
    return factory


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape like 32,3,28,28: {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"not a shape like 32,3,28,28: {text!r}")
    return shape


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bnlib doctor",
        description="Check a model for the usual batch-norm mistakes (exit 0: none, 1: findings, "
                    "2: the model could not be loaded or run).")
    p.add_argument("target", help="FILE.py:FACTORY or module.path:FACTORY; FACTORY() returns a "
                                  "model or a (model, example_batch) tuple")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="shape of a random example batch, e.g. 32,3,28,28, when the factory "
                        "returns only a model (default: the factory's input_shape attribute)")
    p.add_argument("--min-values", type=int, default=MIN_VALUES,
                   help=f"flag fewer values per channel than this (default {MIN_VALUES})")
    return p


def main(argv: Sequence[str]) -> int:
    """``python -m bnlib doctor TARGET [--input-shape 32,3,28,28]``.

    ``TARGET`` is ``path/to/file.py:factory`` or ``package.module:factory``. ``factory()``
    (called with no arguments) returns either ``(model, example_batch)`` or just a model;
    for a model alone the example batch is ``torch.randn(shape)`` (seed 0) with ``shape``
    from ``--input-shape`` or else the factory's ``input_shape`` attribute
    (``factory.input_shape = (32, 64)``). Prints the findings; returns 0 when there are
    none, 1 when there are, 2 (with a one-line error on stderr) when the target cannot be
    loaded, called or run.
    """
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as e:  # argparse has printed its usage line
        return int(e.code) if isinstance(e.code, int) else 2

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        factory = _load_factory(args.target)
    except _LoadError as e:
        return fail(str(e))
    try:
        made = factory()
    except Exception as e:  # noqa: BLE001 - user code: one line, no traceback
        return fail(f"{args.target}() raised {type(e).__name__}: {e}")
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, batch = made
    elif isinstance(made, nn.Module):
        model = made
        shape = args.input_shape or getattr(factory, "input_shape", None)
        if shape is None:
            return fail(f"{args.target}() returned only a model: return (model, example_batch), "
                        "give --input-shape N,..., or set the factory's input_shape attribute")
        try:
            gen = torch.Generator().manual_seed(0)
            batch = torch.randn(tuple(int(s) for s in shape), generator=gen)
        except (TypeError, ValueError, RuntimeError) as e:
            return fail(f"bad input shape {shape!r}: {e}")
    else:
        return fail(f"{args.target}() returned {type(made).__name__}; expected a torch.nn.Module "
                    "or a (model, example_batch) tuple")
    if args.input_shape is not None and isinstance(made, tuple):
        batch = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0))
    ref = next(iter(model.parameters()), None)
    if ref is not None and isinstance(batch, Tensor):
        batch = batch.to(ref.device)
    try:
        findings = diagnose(model, batch, min_values=args.min_values)
    except (ValueError, TypeError) as e:
        return fail(str(e).splitlines()[0])
    for f in findings:
        print(f)
    if findings:
        print(f"{len(findings)} finding{'s' * (len(findings) != 1)} in {args.target}")
        return 1
    print(f"no batch-norm problems found in {args.target}")
    return 0


if __name__ == "__main__":  # ``python -m bnlib.doctor TARGET`` until the main CLI routes ``doctor``
    sys.exit(main(sys.argv[1:]))
