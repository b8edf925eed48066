"""bnlib.distributed: SyncBatchNorm and data-parallel training, checked with real processes.

Two CPU processes joined in a gloo group (``bnlib.distributed.launch``: spawn, a free port,
a hard timeout that kills the children). torch's own ``nn.SyncBatchNorm`` refuses CPU
tensors, so the reference is torch's ``nn.BatchNorm1d/2d`` in ONE process over the
concatenated batch, in float64.

Gradient scaling used throughout: the loss is SUM-reduced, ``L = Σ_i Σ_j g_ij · out_ij``
over the global batch, and each rank backpropagates its own part ``L_r`` (its rows).
Then (i) each rank's input gradient equals the full-batch input gradient of ``L`` on its
rows, and (ii) the ranks' parameter gradients (γ, β) add up to the full-batch parameter
gradient of ``L`` (``SyncBatchNorm`` returns local sums; DDP would then *average* them,
which is why data-parallel training feeds it ``world × mean-loss`` per rank, see
``scaled_loss``, or — with even shards — the per-rank mean loss).
"""
from __future__ import annotations

import time

import pytest
import torch
import torch._dynamo  # noqa: F401  (the first optimizer step or DDP imports it: once, here)
import torch.distributed as dist
from torch import nn

from bnlib import distributed as D
from bnlib import nn as bnn
from bnlib.data import Dataset, Split
from bnlib.distributed import SyncBatchNorm, launch, merge_moments, per_device, shard
from bnlib.nn import GhostBatchNorm, use_ghost_batchnorm
from bnlib.models import mlp
from bnlib.train import batches, seeded, train

# Imported at the top, not in the functions: launch() forks, and the children inherit them.

# (shape of one example after N, per-rank batch sizes, momentum, affine)
CASES = [
    ((3,), (5, 3), 0.1, True),        # (N, C), uneven
    ((3, 4), (4, 4), 0.1, True),      # (N, C, L)
    ((2, 3, 3), (3, 2), 0.3, True),   # (N, C, H, W), uneven
    ((3,), (1, 6), 0.1, True),        # rank 0 alone has 1 value per channel
    ((3,), (0, 5), None, False),      # rank 0 has no example at all; cumulative average
]
STEPS = 2  # two training steps, so running statistics accumulate


