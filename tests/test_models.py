"""bnlib.models: shapes, named blocks, biases, placement, residuals, init, dropout, the CNN."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlib import models
from bnlib import nn as bnn
from bnlib.models import CNN1d, LogisticRegression, LogRegSpec, add_shift_noise
from bnlib.nn import BatchNorm1d, batchnorm_layers


def _order(block, x):
    """The order in which a block's named children run."""
    seen = []
    hooks = [getattr(block, n).register_forward_hook(lambda m, i, o, n=n: seen.append(n))
             for n in ("layer", "norm", "act")]
    block(x)
    for h in hooks:
        h.remove()
    return seen


def test_mlp_shapes_and_named_blocks():
    net = models.mlp(10, 3, depth=4, width=16)
    assert isinstance(net, models.Net) and len(net.blocks) == 4
    assert net(torch.randn(5, 10)).shape == (5, 3)
    for i, block in enumerate(net.blocks):
        assert isinstance(block.layer, nn.Linear) and isinstance(block.norm, nn.Identity)
        assert isinstance(block.act, nn.ReLU)
        assert block.layer.in_features == (10 if i == 0 else 16) and block.layer.out_features == 16
    assert net.weight_layers() == [b.layer for b in net.blocks] + [net.head]


@pytest.mark.parametrize("impl,cls", [("bnlib", bnn.BatchNorm1d), ("torch", nn.BatchNorm1d)])
def test_norm_batch_uses_the_chosen_implementation(impl, cls):
    net = models.mlp(6, 2, depth=2, width=8, norm="batch", norm_impl=impl)
    assert all(type(b.norm) is cls and b.norm.num_features == 8 for b in net.blocks)
    with pytest.raises(ValueError, match="impl"):
        models.mlp(6, 2, norm="batch", norm_impl="keras")


def test_no_bias_right_before_batch_norm():
    before = models.mlp(6, 2, depth=3, width=8, norm="batch", placement="before")
    assert all(b.layer.bias is None for b in before.blocks)
    assert before.head.bias is not None
    after = models.mlp(6, 2, depth=3, width=8, norm="batch", placement="after")
    assert all(b.layer.bias is not None for b in after.blocks)
    plain = models.mlp(6, 2, depth=3, width=8)
    assert all(b.layer.bias is not None for b in plain.blocks)
    conv = models.cnn(1, 3, channels=(4, 8), norm="batch")
    assert all(b.layer.bias is None for b in conv.blocks)


@pytest.mark.parametrize("placement,order", [("before", ["layer", "norm", "act"]),
                                             ("after", ["layer", "act", "norm"])])
def test_placement_order(placement, order):
    net = models.mlp(6, 2, depth=2, width=8, norm="batch", placement=placement)
    assert _order(net.blocks[0], torch.randn(4, 6)) == order
    with pytest.raises(ValueError, match="placement"):
        models.mlp(6, 2, placement="sideways")


def test_placement_semantics_before_feeds_normalised_values_to_act():
    net = models.mlp(6, 2, depth=1, width=8, norm="batch", placement="before")
    captured = {}
    net.blocks[0].act.register_forward_hook(lambda m, i, o: captured.setdefault("in", i[0]))
    net(torch.randn(32, 6) * 5 + 3)
    torch.testing.assert_close(captured["in"].mean(0), torch.zeros(8), atol=1e-5, rtol=0)


def test_residual_blocks_add_their_input():
    torch.manual_seed(0)
    net = models.mlp(6, 2, depth=3, width=8, residual=True)
    assert [b.residual for b in net.blocks] == [False, True, True]
    x = torch.randn(4, 6)
    h0 = net.blocks[0](x)
    block = net.blocks[1]
    torch.testing.assert_close(block(h0), h0 + block.act(block.norm(block.layer(h0))))


def test_residual_branch_scale():
    torch.manual_seed(0)
    a = models.mlp(6, 2, depth=3, width=8, residual=True)
    torch.manual_seed(0)
    b = models.mlp(6, 2, depth=3, width=8, residual=True, residual_branch_scale=0.5)
    torch.testing.assert_close(b.blocks[0].layer.weight, a.blocks[0].layer.weight)
    for ba, bb in zip(a.blocks[1:], b.blocks[1:]):
        torch.testing.assert_close(bb.layer.weight, 0.5 * ba.layer.weight)


@pytest.mark.parametrize("init", ["kaiming", "xavier", "default"])
def test_init_scale_multiplies_the_std(init):
    torch.manual_seed(0)
    a = models.mlp(20, 3, depth=2, width=32, init=init)
    torch.manual_seed(0)
    b = models.mlp(20, 3, depth=2, width=32, init=init, init_scale=3.0)
    for la, lb in zip(a.weight_layers(), b.weight_layers()):
        torch.testing.assert_close(lb.weight, 3.0 * la.weight)
        if lb.bias is not None and init != "default":
            assert torch.equal(lb.bias, torch.zeros_like(lb.bias))


def test_kaiming_std_and_explicit_std():
    torch.manual_seed(0)
    net = models.mlp(400, 2, depth=1, width=400, init="kaiming")
    std = net.blocks[0].layer.weight.std().item()
    assert abs(std - (2 / 400) ** 0.5) < 0.05 * (2 / 400) ** 0.5
    torch.manual_seed(0)
    net = models.mlp(400, 2, depth=1, width=400, init="normal", init_std=0.01, init_scale=2.0)
    assert abs(net.blocks[0].layer.weight.std().item() - 0.02) < 0.001
    with pytest.raises(ValueError, match="std"):
        models.mlp(4, 2, init="normal")


