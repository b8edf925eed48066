"""bnlib.benchmark: the teaching implementations are right, the tables have their shape,
and a training step of bnlib saves no more for backward than 1.2× torch's kernel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnlib import benchmark as B
from bnlib import nn as bnn

SHAPES = [(16, 5), (4, 5, 3, 6)]
IDS = ["NC", "NCHW"]


def _native(shape):
    return (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1])


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("impl", ["d2l", "numpy-layer"])
def test_teaching_layers_match_torch(shape, impl):
    """Forward, all three gradients and the running statistics, then evaluation mode."""
    g = torch.Generator().manual_seed(0)
    ours = B.AutogradBatchNorm(shape[1]) if impl == "d2l" else B.NumpyBatchNormLayer(shape[1])
    ref = _native(shape)
    for step in range(2):
        x = torch.randn(shape, generator=g) * 2 + step
        dy = torch.randn(shape, generator=g)
        res = []
        for layer in (ours, ref):
            layer.train()
            xi = x.clone().requires_grad_(True)
            out = layer(xi)
            out.backward(dy)
            res.append([out.detach(), xi.grad, layer.weight.grad, layer.bias.grad])
            layer.weight.grad = layer.bias.grad = None
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    rm = ours.running_mean if impl == "d2l" else torch.from_numpy(ours.numpy.running_mean)
    rv = ours.running_var if impl == "d2l" else torch.from_numpy(ours.numpy.running_var)
    torch.testing.assert_close(rm, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv, ref.running_var, rtol=1e-5, atol=1e-5)
    ours.eval(), ref.eval()
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_numpy_raw_matches_the_layer():
    x = np.random.default_rng(0).standard_normal((8, 3, 2, 2)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    raw = B.NumpyBatchNorm(3)
    out, cache = raw.forward(x)
    dx, dgamma, dbeta = raw.backward(dy, cache)
    layer = nn.BatchNorm2d(3)
    xt = torch.from_numpy(x).requires_grad_(True)
    ref = layer(xt)
    ref.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dgamma, layer.weight.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_compare_and_comparison_table_shapes():
    df = B.compare({"tiny": (8, 4)}, passes=("train fwd+bwd", "eval fwd", "eval fwd+bwd"),
                   repeats=4, warmup=1)
    assert set(df.columns) >= {"input", "pass", "implementation", "median_us", "iqr_us", "ratio"}
    assert (df["median_us"] > 0).all()
    assert (df.loc[df["implementation"] == "native", "ratio"] == 1.0).all()
    # the NumPy versions have no evaluation-mode backward pass: absent, not faked
    eval_bwd = df[df["pass"] == "eval fwd+bwd"]["implementation"]
    assert set(eval_bwd) == {"native", "bnlib", "d2l-style"}
    with pytest.raises(ValueError, match="unknown pass"):
        B.compare({"tiny": (8, 4)}, passes=("sideways",), repeats=4)


def test_comparison_table_is_wide_and_quick(monkeypatch):
    monkeypatch.setattr(B, "TINY_SHAPES", {"MLP (8, 4)": (8, 4), "CNN (2, 3, 4, 4)": (2, 3, 4, 4)})
    t = B.comparison_table(repeats=4)
    assert list(t.columns) == list(B.IMPLEMENTATIONS)
    assert t.shape == (4, len(B.IMPLEMENTATIONS))
    assert (t.to_numpy() > 0).all()


def test_time_interleaved_runs_everything_in_varying_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = B.time_interleaved(fns, repeats=6, warmup=1, seed=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}
    rounds = [tuple(calls[i:i + 3]) for i in range(3, len(calls), 3)]  # after the warm-up
    assert len(set(rounds)) > 1


@pytest.mark.parametrize("shape", [(64, 32), (8, 8, 8, 8)], ids=["MLP", "CNN"])
def test_bnlib_saves_at_most_1_2x_native_for_backward(shape):
    """Deterministic memory check (no timing): bytes kept for the backward pass."""
    x = torch.randn(shape)
    native = B.saved_bytes(_native(shape), x)
    ours_cls = bnn.BatchNorm1d if len(shape) == 2 else bnn.BatchNorm2d
    ours = B.saved_bytes(ours_cls(shape[1]), x)
    d2l = B.saved_bytes(B.AutogradBatchNorm(shape[1]), x)
    assert ours["total"] <= 1.2 * native["total"]
    # what bnlib keeps is one activation-sized tensor (x − K) plus three vectors
    assert ours["total"] <= x.numel() * x.element_size() + 3 * shape[1] * 4 + 64
    assert d2l["total"] > 2 * native["total"]  # autograd through mean/var keeps far more


def test_memory_table_rows():
    mem = B.memory_table({"t": (16, 4)})
    assert list(mem["implementation"]) == ["native", "bnlib", "d2l-style"]
    assert mem.loc[mem["implementation"] == "native", "ratio"].item() == 1.0


def test_op_count_of_a_training_step_stays_small():
    """The MLP case is bound by the number of tensor operations: keep it from creeping up."""
    ours = B.op_count("bnlib", (16, 8))
    native = B.op_count("native", (16, 8))
    d2l = B.op_count("d2l-style", (16, 8))
    assert ours["forward"] + ours["backward"] <= 32
    assert ours["forward"] + ours["backward"] < d2l["forward"] + d2l["backward"]
    assert native["forward"] + native["backward"] < ours["forward"] + ours["backward"]


def test_cost_breakdown_entries():
    """The breakdown times every entry (quick: a tiny input, four repeats)."""
    df = B.cost_breakdown((8, 4), repeats=4, warmup=1)
    assert list(df["entry"]) == ["native step", "native kernels", "bnlib step",
                                 "bnlib arithmetic", "bnlib data passes",
                                 "bnlib arithmetic, batch of 2"]
    assert len(B.cost_breakdown((4, 3, 2, 2), repeats=4, warmup=1)) == 6  # the image path
    assert (df["median_us"] > 0).all()