def _case_data(i: int):
    feat, sizes, _, _ = CASES[i]
    g = torch.Generator().manual_seed(100 + i)
    n = sum(sizes)
    x = [torch.randn((n,) + feat, generator=g, dtype=torch.float64) * 3 + 5 for _ in range(STEPS)]
    dy = [torch.randn((n,) + feat, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    w = torch.rand(feat[0], generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(feat[0], generator=g, dtype=torch.float64)
    return x, dy, w, b


def _run_sync(rank: int, world: int) -> list[dict]:
    """Every case on this rank: its rows of the outputs and input gradients, its parameter
    gradients and the running statistics, after ``STEPS`` steps."""
    res = []
    for i, (feat, sizes, momentum, affine) in enumerate(CASES):
        x, dy, w, b = _case_data(i)
        lo = sum(sizes[:rank])
        rows = slice(lo, lo + sizes[rank])
        layer = SyncBatchNorm(feat[0], momentum=momentum, affine=affine, dtype=torch.float64)
        if affine:
            with torch.no_grad():
                layer.weight.copy_(w), layer.bias.copy_(b)
        outs, grads = [], []
        for s in range(STEPS):
            xs = x[s][rows].clone().requires_grad_(True)
            out = layer(xs)
            (out * dy[s][rows]).sum().backward()   # sum-reduced loss, this rank's part
            outs.append(out.detach()), grads.append(xs.grad)
        layer.eval()
        eval_out = layer(x[0][rows])
        res.append(dict(out=outs, dx=grads, eval_out=eval_out,
                        dw=layer.weight.grad if affine else None,
                        db=layer.bias.grad if affine else None,
                        state={k: v.clone() for k, v in layer.state_dict().items()}))
    # a global batch with one value per channel is refused on every rank
    layer = SyncBatchNorm(3, dtype=torch.float64)
    try:
        layer(torch.randn(1 - rank, 3, dtype=torch.float64))
        res.append("no error")
    except ValueError as e:
        res.append(str(e))
    # float32 at a large common offset: centred statistics keep the output accurate
    x = _offset_batch()
    res.append(SyncBatchNorm(3)(x[:4] if rank == 0 else x[4:]))
    return res


def _offset_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(6, 3, generator=g, dtype=torch.float64) + 1e4).float()


def _reference(i: int):
    feat, sizes, momentum, affine = CASES[i]
    x, dy, w, b = _case_data(i)
    cls = nn.BatchNorm1d if len(feat) < 3 else nn.BatchNorm2d
    ref = cls(feat[0], momentum=momentum, affine=affine, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(w), ref.bias.copy_(b)
    outs, grads = [], []
    for s in range(STEPS):
        xs = x[s].clone().requires_grad_(True)
        out = ref(xs)
        (out * dy[s]).sum().backward()
        outs.append(out.detach()), grads.append(xs.grad)
    ref.eval()
    return ref, outs, grads, ref(x[0])


@pytest.fixture(scope="module")
def sync_results():
    t0 = time.perf_counter()
    res = launch(_run_sync, 2, timeout=60)
    print(f"2-process SyncBatchNorm checks: {time.perf_counter() - t0:.1f} s")
    return res


@pytest.mark.parametrize("i", range(len(CASES)))
def test_sync_matches_full_batch(sync_results, i):
    feat, sizes, momentum, affine = CASES[i]
    ref, outs, grads, eval_out = _reference(i)
    tol = dict(rtol=1e-10, atol=1e-12)
    ranks = [r[i] for r in sync_results]
    for s in range(STEPS):
        torch.testing.assert_close(torch.cat([r["out"][s] for r in ranks]), outs[s], **tol)
        torch.testing.assert_close(torch.cat([r["dx"][s] for r in ranks]), grads[s], **tol)
    if affine:  # the ranks' parameter gradients SUM to the full-batch ones (sum-reduced loss)
        torch.testing.assert_close(sum(r["dw"] for r in ranks), ref.weight.grad, **tol)
        torch.testing.assert_close(sum(r["db"] for r in ranks), ref.bias.grad, **tol)
    for r in ranks:  # identical running statistics on every rank, equal to torch's
        assert r["state"].keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, **tol)
    torch.testing.assert_close(torch.cat([r["eval_out"] for r in ranks]), eval_out, **tol)


def test_global_count_of_one_is_refused(sync_results):
    for r in sync_results:
        assert "more than 1 value per channel" in r[-2]


def test_float32_large_offset(sync_results):
    x = _offset_batch()
    ref = nn.functional.batch_norm(x.double(), None, None, training=True)
    out = torch.cat([r[-1] for r in sync_results]).double()
    # bnlib single-device: 8e-8; torch float32: 6e-4; E[x²]−E[x]² in float32: hundreds
    assert (out - ref).abs().max().item() < 1e-6


def test_merge_moments_chan():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 4, generator=g, dtype=torch.float64) + 1e3 for n in (7, 1, 0, 12)]
    counts = [len(p) for p in parts]
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(4, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(4, dtype=torch.float64)
                       for p in parts])
    n, mean, m2 = merge_moments(counts, means, m2s)
    full = torch.cat(parts)
    assert n == 20
    torch.testing.assert_close(mean, full.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(m2 / (n - 1), full.var(0), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="same parts"):
        merge_moments([1, 2], means, m2s)


def _sample_layers(x, layers):
    out = []
    for layer in layers:
        xs = x.clone().requires_grad_(True)
        y = layer(xs)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        out.append((y.detach(), xs.grad, layer.weight.grad, dict(layer.state_dict())))
    return out


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 4), (6, 3, 2, 2)])
def test_single_process_is_plain_batch_norm(shape):
    """No process group, and a process group of one: exactly bnlib's batch norm."""
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    plain_cls = bnn.BatchNorm2d if len(shape) == 4 else bnn.BatchNorm1d
    assert not D.sync_active()
    layers = [plain_cls(3, dtype=torch.float64), SyncBatchNorm(3, dtype=torch.float64)]
    (y0, dx0, dw0, s0), (y1, dx1, dw1, s1) = _sample_layers(x, layers)
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1) and torch.equal(dw0, dw1)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert not D.sync_active() and D.is_main()
        layer = SyncBatchNorm(3, dtype=torch.float64)
        (y2, dx2, dw2, s2), = _sample_layers(x, [layer])
    finally:
        dist.destroy_process_group()
    assert torch.equal(y0, y2) and torch.equal(dx0, dx2) and all(torch.equal(s0[k], s2[k]) for k in s0)


