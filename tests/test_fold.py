"""bnlib.inference.fold_batchnorm: folded models compute what the unfolded ones compute,
agree with torch's own fusion utilities, and unfoldable models are refused clearly."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnlib import nn as bnn
from bnlib.inference import fold_batchnorm
from bnlib.models import cnn, mlp
from bnlib.nn import batchnorm_layers

BN = {"torch": (nn.BatchNorm1d, nn.BatchNorm2d), "bnlib": (bnn.BatchNorm1d, bnn.BatchNorm2d)}


def _randomize(model: nn.Module, x_shape: tuple, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and (if affine) γ, β; return eval model."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(2.0 * torch.randn(x_shape, generator=g, dtype=dtype) + 0.5)
        for bn in batchnorm_layers(model):
            if bn.weight is not None:
                bn.weight.uniform_(0.5, 2.0, generator=g)
            if bn.bias is not None:
                bn.bias.normal_(0.0, 0.5, generator=g)
    return model.eval()


def _check_equal(model: nn.Module, x: torch.Tensor) -> nn.Module:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not batchnorm_layers(folded), "a BN survived the fold"
    assert not folded.training
    with torch.no_grad():
        ref, out = model(x), folded(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    assert batchnorm_layers(model), "the original model lost its BN"
    return folded


@pytest.mark.parametrize("impl", ["torch", "bnlib"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_sequential_mlp_equal(impl, bias, affine):
    torch.manual_seed(0)
    bn1d = BN[impl][0]
    model = nn.Sequential(nn.Linear(12, 16, bias=bias), bn1d(16, affine=affine), nn.ReLU(),
                          nn.Linear(16, 8, bias=bias), bn1d(8, affine=affine), nn.Tanh(),
                          nn.Linear(8, 3))
    _check_equal(_randomize(model, (32, 12)), torch.randn(20, 12))


@pytest.mark.parametrize("impl", ["torch", "bnlib"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_sequential_cnn_equal(impl, bias, affine):
    torch.manual_seed(1)
    bn2d = BN[impl][1]
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=bias), bn2d(6, affine=affine),
                          nn.ReLU(), nn.MaxPool2d(2),
                          nn.Sequential(nn.Conv2d(6, 4, 3, stride=2, bias=bias),  # nested
                                        bn2d(4, affine=affine)),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    _check_equal(_randomize(model, (16, 3, 16, 16)), torch.randn(7, 3, 16, 16))


@pytest.mark.parametrize("impl", ["torch", "bnlib"])
@pytest.mark.parametrize("residual", [False, True])
def test_bnlib_mlp_equal(impl, residual):
    torch.manual_seed(2)
    model = mlp(10, 4, depth=3, width=16, norm="batch", norm_impl=impl, residual=residual)
    folded = _check_equal(_randomize(model, (32, 10)), torch.randn(25, 10))
    assert all(isinstance(b.norm, nn.Identity) for b in folded.blocks)
    assert all(b.layer.bias is not None for b in folded.blocks)  # the fold adds the bias


@pytest.mark.parametrize("impl", ["torch", "bnlib"])
def test_bnlib_cnn_equal(impl):
    torch.manual_seed(3)
    model = cnn(1, 10, channels=(4, 8), norm="batch", norm_impl=impl)
    _check_equal(_randomize(model, (8, 1, 8, 8)), torch.randn(5, 1, 8, 8))


def test_bnlib_bn_without_bias_and_float64():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), bnn.BatchNorm1d(6, bias=False), nn.ReLU()).double()
    _check_equal(_randomize(model, (16, 5)), torch.randn(9, 5, dtype=torch.float64))


def test_identity_between_layer_and_bn_is_transparent():
    model = nn.Sequential(nn.Linear(4, 5), nn.Identity(), nn.BatchNorm1d(5), nn.ReLU())
    _check_equal(_randomize(model, (16, 4)), torch.randn(6, 4))


def test_matches_torch_fusion_utilities():
    torch.manual_seed(5)
    lin, bn1 = nn.Linear(7, 9), nn.BatchNorm1d(9)
    conv, bn2 = nn.Conv2d(3, 5, 3, bias=False), bnn.BatchNorm2d(5)
    seq1 = _randomize(nn.Sequential(lin, bn1), (32, 7))
    seq2 = _randomize(nn.Sequential(conv, bn2), (8, 3, 10, 10))
    ours1, ours2 = fold_batchnorm(seq1)[0], fold_batchnorm(seq2)[0]
    ref1 = fuse_linear_bn_eval(lin, bn1)
    torch_bn2 = nn.BatchNorm2d(5)
    torch_bn2.load_state_dict(bn2.state_dict())
    ref2 = fuse_conv_bn_eval(conv, torch_bn2.eval())
    for ours, ref in ((ours1, ref1), (ours2, ref2)):
        torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.bias, ref.bias, rtol=1e-5, atol=1e-6)


def test_refuses_training_mode():
    model = mlp(4, 2, depth=1, width=5, norm="batch")
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model.train())
    model.eval()
    model.blocks[0].norm.train()  # one BN left in training mode is enough to refuse
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)


def test_refuses_bn_after_the_activation():
    with pytest.raises(ValueError, match="placement='after'"):
        fold_batchnorm(mlp(4, 2, depth=2, width=5, norm="batch", placement="after").eval())
    seq = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.BatchNorm1d(5)).eval()
    with pytest.raises(ValueError, match="not a Linear or Conv"):
        fold_batchnorm(seq)
    with pytest.raises(ValueError, match="nothing before it"):
        fold_batchnorm(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).eval())


def test_refuses_bn_without_running_stats():
    seq = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="running statistics"):
        fold_batchnorm(seq)
    seq = nn.Sequential(nn.Linear(4, 5), bnn.BatchNorm1d(5, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_batchnorm(seq)


def test_refuses_what_it_cannot_see_or_share():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x))

    with pytest.raises(ValueError, match="Custom"):
        fold_batchnorm(Custom().eval())
    with pytest.raises(ValueError, match="lone batch-norm"):
        fold_batchnorm(nn.BatchNorm1d(3).eval())
    with pytest.raises(TypeError):
        fold_batchnorm("not a model")
    shared = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="more than one place"):
        fold_batchnorm(nn.Sequential(shared, nn.BatchNorm1d(4), shared).eval())
    with pytest.raises(ValueError, match="features"):
        fold_batchnorm(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False),
                                     nn.Linear(4, 6), nn.BatchNorm1d(4)).eval())


def test_model_without_bn_is_copied_unchanged():
    model = mlp(4, 2, depth=2, width=5).eval()
    folded = fold_batchnorm(model)
    assert folded is not model
    x = torch.randn(3, 4)
    torch.testing.assert_close(folded(x), model(x))
