"""Mechanics of chapter 20's experiment (bnlib/experiments/shift.py)."""
from __future__ import annotations


import pytest
import torch

from bnlib import experiments
from bnlib.experiments.shift import CNN1d, ShiftConfig, bn_under_shift, shifted
from bnlib.nn import BatchNorm1d, batchnorm_layers


def _trained_net(seed: int = 0) -> CNN1d:
    """A CNN1d whose running statistics differ from the batch statistics of new data."""
    torch.manual_seed(seed)
    net = CNN1d(channels=4, layers=2)
    net.train()
    for _ in range(5):
        net(torch.randn(16, 1, 40) * 2 + 1)
    return net.eval()


def test_cnn1d_shapes_and_layers():
    net = CNN1d(channels=8)
    assert net(torch.randn(5, 1, 40)).shape == (5, 10)
    assert len(batchnorm_layers(net)) == 3
    assert all(isinstance(b, BatchNorm1d) for b in batchnorm_layers(net))
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv1d))
    assert CNN1d(2, 33, 4, channels=3, layers=2, kernel=3)(torch.randn(2, 2, 33)).shape == (2, 4)
    with pytest.raises(ValueError):
        CNN1d(num_classes=1)


def test_shifted():
    x = torch.randn(6, 1, 40)
    assert shifted(x, "none", 0.0) is x
    torch.testing.assert_close(shifted(x, "contrast", 2.0), 2 * x)
    torch.testing.assert_close(shifted(x, "offset", 0.5), x + 0.5)
    noisy = shifted(x, "noise", 0.5, seed=3)
    assert torch.equal(noisy, shifted(x, "noise", 0.5, seed=3))
    assert 0.3 < (noisy - x).std().item() < 0.7
    with pytest.raises(ValueError, match="shift kind"):
        shifted(x, "blur", 1.0)


def test_bn_under_shift_tiny_run():
    assert experiments.get("bn_under_shift").chapter == "20_shift"
    cfg = ShiftConfig(seeds=(0,), steps=3, channels=4, noise=(0.5,), contrast=(2.0,), offset=(1.0,),
                      severity_batch_sizes=(2,), sweep_conditions=(("offset", 1.0),),
                      test_batch_sizes=(1, 64), priors=(0.0, 16.0), device="cpu")
    df = bn_under_shift(cfg)
    assert set(df.columns) == {"seed", "shift", "level", "method", "batch_size", "prior", "accuracy"}
    assert set(df["method"]) == {"running", "recomputed", "adapted", "batch"}
    # 4 conditions × 3 whole-set methods + 4 × B=2 + offset's extra (1, 0), (1, 16), (64, 0), (64, 16)
    assert len(df) == 4 * 3 + 4 + 4
    assert df["accuracy"].between(0, 1).all()
    # contrast: with bias-free convolutions, batch statistics make it invisible
    b2 = df[(df["method"] == "batch") & (df["batch_size"] == 2)].set_index("shift")["accuracy"]
    assert b2["contrast"] == pytest.approx(b2["none"])