def test_dropout_placement():
    blocks = models.mlp(6, 2, depth=3, width=8, dropout=0.3, dropout_at="blocks")
    assert isinstance(blocks.blocks[0].drop, nn.Identity)
    assert all(isinstance(b.drop, nn.Dropout) and b.drop.p == 0.3 for b in blocks.blocks[1:])
    assert isinstance(blocks.neck, nn.Dropout)
    head = models.mlp(6, 2, depth=3, width=8, dropout=0.3, dropout_at="head")
    assert all(isinstance(b.drop, nn.Identity) for b in head.blocks)
    assert isinstance(head.neck, nn.Dropout)
    none = models.mlp(6, 2, depth=3, width=8)
    assert not any(isinstance(m, nn.Dropout) for m in none.modules())
    with pytest.raises(ValueError, match="dropout_at"):
        models.mlp(6, 2, dropout=0.1, dropout_at="everywhere")


def test_dropout_sits_before_the_next_layer_and_batch_norm():
    net = models.mlp(6, 2, depth=2, width=8, dropout=0.5, norm="batch")
    seen = []
    block = net.blocks[1]
    for name in ("drop", "layer", "norm"):
        getattr(block, name).register_forward_hook(lambda m, i, o, n=name: seen.append(n))
    net(torch.randn(4, 6))
    assert seen == ["drop", "layer", "norm"]


def test_activations_and_norm_kinds():
    for act, cls in models.ACTIVATIONS.items():
        net = models.mlp(4, 2, depth=1, width=4, activation=act)
        assert type(net.blocks[0].act) is cls
    with pytest.raises(ValueError, match="activation"):
        models.mlp(4, 2, activation="swish")
    from bnlib.norms import GroupNorm, LayerNorm  # bnlib's own layer and group norm
    assert isinstance(models.mlp(4, 2, norm="layer").blocks[0].norm, LayerNorm)
    assert isinstance(models.cnn(1, 2, channels=(8,), norm="layer").blocks[0].norm, GroupNorm)
    with pytest.raises(ValueError, match="norm"):
        models.mlp(4, 2, norm="instance")
    with pytest.raises(ValueError, match="depth"):
        models.mlp(4, 2, depth=0)


def test_cnn_forward_and_pooling():
    net = models.cnn(1, 10, channels=(4, 8, 16), norm="batch")
    out = net(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10)
    assert [type(b.layer) for b in net.blocks] == [nn.Conv2d] * 3
    assert [type(b.norm) for b in net.blocks] == [bnn.BatchNorm2d] * 3
    # 2×2 max-pooling after every block but the last, then global average pooling
    assert [type(b.pool) for b in net.blocks] == [nn.MaxPool2d, nn.MaxPool2d, nn.Identity]
    x = torch.randn(2, 1, 8, 8)
    h = net.blocks[1](net.blocks[0](x))
    assert h.shape == (2, 8, 2, 2)
    no_pool = models.cnn(3, 4, channels=(4, 4), pool_every=0)
    assert all(isinstance(b.pool, nn.Identity) for b in no_pool.blocks)
    assert no_pool(torch.randn(2, 3, 6, 6)).shape == (2, 4)


# --- fixed networks (CNN1d, logistic regression) and add_shift_noise ----------------------

def test_cnn1d_shapes_and_layers():
    net = CNN1d(channels=8)
    assert net(torch.randn(5, 1, 40)).shape == (5, 10)
    assert len(batchnorm_layers(net)) == 3
    assert all(isinstance(b, BatchNorm1d) for b in batchnorm_layers(net))
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv1d))
    assert CNN1d(2, 33, 4, channels=3, layers=2, kernel=3)(torch.randn(2, 2, 33)).shape == (2, 4)
    with pytest.raises(ValueError):
        CNN1d(num_classes=1)


def test_logistic_regression_and_spec():
    plain, with_bn = LogisticRegression(5, 3), LogisticRegression(5, 3, input_norm=True)
    assert isinstance(with_bn.norm, BatchNorm1d) and not isinstance(plain.norm, BatchNorm1d)
    x = torch.randn(8, 5)
    assert plain(x).shape == with_bn(x).shape == (8, 3)
    out = with_bn.train().norm(x * 100 + 7)  # input BN: the classifier sees standardised features
    torch.testing.assert_close(out.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        LogisticRegression(5, 1)
    with pytest.raises(ValueError, match="norm"):
        LogRegSpec(norm="layer").build(0, None)


def test_add_shift_noise_wraps_every_norm():
    net = add_shift_noise(models.mlp(6, 3, depth=2, width=8, norm="batch"))
    for block in net.blocks:
        assert isinstance(block.norm, nn.Sequential)
        assert isinstance(block.norm[0], BatchNorm1d) and isinstance(block.norm[1], bnn.ShiftNoise)
    assert net(torch.randn(5, 6)).shape == (5, 3)
    with pytest.raises(TypeError):
        add_shift_noise(nn.Linear(2, 2))
