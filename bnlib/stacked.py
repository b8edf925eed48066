"""Many small training runs at once, as one stacked model ("stacked runs").

A sweep trains the same architecture many times: seeds × learning rates. Each run of a
small MLP is dominated by per-operation overhead, not arithmetic, so :func:`fit_many`
trains all of them together as ONE model whose every tensor has a leading *member*
dimension ``M``:

* linear layers are one ``torch.baddbmm`` over ``(M, B, F)``;
* batch norm normalises ``(M, B, C)`` over ``B`` for each member and channel, and every
  member keeps its own running statistics (momentum 0.1, unbiased running variance, like
  torch); its backward is the closed form, written out here;
* the loss is the sum of the members' own mean losses, so each member's gradient is
  exactly its own;
* SGD (heavy-ball momentum, weight decay) is written out on the stacked tensors with a
  per-member learning rate, momentum and weight decay, in the same order of operations as
  ``torch.optim.SGD``: ``d = g + wd·p``; ``buf = momentum·buf + d`` (``buf = d`` on the
  first step); ``p -= lr·buf``.

Every member is initialised by ``model.build(member.seed, data)`` and draws its batches
from its own generator through :func:`bnlib.train.batches`, exactly as
:func:`bnlib.train.fit` does, so a member's history equals the sequential run's up to
floating-point rounding (``tests/test_stacked.py`` checks every row).

Output: one tidy history per member, with :func:`bnlib.train.fit`'s columns, rows, attrs
(``diverged_step``, ``steps``, and the member's trained network in ``attrs["model"]``), plus
``attrs["member"]``. ``elapsed`` is an *amortised share*, not a per-run clock: each
stacked step's training time is divided equally among the members still training in it.
The shares of all members add up to the stacked run's training time.

Divergence is per member: a member whose training loss turns NaN/inf, whose evaluation
loss is not finite or whose weight norm exceeds ``max_weight_norm`` stops there with the
same rows ``fit`` would give (all marked ``diverged``); it is dropped from the stack, so it
neither slows nor touches the others (every reduction is per member anyway). Non-finite
training losses are detected at the next evaluation, not every step (no per-step sync);
that changes nothing in the histories, since a diverged run's rows end at the previous
evaluation either way. A diverged member's ``attrs["model"]`` holds its parameters from when
it was dropped.

Dropout (each member at its own rate, ``Member.dropout``, so a dropout-rate sweep stacks
too) draws each member's masks from that member's own generator, which starts where
the global generator stood after the member's network was built (as in ``fit``, where
``torch.manual_seed(seed)`` precedes the build and the masks come next), layer by layer in
``fit``'s order: so the masks, too, equal the sequential run's (on the CPU; on a GPU ``fit``
draws them from the GPU's generator, so dropout runs there are not stacked).

Ghost batch norm (``norm="ghost"``) cuts each member's batch into ``B // ghost_size``
consecutive virtual batches of equal size, normalises each on its own with the member's γ and
β, and moves the running statistics through the virtual batches in turn, as
:class:`bnlib.nn.GhostBatchNorm` does with ``running_stats="each"``.

Supported (:func:`supports`): :class:`~bnlib.models.MLPSpec` with ``norm`` "none", "batch"
or "ghost" (when the batch splits into equal virtual batches), either placement, activations relu/tanh/sigmoid/gelu/identity, residual blocks, any
depth and width, dropout (on the CPU); optimizer ``"sgd"``; classification or regression data.
Not supported, so the caller falls back to sequential :func:`bnlib.train.fit`: CNNs, Adam,
layer and group norm, callbacks and probes, custom samplers.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from . import runtime
from .data import Dataset
from .models import MLPSpec, Net
from .train import TrainSpec, batches, resolve_device

__all__ = ["Member", "supports", "fit_many", "fit_grid"]

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                "gelu": F.gelu, "identity": lambda x: x}


@dataclass(frozen=True)
class Member:
    """One run in a stack: its ``seed`` (initialisation and batch order) and, optionally,
    its own ``lr``, ``momentum`` and ``weight_decay`` (``None``: the TrainSpec's) and its own
    ``dropout`` rate (``None``: the model spec's), so that a dropout-rate sweep stacks too."""

    seed: int
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    dropout: float | None = None


def supports(model: object, spec: TrainSpec) -> bool:
    """Whether :func:`fit_many` can train ``model`` with ``spec`` (else use ``fit``)."""
    return (type(model) is MLPSpec and model.norm in ("none", "batch", "ghost")
            and model.activation in _ACTIVATIONS and spec.optimizer == "sgd"
            and (not model.dropout or resolve_device(spec.device).type == "cpu")
            and (model.norm != "ghost" or _ghost_chunks(spec.batch_size, model.ghost_size) > 0))


def _ghost_chunks(batch: int, ghost_size: int) -> int:
    """How many equal virtual batches ghost batch norm cuts a batch into (0: unequal ones,
    which the stacked engine does not do)."""
    k = max(batch // ghost_size, 1) if ghost_size >= 1 else 0
    return k if k and batch % k == 0 else 0


class _StackedBatchNorm(torch.autograd.Function):
    """Batch norm of ``(M, B, C)`` over ``B`` per member and channel; closed-form backward."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, eps: float):
        mean = x.mean(1, keepdim=True)
        xc = x - mean
        var = xc.square().mean(1, keepdim=True)          # biased, as the batch is normalised
        invstd = torch.rsqrt(var + eps)
        xhat = xc.mul_(invstd)
        out = torch.addcmul(beta, xhat, gamma)
        ctx.save_for_backward(xhat, invstd, gamma)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor, _dmean, _dvar):
        xhat, invstd, gamma = ctx.saved_tensors
        dbeta = dout.sum(1, keepdim=True)
        dgamma = (dout * xhat).sum(1, keepdim=True)
        # dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy · x̂))
        k = gamma * invstd
        n = xhat.shape[1]
        dx = (dout - dbeta / n).addcmul_(xhat, dgamma, value=-1.0 / n).mul_(k)
        return dx, dgamma, dbeta, None


class _Stack:
    """The stacked network's state: parameters, running statistics, momentum buffers."""

    def __init__(self, model: MLPSpec, nets: Sequence[Net], dtype: torch.dtype,
                 device: torch.device, gens: Sequence[torch.Generator] = (),
                 dropout: Sequence[float] = ()) -> None:
        self.act = _ACTIVATIONS[model.activation]
        # dropout: on the input of hidden layers 1.. ("blocks") and of the head (always),
        # each member at its own rate (0: no mask and no draw, as in fit)
        self.p = [float(p) for p in dropout] or [float(model.dropout)] * len(nets)
        self.drop_blocks = any(self.p) and model.dropout_at == "blocks"
        self.gens = list(gens)  # one generator per member, for its dropout masks
        self.before = model.placement == "before"
        self.bn = model.norm in ("batch", "ghost")
        self.ghost = model.ghost_size if model.norm == "ghost" else 0
        first = nets[0]
        self.residual = [b.residual for b in first.blocks]
        self.eps = first.blocks[0].norm.eps if self.bn else 0.0
        self.bn_momentum = first.blocks[0].norm.momentum if self.bn else 0.0

        def stack(get) -> Tensor | None:
            ts = [get(n) for n in nets]
            if ts[0] is None:
                return None
            return torch.stack([t.detach() for t in ts]).to(device=device, dtype=dtype)

        # Per layer: W (M, out, in), b (M, 1, out) or None; per norm: γ, β (M, 1, C) and the
        # running mean and variance (M, 1, C).
        self.W, self.b, self.gamma, self.beta, self.rm, self.rv = [], [], [], [], [], []
        for i in range(len(first.blocks)):
            self.W.append(stack(lambda n: n.blocks[i].layer.weight))
            b = stack(lambda n: n.blocks[i].layer.bias)
            self.b.append(None if b is None else b.unsqueeze(1))
            if self.bn:
                self.gamma.append(stack(lambda n: n.blocks[i].norm.weight).unsqueeze(1))
                self.beta.append(stack(lambda n: n.blocks[i].norm.bias).unsqueeze(1))
                self.rm.append(stack(lambda n: n.blocks[i].norm.running_mean).unsqueeze(1))
                self.rv.append(stack(lambda n: n.blocks[i].norm.running_var).unsqueeze(1))
        self.W.append(stack(lambda n: n.head.weight))
        self.b.append(stack(lambda n: n.head.bias).unsqueeze(1))
        for p in self.params():
            p.requires_grad_(True)
        self.bufs: list[Tensor] | None = None  # momentum buffers, made on the first step

    def params(self) -> list[Tensor]:
        """Every trainable tensor (the order is fixed: SGD's buffers follow it)."""
        return ([w for w in self.W] + [b for b in self.b if b is not None]
                + self.gamma + self.beta)

    def _set_params(self, ps: list[Tensor]) -> None:
        it = iter(ps)
        self.W = [next(it) for _ in self.W]
        self.b = [None if b is None else next(it) for b in self.b]
        self.gamma = [next(it) for _ in self.gamma]
        self.beta = [next(it) for _ in self.beta]

    def keep(self, idx: Tensor) -> None:
        """Keep only the members at positions ``idx`` (drop diverged ones)."""
        self._set_params([p.detach()[idx].requires_grad_(True) for p in self.params()])
        self.rm = [t[idx] for t in self.rm]
        self.rv = [t[idx] for t in self.rv]
        self.gens = [self.gens[i] for i in idx.tolist()] if self.gens else []
        self.p = [self.p[i] for i in idx.tolist()]
        if self.bufs is not None:
            self.bufs = [t[idx] for t in self.bufs]

    def _dropout(self, x: Tensor) -> Tensor:
        """``x`` ``(M, B, F)`` times each member's mask, drawn as ``F.dropout`` draws it on
        the CPU (Bernoulli(1 − p) noise, divided by 1 − p) from the member's generator; a
        member at rate 0 keeps ``x`` and draws nothing."""
        shape = x.shape[1:]
        noise = torch.stack([
            torch.empty(shape, dtype=x.dtype).bernoulli_(1.0 - p, generator=g).div_(1.0 - p)
            if p else torch.ones(shape, dtype=x.dtype) for p, g in zip(self.p, self.gens)])
        return x * noise.to(x.device)

    def forward(self, x: Tensor, train: bool) -> Tensor:
        """``x``: ``(M, B, F)`` in training, ``(N, F)`` (shared by every member) in eval."""
        for i, res in enumerate(self.residual):
            W, b = self.W[i], self.b[i]
            xin = self._dropout(x) if train and self.drop_blocks and i > 0 else x
            if xin.dim() == 2:  # one input for all members: (N, F) @ (M, F, out) broadcasts
                h = torch.matmul(xin, W.mT) if b is None else torch.matmul(xin, W.mT).add_(b)
            else:
                h = torch.bmm(xin, W.mT) if b is None else torch.baddbmm(b, xin, W.mT)
            if self.before:
                h = self.act(self._norm(h, i, train))
            else:
                h = self._norm(self.act(h), i, train)
            x = x + h if res else h
        if train and any(self.p):
            x = self._dropout(x)
        return torch.baddbmm(self.b[-1], x, self.W[-1].mT)

    def _norm(self, h: Tensor, i: int, train: bool) -> Tensor:
        if not self.bn:
            return h
        gamma, beta, rm, rv = self.gamma[i], self.beta[i], self.rm[i], self.rv[i]
        if train and self.ghost:  # k virtual batches side by side: (M, B, C) -> (M·k, B/k, C)
            M, B, C = h.shape
            k = _ghost_chunks(B, self.ghost)
            out, mean, var = _StackedBatchNorm.apply(
                h.reshape(M * k, B // k, C), gamma.repeat_interleave(k, 0),
                beta.repeat_interleave(k, 0), self.eps)
            n, m = B // k, self.bn_momentum
            with torch.no_grad():  # the running statistics see the virtual batches in turn
                mean, var = mean.view(M, k, 1, C), var.view(M, k, 1, C)
                for i in range(k):
                    rm.mul_(1 - m).add_(mean[:, i], alpha=m)
                    rv.mul_(1 - m).add_(var[:, i], alpha=m * n / (n - 1))
            return out.view(M, B, C)
        if train:
            out, mean, var = _StackedBatchNorm.apply(h, gamma, beta, self.eps)
            n = h.shape[1]
            with torch.no_grad():
                m = self.bn_momentum
                rm.mul_(1 - m).add_(mean, alpha=m)
                rv.mul_(1 - m).add_(var, alpha=m * n / (n - 1))  # unbiased, like torch
            return out
        scale = torch.rsqrt(rv + self.eps).mul_(gamma)
        return torch.addcmul(beta - rm * scale, h, scale)

    @torch.no_grad()
    def sgd(self, grads: Sequence[Tensor], lr: Tensor, momentum: Tensor, wd: Tensor,
            use_momentum: bool, use_wd: bool) -> None:
        """One ``torch.optim.SGD`` step per member; ``lr`` etc. are ``(M, 1, 1)``."""
        ps = self.params()
        views = lambda v: [v.view((-1,) + (1,) * (p.dim() - 1)) for p in ps]  # noqa: E731
        d = list(grads)
        if use_wd:
            d = torch._foreach_addcmul(d, ps, views(wd))
        if use_momentum:
            if self.bufs is None:
                self.bufs = [t.clone() for t in d]
            else:
                torch._foreach_mul_(self.bufs, views(momentum))
                torch._foreach_add_(self.bufs, d)
            d = self.bufs
        torch._foreach_addcmul_(ps, d, views(-lr))

    @torch.no_grad()
    def exploded(self, limit: float) -> Tensor:
        """Per member: a non-finite weight or a parameter tensor with norm above ``limit``."""
        bad = None
        for p in self.params():
            flat = p.flatten(1)
            b = ~torch.isfinite(flat).all(1) | (flat.norm(dim=1) > limit)
            bad = b if bad is None else bad | b
        return bad

    @torch.no_grad()
    def write_back(self, pos: int, net: Net) -> None:
        """Copy member ``pos``'s parameters and running statistics into ``net``."""
        for i, block in enumerate(net.blocks):
            block.layer.weight.copy_(self.W[i][pos])
            if block.layer.bias is not None:
                block.layer.bias.copy_(self.b[i][pos, 0])
            if self.bn:
                block.norm.weight.copy_(self.gamma[i][pos, 0])
                block.norm.bias.copy_(self.beta[i][pos, 0])
                block.norm.running_mean.copy_(self.rm[i][pos, 0])
                block.norm.running_var.copy_(self.rv[i][pos, 0])
        net.head.weight.copy_(self.W[-1][pos])
        net.head.bias.copy_(self.b[-1][pos, 0])


def _losses(out: Tensor, y: Tensor, classification: bool) -> Tensor:
    """Per-member mean loss of ``out`` ``(M, B, K)`` against ``y`` ``(M, B[, K])``."""
    m, b = out.shape[:2]
    if classification:
        return F.cross_entropy(out.reshape(m * b, -1), y.reshape(m * b),
                               reduction="none").view(m, b).mean(1)
    return (out - y.view_as(out)).square().flatten(1).mean(1)


@torch.no_grad()
def _evaluate(stack: _Stack, x: Tensor, y: Tensor, classification: bool,
              batch_size: int = 2048) -> tuple[Tensor, Tensor]:
    """Per-member loss and accuracy on a split, in eval mode (like ``train.evaluate``)."""
    total = correct = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        out = stack.forward(xb, train=False)                    # (M, N, K)
        m, n = out.shape[:2]
        if classification:
            ce = F.cross_entropy(out.reshape(m * n, -1), yb.repeat(m), reduction="none")
            total = total + ce.view(m, n).sum(1).double()
            correct = correct + (out.argmax(2) == yb).sum(1)
        else:
            total = total + (out - yb).square().flatten(1).sum(1).double()
    n = len(y)
    if not classification:
        return total / (n * y[0].numel()), torch.full_like(total, float("nan"))
    return total / n, correct.double() / n


def fit_many(model: MLPSpec, spec: TrainSpec, data: Dataset | str, members: Sequence[Member], *,
             max_weight_norm: float = 1e6) -> list[pd.DataFrame]:
    """Train every member of ``members`` at once as one stacked model; one history each.

    Each history equals what ``fit(model, spec-with-the-member's-lr..., data, member.seed)``
    returns, up to floating-point rounding, except ``elapsed`` (an amortised share of the
    stacked run's training time; see the module docstring). The parameters take the data's
    floating dtype (float64 data trains in float64). Raises ``ValueError`` for what
    :func:`supports` rejects.
    """
    from . import data as datasets
    if not members:
        raise ValueError("fit_many needs at least one member")
    if not supports(model, spec):
        raise ValueError(f"fit_many cannot stack {model!r} with {spec!r}; use bnlib.train.fit "
                         "(see bnlib.stacked.supports)")
    rates = [model.dropout if m.dropout is None else m.dropout for m in members]
    for p in rates:
        if not 0 <= p < 1:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    if not supports(dataclasses.replace(model, dropout=max(rates)), spec):  # dropout: CPU only
        raise ValueError(f"fit_many cannot stack {model!r} with {spec!r}; use bnlib.train.fit "
                         "(see bnlib.stacked.supports)")
    ds = datasets.load(data) if isinstance(data, str) else data
    ds = model.inputs(ds)
    n = len(ds.train)
    bsz, steps = spec.batch_size, int(spec.steps)
    if bsz < 2:
        raise ValueError(f"batch_size must be at least 2 (batch norm needs two examples), got {bsz}")
    if model.norm == "ghost" and not _ghost_chunks(min(bsz, n), model.ghost_size):
        raise ValueError(f"fit_many cannot stack ghost batch norm that cuts a batch of "
                         f"{min(bsz, n)} into unequal virtual batches of ~{model.ghost_size}; "
                         "use bnlib.train.fit")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    for s in spec.eval_splits:
        ds.split(s)
    hyper = [(m.lr if m.lr is not None else spec.lr,
              m.momentum if m.momentum is not None else spec.momentum,
              m.weight_decay if m.weight_decay is not None else spec.weight_decay) for m in members]
    for lr, _, _ in hyper:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be a positive finite number, got {lr}")
    eval_every = spec.eval_every or max(steps // 10, 1)
    dev = resolve_device(spec.device)
    ds = ds.to(dev)
    classification = ds.num_classes is not None
    dtype = ds.train.x.dtype

    with runtime.pinned_threads():
        nets, gens = [], []
        for m, p in zip(members, rates):  # each member's own network, its dropout rate included
            nets.append(dataclasses.replace(model, dropout=p).build(m.seed, ds)
                        .to(device=dev, dtype=dtype))
            gens.append(torch.Generator())  # the member's dropout masks go on from here,
            gens[-1].set_state(torch.get_rng_state())  # as fit's go on from the global one
        histories = _run(model, nets, gens, rates, ds, members, hyper, steps, bsz, eval_every,
                         spec.eval_splits, classification, max_weight_norm, dev)
    return histories


def _run(model, nets, gens, rates, ds, members, hyper, steps, bsz, eval_every, eval_splits,
         classification, max_weight_norm, dev) -> list[pd.DataFrame]:
    M = len(members)
    dtype = ds.train.x.dtype
    stack = _Stack(model, nets, dtype, dev, gens, rates)
    lr = torch.tensor([h[0] for h in hyper], dtype=dtype, device=dev)
    mom = torch.tensor([h[1] for h in hyper], dtype=dtype, device=dev)
    wd = torch.tensor([h[2] for h in hyper], dtype=dtype, device=dev)
    use_mom, use_wd = bool((mom != 0).any()), bool((wd != 0).any())
    n = len(ds.train)
    streams = [iter(batches(n, bsz, torch.Generator().manual_seed(m.seed))) for m in members]
    X, Y = ds.train.x, ds.train.y
    splits = [(s, ds.split(s)) for s in eval_splits]

    active = list(range(M))                 # member ids, in stack order
    rows: list[list[dict]] = [[] for _ in range(M)]
    diverged: list[int | None] = [None] * M
    elapsed = [0.0] * M
    # Per-step losses and correct counts stay on the device until the next evaluation:
    # no per-step host sync (one transfer per evaluation).
    loss_buf = torch.zeros(eval_every, M, dtype=torch.float64, device=dev)
    correct_buf = torch.zeros(eval_every, M, dtype=torch.long, device=dev)
    count = 0                               # steps recorded since the last evaluation
    seen = min(bsz, n)

    def drop(gone: list[int]) -> None:
        """Remove the stack positions ``gone`` (their members are finished)."""
        nonlocal active, lr, mom, wd, loss_buf, correct_buf
        for pos in gone:
            stack.write_back(pos, nets[active[pos]])
        keep = [p for p in range(len(active)) if p not in set(gone)]
        idx = torch.tensor(keep, dtype=torch.long, device=dev)
        stack.keep(idx)
        lr, mom, wd = lr[idx], mom[idx], wd[idx]
        loss_buf, correct_buf = loss_buf[:, idx], correct_buf[:, idx]
        active = [active[p] for p in keep]

    def log(step: int) -> None:
        """Batch rows, evaluation rows and divergence checks for every active member."""
        nonlocal count
        gone: list[int] = []
        if count:
            losses = loss_buf[:count].cpu()
            finite = torch.isfinite(losses)
            bad = (~finite.all(0)).tolist()
            first_bad = torch.argmax((~finite).to(torch.int8), 0).tolist()
            sums = [sum(col) for col in losses.t().tolist()]  # in step order, like fit
            correct = correct_buf[:count].sum(0).tolist()
            for pos, mid in enumerate(active):
                if bad[pos]:  # fit breaks at the first non-finite loss: no batch row
                    diverged[mid] = step - count + 1 + first_bad[pos]
                    gone.append(pos)
                    continue
                rows[mid].append(dict(step=step, split="batch", loss=sums[pos] / count,
                                      accuracy=correct[pos] / (seen * count) if classification
                                      else float("nan"), elapsed=elapsed[mid]))
            count = 0
        ok = [True] * len(active)
        for name, split in splits:
            loss, acc = _evaluate(stack, split.x, split.y, classification)
            for pos, (lo, ac) in enumerate(zip(loss.tolist(), acc.tolist())):
                mid = active[pos]
                if diverged[mid] is not None:
                    continue
                if math.isfinite(lo):
                    rows[mid].append(dict(step=step, split=name, loss=lo, accuracy=ac,
                                          elapsed=elapsed[mid]))
                else:
                    ok[pos] = False
        exploded = stack.exploded(max_weight_norm).tolist()
        for pos, mid in enumerate(active):
            if diverged[mid] is None and (not ok[pos] or exploded[pos]):
                diverged[mid] = step
                gone.append(pos)
        if gone:
            drop(sorted(gone))

    log(0)
    for step in range(1, steps + 1):
        if not active:
            break
        idx = torch.stack([next(streams[mid]) for mid in active]).to(dev)  # (M, B)
        x, y = X[idx], Y[idx]
        t0 = time.perf_counter()
        params = stack.params()
        out = stack.forward(x, train=True)
        losses = _losses(out, y, classification)
        grads = torch.autograd.grad(losses.sum(), params)
        stack.sgd(grads, lr, mom, wd, use_mom, use_wd)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        with torch.no_grad():
            loss_buf[count].copy_(losses.detach())
            if classification:
                correct_buf[count].copy_((out.detach().argmax(2) == y).sum(1))
        count += 1
        share = dt / len(active)
        for mid in active:
            elapsed[mid] += share
        if step % eval_every == 0 or step == steps:
            log(step)

    for pos, mid in enumerate(active):
        stack.write_back(pos, nets[mid])
    out_dfs = []
    for mid, member in enumerate(members):
        df = pd.DataFrame(rows[mid], columns=["step", "split", "loss", "accuracy", "elapsed"])
        df["diverged"] = diverged[mid] is not None
        df.attrs["diverged_step"] = diverged[mid]
        df.attrs["steps"] = steps
        df.attrs["member"] = member
        nets[mid].eval()
        df.attrs["model"] = nets[mid]
        out_dfs.append(df)
    return out_dfs


def fit_grid(model: MLPSpec, spec: TrainSpec, data: Dataset | str, seeds: Sequence[int],
             lrs: Sequence[float], *, max_weight_norm: float = 1e6) -> pd.DataFrame:
    """Every (seed, lr) pair of one architecture as one stacked run; one tidy DataFrame
    with ``seed`` and ``lr`` columns in front of the history's."""
    members = [Member(seed=s, lr=lr) for lr in lrs for s in seeds]
    dfs = fit_many(model, spec, data, members, max_weight_norm=max_weight_norm)
    parts = [df.assign(seed=m.seed, lr=m.lr) for m, df in zip(members, dfs)]
    out = pd.concat(parts, ignore_index=True)
    return out[["seed", "lr"] + [c for c in out.columns if c not in ("seed", "lr")]]
