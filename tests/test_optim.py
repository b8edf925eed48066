"""bnlib.optim.SGD against torch.optim.SGD: the same training run two ways, bitwise equal.

Each comparison trains two copies of one small MLP (with a bnlib batch norm) from the same
initialisation on the same batches, one with each optimiser, and checks after every step
that the parameters and the momentum buffers are ``torch.equal`` (float32)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlib import nn as bnn
from bnlib.optim import SGD
from bnlib.train import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), bnn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


def _batches(n: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()


def _assert_same(a: nn.Module, b: nn.Module, oa: torch.optim.Optimizer, ob: torch.optim.Optimizer,
                 step: int) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), (step, name, (p - q).abs().max().item())
        ba = oa.state.get(p, {}).get("momentum_buffer")    # .get: do not grow the defaultdicts
        bb = ob.state.get(q, {}).get("momentum_buffer")
        assert (ba is None) == (bb is None), (step, name)
        if ba is not None:
            assert torch.equal(ba, bb), (step, name)
    assert len(oa.state) == len(ob.state)


def _two_runs(options: dict, groups=None, steps: int = STEPS):
    """Train copies of one MLP with torch.optim.SGD and with bnlib.optim.SGD; compare every step."""
    a = _mlp()
    b = copy.deepcopy(a)
    params = (lambda net: net.parameters()) if groups is None else groups
    oa, ob = torch.optim.SGD(params(a), **options), SGD(params(b), **options)
    for i, (x, y) in enumerate(_batches(steps)):
        _step(a, oa, x, y)
        _step(b, ob, x, y)
        _assert_same(a, b, oa, ob, i)
    return a, b, oa, ob


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_bitwise_equal_to_torch_sgd(momentum, nesterov, weight_decay):
    _two_runs(dict(lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))


@pytest.mark.parametrize("options", [dict(lr=0.05, momentum=0.5, dampening=0.3),
                                     dict(lr=0.05, momentum=0.9, weight_decay=1e-2, maximize=True)])
def test_dampening_and_maximize(options):
    _two_runs(options)


def test_param_groups_with_different_learning_rates_and_a_frozen_parameter():
    def groups(net):
        net[0].bias.requires_grad_(False)            # never gets a gradient: skipped by both
        return [{"params": [net[0].weight, net[0].bias], "lr": 0.3},
                {"params": list(net[1].parameters()), "momentum": 0.0},
                {"params": list(net[3].parameters())}]
    a, b, oa, ob = _two_runs(dict(lr=0.05, momentum=0.9), groups=groups)
    assert [g["lr"] for g in ob.param_groups] == [0.3, 0.05, 0.05]
    assert [g["momentum"] for g in ob.param_groups] == [0.9, 0.0, 0.9]
    assert a[0].bias.grad is None and b[0].bias not in ob.state
    assert set(oa.param_groups[0]) == set(ob.param_groups[0])   # the same keys as torch's groups


def test_step_lr_scheduler():
    a = _mlp()
    b = copy.deepcopy(a)
    oa = torch.optim.SGD(a.parameters(), lr=0.2, momentum=0.9)
    ob = SGD(b.parameters(), lr=0.2, momentum=0.9)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=3, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=3, gamma=0.5)
    lrs = []
    for i, (x, y) in enumerate(_batches(7)):
        _step(a, oa, x, y)
        _step(b, ob, x, y)
        sa.step()
        sb.step()
        lrs.append(ob.param_groups[0]["lr"])
        _assert_same(a, b, oa, ob, i)
    assert lrs == [0.2, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05]
    assert sb.get_last_lr() == sa.get_last_lr()


@pytest.mark.parametrize("direction", ["bnlib->torch", "torch->bnlib"])
def test_state_dict_moves_between_the_two_and_training_continues_identically(direction):
    """Train 4 steps with one class, load its state into the other, continue 4 steps; a run
    that used the first class throughout must end bitwise at the same place."""
    first, second = (SGD, torch.optim.SGD) if direction == "bnlib->torch" else (torch.optim.SGD, SGD)
    options = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    batches = _batches()
    ref = _mlp()
    net = copy.deepcopy(ref)
    o_ref, o = first(ref.parameters(), **options), first(net.parameters(), **options)
    for x, y in batches[:4]:
        _step(ref, o_ref, x, y)
        _step(net, o, x, y)
    moved = second(net.parameters(), lr=1.0)         # options come from the state dict
    moved.load_state_dict(o.state_dict())
    assert moved.param_groups[0]["lr"] == 0.1 and moved.param_groups[0]["nesterov"]
    for i, (x, y) in enumerate(batches[4:]):
        _step(ref, o_ref, x, y)
        _step(net, moved, x, y)
        _assert_same(ref, net, o_ref, moved, 4 + i)
    assert moved.state_dict()["param_groups"] == o_ref.state_dict()["param_groups"]


def test_is_an_optimizer_with_torch_behaviour():
    net = _mlp()
    opt = make_optimizer(net.parameters(), "sgd", lr=0.1, momentum=0.9)
    assert isinstance(opt, SGD) and isinstance(opt, torch.optim.Optimizer)
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    opt.zero_grad(set_to_none=False)                  # zeroed in place, kept
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    assert opt.step() is None                         # no gradients: nothing moves, no state
    assert len(opt.state) == 0

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss
    with torch.no_grad():                             # the closure runs with gradients on anyway
        loss = opt.step(closure)
    assert loss.requires_grad and len(opt.state) == len(list(net.parameters())) == 6
    seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(o))
    opt.step()
    assert seen == [opt]
    clone = copy.deepcopy(opt)                        # pickling keeps the class and its state
    assert isinstance(clone, SGD) and len(clone.state) == 6 and clone.param_groups[0]["lr"] == 0.1
    named = SGD(net.named_parameters(), lr=0.1)
    assert named.param_groups[0]["param_names"][0] == "0.weight"


@pytest.mark.parametrize("cls", [SGD, torch.optim.SGD])
def test_bad_input_errors_like_torch(cls):
    w = nn.Parameter(torch.randn(3))
    for kwargs, match in [(dict(lr=-0.1), "Invalid learning rate"),
                          (dict(lr=0.1, momentum=-0.5), "Invalid momentum value"),
                          (dict(lr=0.1, weight_decay=-1.0), "Invalid weight_decay value"),
                          (dict(lr=0.1, nesterov=True), "Nesterov momentum requires"),
                          (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov")]:
        with pytest.raises(ValueError, match=match):
            cls([w], **kwargs)
    with pytest.raises(ValueError, match="empty parameter list"):
        cls([], lr=0.1)
    with pytest.raises(TypeError, match="iterable of Tensors"):
        cls(w, lr=0.1)
    with pytest.raises(TypeError, match="ordered collections"):
        cls([{"params": {w}}], lr=0.1)
    with pytest.raises(TypeError, match="can only optimize Tensors"):
        cls([w, 1.0], lr=0.1)
    with pytest.raises(ValueError, match="non-leaf"):
        cls([w * 2], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        cls([{"params": [w]}, {"params": [w], "lr": 0.2}], lr=0.1)
    with pytest.raises(TypeError, match="param_group must be a dict"):
        cls([w], lr=0.1).add_param_group([w])


def test_what_it_does_not_implement_is_refused():
    w = nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="float lr"):
        SGD([w], lr=torch.tensor(0.1))
    with pytest.raises(TypeError):
        SGD([w], lr=0.1, foreach=True)              # type: ignore[call-arg]
    emb = nn.Embedding(5, 2, sparse=True)
    opt = SGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_does_not_import_dynamo():
    """Importing bnlib and training with its SGD (construct, zero_grad, step) leaves
    ``torch._dynamo`` unimported: the point of the class."""
    code = ("import sys, torch, bnlib, bnlib.nn, bnlib.train, bnlib.optim\n"
            "assert 'torch._dynamo' not in sys.modules, 'importing bnlib imported torch._dynamo'\n"
            "nn = torch.nn\n"
            "net = nn.Sequential(nn.Linear(4, 8), bnlib.nn.BatchNorm1d(8), nn.Linear(8, 2))\n"
            "opt = bnlib.train.make_optimizer(net.parameters(), 'sgd', lr=0.1, momentum=0.9,\n"
            "                                 weight_decay=1e-4)\n"
            "sched = torch.optim.lr_scheduler.StepLR(opt, 1)\n"
            "for _ in range(2):\n"
            "    opt.zero_grad(); net(torch.randn(8, 4)).sum().backward(); opt.step(); sched.step()\n"
            "print('torch._dynamo' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout
