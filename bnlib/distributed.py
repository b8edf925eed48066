"""Batch norm across devices: :class:`SyncBatchNorm`, and data-parallel training helpers.

With data parallelism every device (every *rank*) sees its own slice of the global batch.
A plain batch norm then normalises each slice with that slice's statistics, which is
ghost batch norm with ghost batches of ``B / world`` examples. :class:`SyncBatchNorm`
normalises with the statistics of the whole global batch instead:

* forward: each rank computes, per channel, its count ``n``, mean ``m`` and sum of squared
  deviations ``M2`` (centred, as in :mod:`bnlib.functional`); the triples are
  all-gathered and merged with Chan et al.'s parallel formula (:func:`merge_moments`),
  which is exact for uneven counts. Every rank gets the same global mean and variance.
* backward: the input gradient of a batch norm needs two per-channel sums over the batch,
  ``Σ dy`` and ``Σ dy·x̂``; each rank computes its part, they are all-reduced, and the
  global count divides them. The parameter gradients each rank returns are its *local*
  sums, so the ranks' parameter gradients add up to the full-batch gradient (what
  ``DistributedDataParallel`` averages, see :func:`scaled_loss`).
* running statistics move towards the global mean and the *unbiased* global variance;
  evaluation mode uses them and communicates nothing.

Outside an initialised process group, or in a group of one, it is exactly
:class:`bnlib.nn.BatchNorm1d`/``2d``. Unlike ``torch.nn.SyncBatchNorm`` it runs on CPU
tensors too (gloo), which is how the tests and chapter 21 check it. :func:`per_device`
simulates the other side in one process: the per-device statistics of ``B / b`` ranks with
slices of ``b`` examples (ghost batch norm whose running statistics follow rank 0's slice).

Data-parallel training (``torchrun --nproc_per_node N ...``)::

    rank, world, device = init_from_env()
    model = SyncBatchNorm.convert_sync_batchnorm(build_model()).to(device)
    model = wrap_ddp(model, device)
    df = bnlib.train.train(model, data, sampler=sharded(rank, world), seed=seed, ...)

Every rank draws the *same* global batch (same ``seed``) and keeps its contiguous slice
(:func:`shard`), so the global batch is the one single-process training would use; with
``batch_size`` divisible by ``world`` the per-rank mean loss, averaged by DDP, is the
global mean loss (:func:`train_data_parallel` does all of this).
"""
from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .functional import _affine, _broadcast, channel_dims
from .nn import BatchNorm1d, BatchNorm2d, _BatchNorm, use_ghost_batchnorm

