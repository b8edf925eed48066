"""bnlib.doctor: each check fires on its bug, stays quiet on healthy models (torch's and
bnlib's batch norm alike), never changes the model, and the CLI's exit codes."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from bnlib import data, doctor, models
from bnlib import nn as bnn
from bnlib.doctor import Finding, diagnose
from bnlib.train import train

IMPLS = {"torch": nn, "bnlib": bnn}


def codes(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.code, f.layer) for f in findings}


def snapshot(model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, flags, grads


def assert_unchanged(model: nn.Module, snap) -> None:
    state, flags, grads = snap
    now, now_flags, now_grads = snapshot(model)
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]) or (now[k].isnan() == state[k].isnan()).all() and \
            torch.equal(now[k].nan_to_num(), state[k].nan_to_num()), k
    assert now_flags == flags and now_grads == grads


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module", params=["bnlib", "torch"])
def trained(request, digits):
    torch.manual_seed(0)
    net = models.mlp(64, 10, norm="batch", width=32, depth=2, norm_impl=request.param)
    train(net, digits, steps=10, lr=0.1, device="cpu")
    return net


def x64(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(1))


# --- healthy models ---------------------------------------------------------------------

def test_clean_models_have_no_findings(trained, digits):
    assert diagnose(trained, digits.train.x[:64]) == []
    for impl in IMPLS:
        torch.manual_seed(0)
        assert diagnose(models.mlp(64, 10, norm="batch", norm_impl=impl), x64()) == []  # fresh, train mode
        assert diagnose(models.cnn(1, 10, norm="batch", channels=(4, 8), norm_impl=impl),
                        torch.randn(16, 1, 8, 8)) == []
    assert diagnose(models.mlp(64, 10, depth=2, width=16), x64()) == []
    assert diagnose(models.mlp(64, 10, depth=2, width=16).eval(), x64()) == []
    # BN after the ReLU: the Linear's bias feeds the ReLU, not the BN
    assert diagnose(models.mlp(64, 10, norm="batch", placement="after", width=16), x64()) == []


def test_diagnose_leaves_the_model_as_it_was(trained):
    trained.blocks[0].norm.train()           # a layer left in train mode: a forward would move it
    for p in trained.blocks[1].norm.parameters():
        p.requires_grad_(False)
    snap = snapshot(trained)
    found = diagnose(trained, x64())
    assert_unchanged(trained, snap)
    assert ("train-mode-in-eval", "blocks.0.norm") in codes(found)
    trained.eval()
    for p in trained.parameters():
        p.requires_grad_(True)
    # a model in train mode: the trace runs train-mode passes on a copy only
    trained.train()
    snap = snapshot(trained)
    diagnose(trained, x64())
    assert_unchanged(trained, snap)
    trained.eval()


class Uncopyable(nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 8, bias=False), IMPLS[impl].BatchNorm1d(8), nn.ReLU(),
                                 nn.Linear(8, 3))

    def __deepcopy__(self, memo):
        raise TypeError("no copies")

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("impl", IMPLS)
def test_uncopyable_model_is_restored(impl):
    m = Uncopyable(impl)
    m.net[1].running_mean.fill_(0.5)
    m.net[1].weight.requires_grad_(False)
    snap = snapshot(m)
    diagnose(m, x64())
    assert_unchanged(m, snap)


# --- each check -------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_structure_checks(impl):
    BN = IMPLS[impl].BatchNorm1d
    net = nn.Sequential(nn.Dropout(0.3), nn.Linear(64, 16), nn.Identity(), BN(16), nn.ReLU(),
                        nn.Linear(16, 4), BN(4))
    found = codes(diagnose(net, x64()))
    assert ("bias-before-bn", "1") in found and ("bias-before-bn", "5") in found
    assert ("dropout-before-bn", "3") in found
    assert ("bn-on-logits", "6") in found
    assert len(found) == 4, found


def test_structure_through_custom_modules():
    # bnlib's Net/Block: Block.forward is custom code, dropout → Linear → BN inside a block
    net = models.mlp(64, 10, norm="batch", width=16, depth=3, dropout=0.2)
    found = codes(diagnose(net, x64()))
    assert found == {("dropout-before-bn", "blocks.1.norm"), ("dropout-before-bn", "blocks.2.norm")}
    # dropout only before the head, after every BN: fine
    assert diagnose(models.mlp(64, 10, norm="batch", width=16, dropout=0.2, dropout_at="head"), x64()) == []
    # a conv block with a bias before its BN
    block = models.Block(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    net = models.Net([block], nn.Linear(4, 3), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    assert codes(diagnose(net, torch.randn(8, 1, 6, 6))) == {("bias-before-bn", "blocks.0.layer")}


def test_residual_add_breaks_the_direct_link():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(x + self.fc(x)) + 0

    assert diagnose(Res(), torch.randn(16, 8)) == []


@pytest.mark.parametrize("impl", IMPLS)
def test_momentum_checks(impl):
    BN = IMPLS[impl].BatchNorm1d
    net = nn.Sequential(nn.Linear(64, 8, bias=False), BN(8, momentum=0.99), nn.ReLU(),
                        nn.Linear(8, 8, bias=False), BN(8, momentum=0.0), nn.Linear(8, 2))
    f = diagnose(net, x64())
    assert codes(f) == {("keras-momentum", "1"), ("zero-momentum", "4")}
    assert "momentum=0.01" in next(x for x in f if x.code == "keras-momentum").fix
    net[1].momentum = None  # cumulative average: fine
    assert codes(diagnose(net, x64())) == {("zero-momentum", "4")}


@pytest.mark.parametrize("impl", IMPLS)
def test_eval_batch_dependence(impl, trained):
    BN = IMPLS[impl].BatchNorm1d
    net = nn.Sequential(nn.Linear(64, 8, bias=False), BN(8, track_running_stats=False), nn.ReLU(),
                        nn.Linear(8, 2)).eval()
    (f,) = diagnose(net, x64())
    assert f.code == "no-running-stats" and f.layer == "1" and "measured" in f.what
    trained.blocks[1].norm.train()  # left in train mode under an eval-mode model
    try:
        (f,) = diagnose(trained, x64())
    finally:
        trained.eval()
    assert (f.code, f.layer) == ("train-mode-in-eval", "blocks.1.norm") and "measured" in f.what


def test_batch_dependence_of_a_custom_layer():
    class BatchCentre(nn.Module):  # normalises over the batch in every mode, not a BN class
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    net = nn.Sequential(nn.Linear(64, 4), BatchCentre())
    (f,) = diagnose(net, x64())
    assert f.code == "eval-batch-dependent" and f.layer == ""
    assert diagnose(net, x64(1)) == []  # a batch of one cannot show it


@pytest.mark.parametrize("impl", IMPLS)
def test_values_per_channel(impl):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), IMPLS[impl].BatchNorm2d(4), nn.Flatten(),
                        nn.Linear(4, 2, bias=False), IMPLS[impl].BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 2))
    found = codes(diagnose(net, torch.randn(1, 1, 3, 3)))  # 1×1 feature map, batch of 1
    assert found == {("one-value-per-channel", "1"), ("one-value-per-channel", "4")}
    found = codes(diagnose(net, torch.randn(4, 1, 3, 3)))
    assert found == {("few-values-per-channel", "1"), ("few-values-per-channel", "4")}
    assert diagnose(net, torch.randn(4, 1, 3, 3), min_values=4) == []
    assert diagnose(net, torch.randn(8, 1, 3, 3)) == []


def test_running_statistics_checks(trained):
    bn = trained.blocks[0].norm
    saved = {k: v.clone() for k, v in bn.state_dict().items()}
    try:
        bn.running_var[0] = float("nan")
        bn.running_var[1] = -1.0
        (f,) = diagnose(trained, x64())
        assert (f.code, f.layer) == ("bad-running-stats", "blocks.0.norm") and f.what.startswith("2 ")
        bn.running_var.copy_(saved["running_var"])
        bn.running_mean[0] = float("inf")
        assert codes(diagnose(trained, x64())) == {("bad-running-stats", "blocks.0.norm")}
    finally:
        bn.load_state_dict(saved)
    # a checkpoint of parameters only: the reloaded model has the initial statistics
    params_only = {k: v.detach().clone() for k, v in trained.named_parameters()}
    fresh = models.mlp(64, 10, norm="batch", width=32, depth=2)
    fresh.load_state_dict(params_only, strict=False)
    fresh.eval()
    assert codes(diagnose(fresh, x64())) == {("stats-never-updated", "blocks.0.norm"),
                                            ("stats-never-updated", "blocks.1.norm")}
    fresh.train()  # about to be trained: nothing wrong yet
    assert diagnose(fresh, x64()) == []


class FrozenBN(nn.BatchNorm1d):
    """A batch norm that stays in eval mode whatever model.train() says."""

    def train(self, mode: bool = True):
        return super().train(False)


def test_frozen_but_updating(trained):
    for p in trained.blocks[0].norm.parameters():
        p.requires_grad_(False)
    try:
        assert codes(diagnose(trained, x64())) == {("frozen-but-updating", "blocks.0.norm")}
        for p in trained.parameters():  # the whole model frozen: an inference model
            p.requires_grad_(False)
        assert diagnose(trained, x64()) == []
    finally:
        for p in trained.parameters():
            p.requires_grad_(True)
    # the fix: the frozen layer stays in eval mode
    net = nn.Sequential(nn.Linear(64, 8, bias=False), FrozenBN(8), nn.ReLU(), nn.Linear(8, 2))
    net[1].running_var.fill_(2.0)
    net[1].num_batches_tracked += 5
    for p in net[1].parameters():
        p.requires_grad_(False)
    assert diagnose(net, x64()) == []


def test_finding_str_and_errors():
    f = Finding("keras-momentum", "blocks.0.norm", "momentum=0.99", "because", "use 0.01")
    text = str(f)
    assert text.startswith("[keras-momentum] blocks.0.norm: momentum=0.99")
    assert "why: because" in text and "fix: use 0.01" in text
    assert "(model)" in str(Finding("eval-batch-dependent", "", "w", "y", "f"))
    assert set(doctor.CODES) >= {"bias-before-bn", "frozen-but-updating"}
    with pytest.raises(ValueError, match="fails on the example batch"):
        diagnose(nn.Linear(3, 2), torch.randn(4, 5))
    with pytest.raises(TypeError, match="nn.Module"):
        diagnose(lambda x: x, torch.randn(4, 5))


# --- command line -------------------------------------------------------------------------

GOOD = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(16, 8)

def bad():
    return nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4, momentum=0.9), nn.Linear(4, 2)), torch.randn(16, 8)

def model_only():
    return nn.Sequential(nn.Linear(8, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))

def with_shape():
    return model_only()
with_shape.input_shape = (16, 8)

def boom():
    raise RuntimeError("factory exploded")

def wrong_type():
    return 42

def wrong_shape():
    return model_only(), torch.randn(16, 3)

NOT_CALLABLE = 3
"""


