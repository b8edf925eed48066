"""bnlib.train: the training engine (determinism, pairing, divergence, validation)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

import bnlib.optim
from bnlib import data as datasets
from bnlib import models
from bnlib.train import (StepInfo, batches, evaluate, make_optimizer, resolve_device, seeded,
                         train)


@pytest.fixture(scope="module")
def gm():
    return datasets.load("gaussian_mixture", n=600, dim=8, classes=3)


def _net(seed, norm="batch", **kw):
    return seeded(seed, lambda: models.mlp(8, 3, depth=2, width=16, norm=norm, **kw))


def _history(df):
    return df.drop(columns=["elapsed"]).reset_index(drop=True)


def test_history_format(gm):
    net = _net(0)
    df = train(net, gm, steps=20, lr=0.1, batch_size=32, device="cpu", eval_every=5,
               eval_splits=("train", "val"))
    assert list(df.columns) == ["step", "split", "loss", "accuracy", "elapsed", "diverged"]
    assert sorted(df["step"].unique()) == [0, 5, 10, 15, 20]
    assert set(df["split"]) == {"batch", "train", "val"}
    assert (df[df["split"] == "batch"]["step"] > 0).all()  # no batch row before any step
    assert df["elapsed"].is_monotonic_increasing or df.groupby("split")["elapsed"].is_monotonic_increasing.all()
    assert not df["diverged"].any() and df.attrs["diverged_step"] is None and df.attrs["steps"] == 20
    assert df[["loss", "accuracy"]].notna().all().all()
    assert not net.training  # left in eval mode
    val = df[df["split"] == "val"]
    assert val["loss"].iloc[-1] < val["loss"].iloc[0]  # it learns


def test_same_seed_same_history_and_weights(gm):
    runs = []
    for _ in range(2):
        net = _net(3)
        df = train(net, gm, steps=15, lr=0.2, batch_size=32, seed=3, device="cpu", eval_every=5)
        runs.append((df, net.state_dict()))
    pd.testing.assert_frame_equal(_history(runs[0][0]), _history(runs[1][0]))
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k


def test_different_seed_different_run(gm):
    a, b = _net(0), _net(1)
    df_a = train(a, gm, steps=10, batch_size=32, seed=0, device="cpu")
    df_b = train(b, gm, steps=10, batch_size=32, seed=1, device="cpu")
    assert not _history(df_a).equals(_history(df_b))
    assert not torch.equal(a.head.weight, b.head.weight)


def test_batch_order_is_paired_across_arms(gm):
    """Two arms (BN and no BN) trained with the same seed see exactly the same batches."""
    seen = {}
    for arm in ("batch", "none"):
        xs = []
        train(_net(5, norm=arm), gm, steps=6, batch_size=16, seed=5, device="cpu",
              callbacks=[lambda info, xs=xs: xs.append((info.x.clone(), info.y.clone()))])
        seen[arm] = xs
    assert len(seen["batch"]) == 6
    for (xa, ya), (xb, yb) in zip(seen["batch"], seen["none"]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # and seeded() pairs the initialisation: same seed, same first-layer weights
    assert torch.equal(_net(5).blocks[0].layer.weight, _net(5).blocks[0].layer.weight)


def test_diverging_run_is_recorded_not_raised(gm):
    net = _net(0, norm="none")
    df = train(net, gm, steps=50, lr=1e6, batch_size=32, device="cpu", eval_every=1)
    assert df["diverged"].all() and len(df) > 0
    step = df.attrs["diverged_step"]
    assert step is not None and 1 <= step <= 50
    assert df["step"].max() <= step
    assert df[["loss", "accuracy"]].notna().all().all()  # no NaN rows
    assert df["loss"].map(math.isfinite).all()


def test_weight_norm_limit_counts_as_divergence(gm):
    df = train(_net(0), gm, steps=10, lr=0.1, batch_size=32, device="cpu", max_weight_norm=1e-3)
    assert df["diverged"].all() and df.attrs["diverged_step"] == 0


def test_epochs_and_steps_validation(gm):
    net = _net(0)
    n = len(gm.train)
    df = train(net, gm, epochs=1, batch_size=64, device="cpu")
    assert df.attrs["steps"] == n // 64
    assert train(net, gm, epochs=0.5, batch_size=64, device="cpu").attrs["steps"] == math.ceil(0.5 * (n // 64))
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        train(net, gm, device="cpu")
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        train(net, gm, steps=5, epochs=1, device="cpu")
    with pytest.raises(ValueError, match="steps must be"):
        train(net, gm, steps=0, device="cpu")
    with pytest.raises(ValueError, match="steps must be"):
        train(net, gm, epochs=0, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        train(net, gm, steps=5, batch_size=1, device="cpu")
    with pytest.raises(ValueError, match="split"):
        train(net, gm, steps=5, eval_splits=("holdout",), device="cpu")
    with pytest.raises(ValueError, match="learning rate"):
        train(net, gm, steps=5, lr=-1, device="cpu")


def test_full_batch_training_accuracy_is_a_fraction(gm):
    small = gm.subset(60)
    df = train(_net(0), small, steps=4, batch_size=1000, device="cpu", eval_every=2)
    acc = df[df["split"] == "batch"]["accuracy"]
    assert ((acc >= 0) & (acc <= 1)).all()
    # the batch accuracy is the training accuracy (train mode, whole set) before each step
    assert len(acc) == 2


def test_regression_training():
    reg = datasets.load("deep_linear", n=400, dim=4)
    net = seeded(0, lambda: models.mlp(4, 4, depth=2, width=16, norm="batch"))
    df = train(net, reg, steps=30, lr=0.05, batch_size=32, device="cpu")
    val = df[df["split"] == "val"]
    assert val["accuracy"].isna().all() and val["loss"].iloc[-1] < val["loss"].iloc[0]


def test_optimizers_and_callbacks(gm):
    infos = []
    train(_net(0), gm, steps=3, batch_size=16, optimizer="adam", lr=1e-3, device="cpu",
          callbacks=[infos.append])
    assert [i.step for i in infos] == [1, 2, 3] and isinstance(infos[0], StepInfo)
    assert infos[0].x.shape == (16, 8) and isinstance(infos[0].optimizer, torch.optim.Adam)
    made = []

    def factory(params):
        made.append(torch.optim.SGD(params, lr=0.01, momentum=0.9))
        return made[-1]

    train(_net(0), gm, steps=2, optimizer=factory, device="cpu")
    assert len(made) == 1
    sgd = make_optimizer(nn.Linear(2, 2).parameters(), "sgd", momentum=0.9)
    assert isinstance(sgd, bnlib.optim.SGD) and isinstance(sgd, torch.optim.Optimizer)
    assert sgd.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(nn.Linear(2, 2).parameters(), "rmsprop")


def test_batches_reshuffle_and_drop_the_ragged_batch():
    gen = torch.Generator().manual_seed(0)
    stream = batches(10, 4, gen)
    epoch1 = [next(stream) for _ in range(2)]
    assert all(len(b) == 4 for b in epoch1)
    assert len(set(torch.cat(epoch1).tolist())) == 8  # no repeats within an epoch
    epoch2 = [next(stream) for _ in range(2)]
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch2))
    full = batches(5, 8, gen)
    assert torch.equal(next(full), torch.arange(5))


def test_evaluate_restores_the_mode(gm):
    net = _net(0)
    net.train()
    loss, acc = evaluate(net, gm.val)
    assert net.training and loss > 0 and 0 <= acc <= 1
    net.eval()
    evaluate(net, gm.val)
    assert not net.training


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.cuda
def test_train_on_cuda(gm):
    net = _net(0)
    df = train(net, gm, steps=20, batch_size=32, device="cuda")
    assert next(net.parameters()).is_cuda and not df["diverged"].any()
    assert all(b.is_cuda for b in net.buffers())
    # same seed on the CPU: the same batches, so close (not bit-identical) results
    cpu = train(_net(0), gm, steps=20, batch_size=32, device="cpu")
    val_gpu = df[df["split"] == "val"]["accuracy"].to_numpy()
    val_cpu = cpu[cpu["split"] == "val"]["accuracy"].to_numpy()
    assert abs(val_gpu[-1] - val_cpu[-1]) < 0.05