__all__ = ["SyncBatchNorm", "merge_moments", "sync_active", "init_from_env", "is_main", "cleanup",
           "shard", "sharded", "wrap_ddp", "average_gradients", "averaging", "scaled_loss",
           "train_data_parallel", "launch", "free_port", "per_device"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --- statistics -------------------------------------------------------------------------

def _local_moments(x: Tensor):
    """``(n, mean, M2, xc, mean0)`` per channel, with ``mean`` and ``M2`` in float64 (they are
    C numbers, merged across ranks) and ``xc = x − mean0`` centred on a first-pass mean:
    the corrected two-pass algorithm of :mod:`bnlib.functional`, ``M2 = Σ xc² − n r²``
    with the tiny residue ``r = mean(xc)``. An empty slice gives n = 0, mean = M2 = 0."""
    c = x.shape[1]
    n = x.numel() // c
    if n == 0:
        z = x.new_zeros(c)
        return 0, z.double(), z.double(), x, z
    dims = channel_dims(x)
    mean0 = x.mean(dims)
    xc = x - _broadcast(mean0, x)
    r = xc.mean(dims)
    m2 = torch.addcmul(xc.square().sum(dims), r, r, value=-float(n)).clamp_(min=0)
    # mean0 + r in float64: in float32 the sum would round the correction r away again
    return n, mean0.double() + r.double(), m2.double(), xc, mean0


def merge_moments(counts: Sequence[float] | Tensor, means: Tensor, m2s: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-part ``(count, mean, M2)`` into the whole's, with Chan et al.'s pairwise
    update (exact for uneven counts, and for parts with count 0)::

        n = na + nb,  δ = mb − ma,  m = ma + δ·nb/n,  M2 = M2a + M2b + δ²·na·nb/n

    ``counts`` has one entry per part; ``means`` and ``m2s`` are ``(parts, C)``. Returns
    ``(n, mean, M2)`` with ``n`` a 0-d tensor; the variance is ``M2/n`` (biased) or
    ``M2/(n−1)`` (unbiased). The parts are folded in order, so every rank merging the
    same gathered numbers gets bit-identical results.
    """
    counts = torch.as_tensor(counts, dtype=means.dtype, device=means.device).reshape(-1)
    if counts.numel() != means.shape[0] or means.shape != m2s.shape:
        raise ValueError(f"counts {tuple(counts.shape)}, means {tuple(means.shape)} and "
                         f"m2s {tuple(m2s.shape)} must describe the same parts")
    n, m, m2 = counts[0], means[0], m2s[0]
    for nb, mb, m2b in zip(counts[1:], means[1:], m2s[1:]):
        total = n + nb
        if total == 0:
            continue
        delta = mb - m
        m = m + delta * (nb / total)
        m2 = m2 + m2b + delta.square() * (n * nb / total)
        n = total
    return n, m, m2


# --- process groups ---------------------------------------------------------------------

def sync_active(group: Any = None) -> bool:
    """True inside an initialised process group of more than one rank."""
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group) > 1)


def _gather_moments(n: int, mean: Tensor, m2: Tensor, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """All-gather every rank's ``(n, mean, M2)`` (one tensor of ``2C + 1`` numbers each)."""
    world = dist.get_world_size(group)
    mine = torch.cat([mean.new_tensor([float(n)]), mean, m2])
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    stacked = torch.stack(parts)
    c = mean.numel()
    return stacked[:, 0], stacked[:, 1:1 + c], stacked[:, 1 + c:]


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalise with the global batch statistics; backward all-reduces two sums."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, group: Any):
        n_local, mean_l, m2_l, xc, mean0 = _local_moments(x)
        counts, means, m2s = _gather_moments(n_local, mean_l, m2_l, group)
        n, mean, m2 = merge_moments(counts, means, m2s)
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{int(n)} over all ranks (this rank's input size {tuple(x.shape)})")
        var = (m2 / n).to(x.dtype)                    # biased: what the batch is normalised with
        invstd = torch.rsqrt(var + eps)
        d = (mean - mean0).to(x.dtype)                # x − mean = xc − d, d small
        mean, n = mean.to(x.dtype), n.to(x.dtype)
        scale = invstd * weight
        out = _affine(xc, scale, torch.addcmul(bias, d, scale, value=-1))
        ctx.save_for_backward(xc, d, invstd, weight)
        ctx.n, ctx.group = float(n), group
        ctx.mark_non_differentiable(mean, var, n)
        return out, mean, var, n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor, _dmean, _dvar, _dn):
        xc, d, invstd, weight = ctx.saved_tensors    # x̂ = (xc − d) · invstd
        dims = channel_dims(xc)
        if xc.numel():
            dbias = dout.sum(dims)                                                # Σ dy (local)
            dweight = torch.addcmul((dout * xc).sum(dims), d, dbias, value=-1).mul_(invstd)
        else:
            dbias, dweight = invstd.new_zeros(invstd.shape), invstd.new_zeros(invstd.shape)
        dx = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([dbias, dweight])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            c = dbias.numel()
            sdy, sdyxh = sums[:c], sums[c:]                                       # global sums
            # dx = γ/σ · (dy − Σdy/n − x̂ · Σ(dy·x̂)/n) = k·dy + c1·xc + c0, per channel.
            k = weight * invstd
            k_n = k / -ctx.n
            c1 = k_n * invstd * sdyxh
            c0 = torch.addcmul(k_n * sdy, d, c1, value=-1)
            dx = _affine(dout, k, c0).addcmul_(xc, _broadcast(c1, xc)) if xc.numel() else dout.clone()
        return dx, dweight, dbias, None, None


# --- the layer --------------------------------------------------------------------------

class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of the batch across all ranks.

    Same constructor as ``torch.nn.SyncBatchNorm`` (plus bnlib's keyword ``bias``), same
    parameters, buffers and ``state_dict`` keys as :class:`bnlib.nn.BatchNorm1d`/``2d``.
    Takes ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)`` inputs. A rank
    may hold any number of examples (even none), as long as the global batch has more
    than one value per channel. Every rank must call it the same number of times (it is a
    collective), as with torch's.
    """

    _expected_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Any = None, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device, dtype, bias=bias)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not (self.training and sync_active(self.process_group)):
            return super().forward(input)   # eval mode, or nothing to sync with: plain BN
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        x = input.float() if input.dtype in _LOW_PRECISION else input
        if not x.is_floating_point():
            raise TypeError(f"batch_norm needs a floating-point input, got dtype {x.dtype}")
        c = x.shape[1]
        w = self.weight.to(x.dtype) if self.weight is not None else x.new_ones(c)
        b = self.bias.to(x.dtype) if self.bias is not None else x.new_zeros(c)
        out, mean, var, n = _SyncBatchNormFunction.apply(x, w, b, self.eps, self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype),
                                                          alpha=momentum)
                unbiased = (var * (n / (n - 1))).to(self.running_var.dtype)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return out.to(input.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.process_group is None
                                       else f", process_group={self.process_group}")

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every BatchNorm1d/2d/3d of ``module`` (torch's or bnlib's) by a
        :class:`SyncBatchNorm`, recursively and in place, and return ``module`` (or the new
        layer when ``module`` itself is one). The new layers *share* the old parameter and
        buffer tensors (an optimiser built before still updates them), so the options,
        ``state_dict`` keys and values, ``requires_grad``, device, dtype and train/eval mode
        are kept. Like torch's classmethod; subclasses with their own forward (e.g. ghost
        batch norm) are left alone.
        """
        if type(module) in _CONVERTIBLE:
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group,
                      bias=module.bias is not None or not module.affine)
            for name, _ in list(new.named_parameters(recurse=False)):
                setattr(new, name, getattr(module, name))
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(new, name, getattr(module, name))
            new.train(module.training)
            if hasattr(module, "qconfig"):
                new.qconfig = module.qconfig
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module


_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNorm1d, BatchNorm2d)


# --- per-device statistics, simulated in one process ----------------------------------

def per_device(model: nn.Module, per_device_batch: int) -> nn.Module:
    """``model`` with the batch norms of ``B / per_device_batch`` data-parallel devices:
    ghost batch norm over ghost batches of ``per_device_batch`` whose running statistics
    follow ghost batch 0, as rank 0's do (:class:`bnlib.nn.GhostBatchNorm`); in place."""
    return use_ghost_batchnorm(model, per_device_batch, running_stats="first")


# --- data-parallel training -------------------------------------------------------------

def init_from_env(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and return ``(rank, world, device)``.

    The backend is ``nccl`` when CUDA is available (each rank then uses GPU ``LOCAL_RANK``)
    and ``gloo`` otherwise. Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) no group is
    created: ``(0, 1, device)``, and everything here runs single-process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank,
                                world_size=world)
    return rank, world, device


def launched() -> bool:
    """True in a process that ``torchrun`` started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ


def cleanup() -> None:
    """Leave the process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0, and in a single process (log and save only there)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shard(indices: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s contiguous slice of a global batch of ``indices``.

    ``torch.tensor_split`` semantics: sizes differ by at most one, the first ``B % world``
    ranks taking one more. Concatenating the slices in rank order gives the batch back,
    and the slices are exactly the ghost batches of :class:`GhostBatchNorm1d` with
    ``virtual_batch_size = B // world`` when ``world`` divides ``B``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return indices.tensor_split(world)[rank]


def sharded(rank: int, world: int, sampler: Callable | None = None
            ) -> Callable[[int, int, torch.Generator], Iterable[Tensor]]:
    """A ``sampler`` for :func:`bnlib.train.train`: the global batches of ``sampler``
    (default :func:`bnlib.train.batches`), each cut to this rank's :func:`shard`. Every
    rank must use the same ``seed`` so they all draw the same global batch."""
    from .train import batches
    base = sampler or batches

    def sample(n: int, batch_size: int, generator: torch.Generator) -> Iterable[Tensor]:
        if batch_size < 2 * world:
            raise ValueError(f"batch_size {batch_size} gives some of the {world} ranks fewer "
                             f"than 2 examples")
        for idx in base(n, batch_size, generator):
            yield shard(idx, rank, world)

    return sample


def wrap_ddp(model: nn.Module, device: torch.device | str, *, sync_buffers: bool = False,
             **kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` on ``device`` (one GPU per rank, or the CPU), or
    ``model`` itself outside a process group.

    ``sync_buffers`` (torch's ``broadcast_buffers``/``forward_sync_buffers``) defaults to
    False: with :class:`SyncBatchNorm` every rank's running statistics are already
    identical, and with per-device BN rank 0's would overwrite the others' at every
    forward. (Constructing the first DDP object in a process imports ``torch._dynamo``,
    several seconds of CPU time; :func:`average_gradients` is the lightweight alternative.)
    """
    import inspect
    device = torch.device(device)
    model = model.to(device)
    if not sync_active():
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else "broadcast_buffers")
    kwargs.setdefault(name, sync_buffers)
    return ddp(model, device_ids=ids, **kwargs)


def average_gradients(params: Iterable[nn.Parameter], group: Any = None) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of one flat
    tensor per dtype): what DDP does, without DDP's buckets and overlap. A parameter
    without a gradient counts as a zero gradient. Call it on every rank between
    ``backward()`` and ``optimizer.step()``."""
    if not sync_active(group):
        return
    world = dist.get_world_size(group)
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group_params in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group_params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        offset = 0
        for p in group_params:
            k = p.grad.numel()
            p.grad.copy_(flat[offset:offset + k].view_as(p.grad))
            offset += k


def averaging(optimizer: torch.optim.Optimizer, group: Any = None) -> torch.optim.Optimizer:
    """``optimizer``, changed in place so that its ``step()`` first averages the gradients
    over the ranks (:func:`average_gradients`); returns it."""
    step = optimizer.step
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def synced_step(*args: Any, **kwargs: Any):
        average_gradients(params, group)
        return step(*args, **kwargs)

    optimizer.step = synced_step  # type: ignore[method-assign]
    return optimizer


def scaled_loss(loss_sum: Tensor, global_batch: int, world: int) -> Tensor:
    """The per-rank loss whose DDP-averaged gradient is the gradient of the *global* mean
    loss, also for uneven shards: ``Σ_local ℓ · world / B``. (DDP divides the summed
    gradients by ``world``, leaving ``Σ_all ℓ / B``.)"""
    return loss_sum * (world / global_batch)


def train_data_parallel(build: Callable[[], nn.Module], data, *, seed: int = 0,
                        sync_bn: bool = True, ddp: bool = True,
                        device: torch.device | str | None = None, **train_kwargs: Any):
    """One rank's share of data-parallel training with :func:`bnlib.train.train`.

    Call it on every rank (e.g. under ``torchrun``, after :func:`init_from_env`). The model
    is built under ``torch.manual_seed(seed)`` (identical on every rank); its batch norms
    become :class:`SyncBatchNorm` when ``sync_bn`` (otherwise each rank normalises its own
    slice: ghost batch norm with ghost batches of ``B / world``). Gradients are averaged
    over the ranks by DDP (``ddp=True``) or by :func:`averaging` the optimiser
    (``ddp=False``: the same arithmetic, none of DDP's start-up cost). Each rank trains on
    its shard of every global batch. Returns ``(history, model)`` with the unwrapped
    model; the history's ``"batch"`` rows describe this rank's slice only, evaluation
    rows the whole split. ``batch_size`` must be divisible by the world size (then the
    per-rank mean loss, averaged over ranks, is the global mean loss).
    """
    from .train import make_optimizer, resolve_device, seeded, train
    rank = dist.get_rank() if sync_active() else 0
    world = dist.get_world_size() if sync_active() else 1
    batch_size = train_kwargs.get("batch_size", 64)
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the world size {world}")
    dev = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    model = seeded(seed, build)
    if sync_bn:
        model = SyncBatchNorm.convert_sync_batchnorm(model)
    if ddp:
        wrapped = wrap_ddp(model, dev)
    else:
        wrapped = model.to(dev)
        opt = train_kwargs.pop("optimizer", "sgd")
        if not callable(opt):
            name, lr = opt, train_kwargs.get("lr", 0.1)
            momentum = train_kwargs.pop("momentum", 0.0)
            wd = train_kwargs.pop("weight_decay", 0.0)
            opt = lambda params: make_optimizer(params, name, lr, momentum, wd)  # noqa: E731
        base = opt
        train_kwargs["optimizer"] = lambda params: averaging(base(params))
    history = train(wrapped, data, seed=seed, device=dev,
                    sampler=sharded(rank, world, train_kwargs.pop("sampler", None)),
                    show_progress=train_kwargs.pop("show_progress", False) and is_main(),
                    **train_kwargs)
    return history, model


# --- launching a few CPU processes (tests, and the chapter's small real runs) -----------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched(fn: Callable, rank: int, world: int, port: int, args: tuple, queue) -> None:
    """Body of one launched process: join a gloo group, run ``fn``, send back the result."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        try:
            # plain pickle (not torch's shared-memory reducers): the result must outlive us
            queue.put((rank, True, pickle.dumps(fn(rank, world, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        queue.put((rank, False, traceback.format_exc()))


def launch(fn: Callable[..., Any], world: int = 2, args: tuple = (), *,
           timeout: float = 60.0, start_method: str | None = None) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh CPU processes joined in a gloo
    process group, and return their results in rank order.

    ``start_method`` defaults to ``"fork"`` where the platform has it (the children start
    in a fraction of a second, already holding the parent's imports; only safe on the CPU,
    before any CUDA call) and ``"spawn"`` elsewhere (fresh interpreters: ``fn`` must then
    be importable, i.e. a module-level function). The result must be picklable. The
    processes use one thread each. A child's exception is raised here as a
    ``RuntimeError`` carrying its traceback; after ``timeout`` seconds the children are
    killed and ``TimeoutError`` is raised, so a hung collective never hangs the caller.
    """
    import multiprocessing as mp
    import queue as queue_module
    if world < 1:
        raise ValueError(f"world must be ≥ 1, got {world}")
    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    results: Any = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_launched, args=(fn, r, world, port, tuple(args), results),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    out: dict[int, Any] = {}
    finished = False
    try:
        while len(out) < world:
            left = deadline - time.monotonic()
            try:
                rank, ok, payload = results.get(timeout=max(left, 0.01))
            except queue_module.Empty:
                raise TimeoutError(f"launch: {world - len(out)} of {world} processes did not "
                                   f"finish within {timeout:.0f} s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[rank] = pickle.loads(payload)
        finished = True
    finally:
        for p in procs:  # after a failure the others may wait in a collective: no grace
            p.join(timeout=max(deadline - time.monotonic(), 1.0) if finished else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world)]