@pytest.fixture()
def factory_file(tmp_path):
    p = tmp_path / "factories.py"
    p.write_text(textwrap.dedent(GOOD))
    return p


def run(argv, capsys):
    rc = doctor.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_healthy_and_findings(factory_file, capsys):
    rc, out, err = run([f"{factory_file}:make"], capsys)
    assert rc == 0 and "no batch-norm problems" in out and err == ""
    rc, out, err = run([f"{factory_file}:bad"], capsys)
    assert rc == 1 and "[bias-before-bn] 0" in out and "[keras-momentum] 1" in out
    assert "2 findings" in out
    rc, out, _ = run([f"{factory_file}:model_only", "--input-shape", "16,8"], capsys)
    assert rc == 0
    rc, out, _ = run([f"{factory_file}:with_shape"], capsys)
    assert rc == 0
    rc, out, _ = run([f"{factory_file}:with_shape", "--input-shape", "2,8", "--min-values", "8"], capsys)
    assert rc == 1 and "few-values-per-channel" in out


def test_cli_module_path(factory_file, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    rc, out, err = run(["factories:bad"], capsys)
    assert rc == 1 and "keras-momentum" in out and err == ""


@pytest.mark.parametrize("target, message", [
    ("missing.py:make", "no such file"),
    ("{f}:nope", "has no attribute 'nope'"),
    ("{f}:NOT_CALLABLE", "not a callable"),
    ("{f}:boom", "raised RuntimeError: factory exploded"),
    ("{f}:wrong_type", "returned int"),
    ("{f}:model_only", "returned only a model"),
    ("{f}:wrong_shape", "fails on the example batch"),
    ("{f}", "expected FILE.py:FACTORY"),
    ("bnlib.no_such_module:make", "cannot import module"),
    ("bnlib.models:mlp", "raised TypeError"),
    ("{syntax}:make", "syntax error in"),
    ("{raising}:make", "raised ZeroDivisionError"),
])
def test_cli_errors_are_one_line(target, message, factory_file, tmp_path, capsys):
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def make(:\n    pass\n")
    raising = tmp_path / "raising.py"
    raising.write_text("1 / 0\n")
    rc, out, err = run([target.format(f=factory_file, syntax=syntax, raising=raising)], capsys)
    assert rc == 2 and out == ""
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_cli_bad_arguments(factory_file, capsys):
    rc, _, err = run([f"{factory_file}:make", "--input-shape", "a,b"], capsys)
    assert rc == 2 and "not a shape" in err
    rc, _, _ = run([], capsys)
    assert rc == 2