def test_layer_contract():
    layer = SyncBatchNorm(4, eps=1e-3, momentum=0.2, affine=False)
    assert layer.weight is None and set(layer.state_dict()) == {
        "running_mean", "running_var", "num_batches_tracked"}
    assert set(SyncBatchNorm(4).state_dict()) == set(nn.SyncBatchNorm(4).state_dict())
    with pytest.raises(ValueError, match="expected"):
        SyncBatchNorm(4)(torch.randn(4))
    with pytest.raises(RuntimeError, match="channels"):
        SyncBatchNorm(4)(torch.randn(5, 3))
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)


@pytest.mark.parametrize("impl", ["torch", "bnlib"])
def test_convert_sync_batchnorm(impl):
    lib = nn if impl == "torch" else bnn
    model = nn.Sequential(nn.Conv2d(1, 4, 3), lib.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                          nn.Flatten(), nn.Sequential(nn.Linear(64, 5), lib.BatchNorm1d(5, affine=False)))
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_(), m.running_var.uniform_(1, 2), m.num_batches_tracked.fill_(3)
    model[1].weight.requires_grad_(False)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 6, 6)
    y = model(x)
    params = list(model.parameters())
    out = SyncBatchNorm.convert_sync_batchnorm(model)
    assert out is model
    assert type(model[1]) is SyncBatchNorm and type(model[4][1]) is SyncBatchNorm
    assert model[1].momentum == 0.3 and model[4][1].affine is False and not model[1].training
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]  # shared tensors
    assert not model[1].weight.requires_grad
    torch.testing.assert_close(model(x), y)
    layer = SyncBatchNorm.convert_sync_batchnorm(lib.BatchNorm1d(3), process_group="g")
    assert type(layer) is SyncBatchNorm and layer.process_group == "g"


def test_shard_and_sampler():
    idx = torch.arange(10)
    parts = [shard(idx, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 3, 3] and torch.equal(torch.cat(parts), idx)
    with pytest.raises(ValueError):
        shard(idx, 3, 3)
    g0, g1 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    full = next(iter(batches(20, 8, g0)))
    assert torch.equal(next(iter(D.sharded(1, 2)(20, 8, g1))), full[4:])
    with pytest.raises(ValueError, match="fewer than 2"):
        next(iter(D.sharded(0, 4)(20, 6, g1)))


def test_per_device_is_ghost_bn_with_rank0_running_stats():
    """``per_device(net, B/k)``: every slice normalised on its own (as ``k`` devices do), the
    running statistics those of a plain torch BN that saw slice 0 only (rank 0's buffers)."""
    torch.manual_seed(0)
    net = mlp(6, 3, depth=2, width=5, norm="batch").double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    per_device(net, 4)
    norm = net.blocks[0].norm
    assert isinstance(norm, GhostBatchNorm) and norm.running_stats == "first"
    assert norm.weight.dtype == torch.float64
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    x = torch.randn(12, 5, dtype=torch.float64) * 2 + 3
    y = norm(x)
    rank0 = torch.nn.BatchNorm1d(5, dtype=torch.float64)
    for i, (cx, cy) in enumerate(zip(x.split(4), y.split(4))):
        torch.testing.assert_close(cy, (rank0 if i == 0 else torch.nn.BatchNorm1d(5).double())(cx))
    torch.testing.assert_close(norm.running_mean, rank0.running_mean)
    torch.testing.assert_close(norm.running_var, rank0.running_var)
    assert int(norm.num_batches_tracked) == 1


# --- data-parallel training ------------------------------------------------------------

def _toy_data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    splits = [Split(x[i:i + 32], y[i:i + 32]) for i in (0, 32, 64)]
    return Dataset("toy", *splits, input_shape=(6,), num_classes=3)


def _build():
    return mlp(6, 3, depth=2, width=8, norm="batch").double()


TRAIN = dict(steps=6, lr=0.2, momentum=0.9, batch_size=16, eval_every=3)


def _run_parallel(rank: int, world: int, ddp: bool) -> dict:
    out = {}
    for sync in ((True,) if ddp else (True, False)):
        _, model = D.train_data_parallel(_build, _toy_data(), seed=3, sync_bn=sync, ddp=ddp,
                                         device="cpu", **TRAIN)
        out[sync] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def _single_process() -> tuple[dict, dict, dict]:
    """Full-batch BN, and ghost BN with ghost batches of B/2, trained in this process."""
    full = seeded(3, _build)
    train(full, _toy_data(), seed=3, device="cpu", **TRAIN)
    ghost = use_ghost_batchnorm(seeded(3, _build), virtual_batch_size=TRAIN["batch_size"] // 2).double()
    train(ghost, _toy_data(), seed=3, device="cpu", **TRAIN)
    return seeded(3, _build).state_dict(), full.state_dict(), ghost.state_dict()


def _check_parallel(ranks: list[dict], single: tuple[dict, dict, dict]) -> None:
    start, full, ghost = single
    tol = dict(rtol=1e-9, atol=1e-11)
    for r in ranks:
        for k, v in full.items():   # SyncBN: weights AND running statistics
            torch.testing.assert_close(r[True][k], v, **tol)
        if False in r:              # per-device BN: each rank's running stats see its slice only
            for k, v in ghost.items():
                if "running" not in k and "num_batches" not in k:
                    torch.testing.assert_close(r[False][k], v, **tol)
    moved = max((full[k] - start[k]).abs().max().item() for k in start if start[k].is_floating_point())
    assert moved > 1e-2  # training did something


def test_data_parallel_training_matches_single_process():
    """2 processes, gradients averaged by an all-reduce: with SyncBatchNorm the run ends with
    the weights and running statistics of single-process full-batch training; with
    per-device BN, with the weights of single-process ghost batch norm (ghost batches B/2)."""
    t0 = time.perf_counter()
    ranks = launch(_run_parallel, 2, (False,), timeout=60)
    print(f"2-process training (all-reduce): {time.perf_counter() - t0:.1f} s")
    _check_parallel(ranks, _single_process())


def test_ddp_training_matches_single_process():
    """The same through DistributedDataParallel (DDP's constructor imports torch._dynamo: see the import at the top)."""
    t0 = time.perf_counter()
    ranks = launch(_run_parallel, 2, (True,), timeout=120)
    print(f"2-process DDP training: {time.perf_counter() - t0:.1f} s")
    _check_parallel(ranks, _single_process())


def test_helpers_outside_a_process_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rank, world, device = D.init_from_env()
    assert (rank, world) == (0, 1) and not dist.is_initialized() and D.is_main()
    model = nn.Linear(3, 2)
    assert D.wrap_ddp(model, "cpu") is model
    model(torch.randn(4, 3)).sum().backward()
    before = model.weight.grad.clone()
    D.average_gradients(model.parameters())  # a no-op in one process
    assert torch.equal(model.weight.grad, before)
    # Σ_local ℓ · world / B, averaged over ranks by DDP, is the global mean loss
    assert D.scaled_loss(torch.tensor(6.0), global_batch=12, world=2).item() == 1.0
    with pytest.raises(ValueError, match="divisible"):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:  # a world of one: fine; an uneven global batch is refused before any work
            monkeypatch.setattr(D, "sync_active", lambda group=None: True)
            monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
            D.train_data_parallel(_build, _toy_data(), batch_size=16, steps=1)
        finally:
            monkeypatch.undo()
            dist.destroy_process_group()
    D.cleanup()  # nothing to leave


# --- the engine under torchrun: fit shards the batches and wraps the model in DDP --------

def _fit_rank(rank, world, data, sync):
    from bnlib.models import MLPSpec
    from bnlib.train import TrainSpec, fit
    spec = TrainSpec(steps=4, lr=0.1, momentum=0.9, batch_size=16, eval_every=2, sync_bn=sync,
                     device="cpu")
    h = fit(MLPSpec(depth=2, width=8, norm="batch"), spec, data, seed=3)
    net = h.attrs["model"]
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_fit_under_torchrun_equals_single_process_full_batch_training():
    """Two ranks with synced batch norm train exactly the single-process network (float64)."""
    from bnlib.data import load
    from bnlib.distributed import launch
    from bnlib.models import MLPSpec
    from bnlib.train import TrainSpec, fit
    data = load("digits", dtype=torch.float64, n_train=200)
    ranks = launch(_fit_rank, 2, (data, True), timeout=120)
    single = fit(MLPSpec(depth=2, width=8, norm="batch"),
                 TrainSpec(steps=4, lr=0.1, momentum=0.9, batch_size=16, eval_every=2, device="cpu"),
                 data, seed=3).attrs["model"].state_dict()
    for k, v in single.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ranks[1][k], v, rtol=1e-9, atol=1e-12)
