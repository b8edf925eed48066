"""Stacked runs (bnlib.stacked.fit_many) equal the sequential runs they replace."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bnlib import data as datasets
from bnlib import runtime
from bnlib.models import CNNSpec, MLPSpec
from bnlib.stacked import Member, fit_grid, fit_many, supports
from bnlib.train import TrainSpec, fit, train

SPEC = TrainSpec(steps=30, batch_size=32, eval_every=10, device="cpu")
TOL64 = 1e-9


@pytest.fixture(scope="module")
def digits64():
    return datasets.load("digits", dtype=torch.float64)


@pytest.fixture(scope="module")
def digits32():
    return datasets.load("digits")


def sequential(model: MLPSpec, spec: TrainSpec, data, m: Member):
    """What ``fit`` does for one member, in the data's dtype (fit itself keeps float32)."""
    with runtime.pinned_threads():
        net = model.build(m.seed, data).to(data.train.x.dtype)
        df = train(net, data, steps=spec.steps, batch_size=spec.batch_size,
                   lr=m.lr if m.lr is not None else spec.lr,
                   momentum=m.momentum if m.momentum is not None else spec.momentum,
                   weight_decay=m.weight_decay if m.weight_decay is not None else spec.weight_decay,
                   seed=m.seed, device="cpu", eval_every=spec.eval_every,
                   eval_splits=spec.eval_splits)
    return df, net


def compare(ref, ref_net, df) -> tuple[float, float]:
    """Max |Δ| over history rows (loss, accuracy) and over final parameters and buffers."""
    assert list(ref.columns) == list(df.columns)
    assert ref[["step", "split"]].equals(df[["step", "split"]])
    assert ref.diverged.equals(df.diverged)
    assert ref.attrs["diverged_step"] == df.attrs["diverged_step"]
    rows = float((ref[["loss", "accuracy"]] - df[["loss", "accuracy"]]).abs().max().max())
    a, b = ref_net.state_dict(), df.attrs["model"].state_dict()
    assert a.keys() == b.keys()
    params = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    return rows, params


MODELS = {
    "plain": MLPSpec(depth=3, width=24),
    "bn-before": MLPSpec(depth=3, width=24, norm="batch"),
    "bn-after": MLPSpec(depth=3, width=24, norm="batch", placement="after"),
    "residual-bn-tanh": MLPSpec(depth=3, width=24, norm="batch", residual=True, activation="tanh"),
    "residual-gelu": MLPSpec(depth=3, width=24, residual=True, activation="gelu"),
    # dropout: each member's masks come from its own generator, in fit's order
    "bn-dropout": MLPSpec(depth=3, width=24, norm="batch", dropout=0.3),
    "residual-dropout-head": MLPSpec(depth=3, width=24, residual=True, dropout=0.2,
                                     dropout_at="head"),
    # ghost batch norm: batches of 32 cut into 4 virtual batches of 8 (of 16 after the residual)
    "ghost": MLPSpec(depth=3, width=24, norm="ghost", ghost_size=8),
    "ghost-after-residual": MLPSpec(depth=3, width=24, norm="ghost", ghost_size=16,
                                    placement="after", residual=True),
    "sigmoid-bn-after": MLPSpec(depth=2, width=16, norm="batch", placement="after",
                                activation="sigmoid"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_stacked_equals_sequential_float64(name, digits64):
    model = MODELS[name]
    spec = dataclasses.replace(SPEC, momentum=0.9, weight_decay=1e-3)
    members = [Member(0, lr=0.05), Member(1, lr=0.1), Member(0, lr=0.2)]
    for m, df in zip(members, fit_many(model, spec, digits64, members)):
        ref, net = sequential(model, spec, digits64, m)
        rows, params = compare(ref, net, df)
        assert rows < TOL64 and params < TOL64, (name, m, rows, params)
        assert len(df) == 4 * 3 - 1  # steps 0..30 every 10: val+test, plus batch rows after 0


def test_per_member_momentum_and_weight_decay(digits64):
    model = MODELS["bn-before"]
    members = [Member(3, lr=0.1), Member(4, lr=0.05, momentum=0.9),
               Member(5, lr=0.1, weight_decay=1e-2), Member(6, lr=0.02, momentum=0.5,
                                                              weight_decay=1e-3)]
    for m, df in zip(members, fit_many(model, SPEC, digits64, members)):
        ref, net = sequential(model, SPEC, digits64, m)
        rows, params = compare(ref, net, df)
        assert rows < TOL64 and params < TOL64, (m, rows, params)


@pytest.mark.parametrize("dropout_at", ["blocks", "head"])
def test_per_member_dropout_rate(digits64, dropout_at):
    """A dropout-rate sweep stacks: each member at its own rate (0 included: no mask, no draw)
    equals fit with that rate in the model spec."""
    model = MLPSpec(depth=3, width=24, norm="batch", dropout_at=dropout_at)
    members = [Member(0, lr=0.1, dropout=0.5), Member(0, lr=0.1, dropout=0.0),
               Member(1, lr=0.05, dropout=0.1), Member(2, lr=0.1)]  # None: the spec's (0)
    dfs = fit_many(model, SPEC, digits64, members)
    for m, df in zip(members, dfs):
        ref, net = sequential(dataclasses.replace(model, dropout=m.dropout or 0.0), SPEC, digits64, m)
        rows, params = compare(ref, net, df)
        assert rows < TOL64 and params < TOL64, (m, rows, params)
    # each member's returned network is built with its own rate
    assert {mod.p for mod in dfs[0].attrs["model"].modules() if isinstance(mod, torch.nn.Dropout)} == {0.5}
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
        fit_many(model, SPEC, digits64, [Member(0, dropout=1.0)])


def test_diverging_member_matches_and_leaves_others_alone(digits64):
    model = MODELS["plain"]
    calm = [Member(0, lr=0.05), Member(1, lr=0.1)]
    wild = Member(2, lr=50.0)
    together = fit_many(model, SPEC, digits64, [calm[0], wild, calm[1]])
    alone = fit_many(model, SPEC, digits64, calm)
    ref, net = sequential(model, SPEC, digits64, wild)
    assert ref.attrs["diverged_step"] is not None
    df = together[1]
    assert df.attrs["diverged_step"] == ref.attrs["diverged_step"]
    assert df.diverged.all() and ref[["step", "split"]].equals(df[["step", "split"]])
    for a, b in zip(alone, [together[0], together[2]]):
        assert not b.diverged.any()
        assert float((a[["loss", "accuracy"]] - b[["loss", "accuracy"]]).abs().max().max()) < 1e-12
        sa, sb = a.attrs["model"].state_dict(), b.attrs["model"].state_dict()
        assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-12


def test_weight_norm_divergence(digits64):
    model = MODELS["bn-before"]
    members = [Member(0, lr=0.1), Member(1, lr=0.1)]
    dfs = fit_many(model, SPEC, digits64, members, max_weight_norm=3.0)
    with runtime.pinned_threads():
        net = model.build(0, digits64).double()
        ref = train(net, digits64, steps=SPEC.steps, batch_size=SPEC.batch_size, lr=0.1, seed=0,
                    device="cpu", eval_every=SPEC.eval_every, eval_splits=SPEC.eval_splits,
                    max_weight_norm=3.0)
    assert ref.attrs["diverged_step"] is not None
    assert dfs[0].attrs["diverged_step"] == ref.attrs["diverged_step"]
    assert ref[["step", "split"]].equals(dfs[0][["step", "split"]])


def test_float32_matches_fit_loosely(digits32):
    model = MODELS["bn-before"]
    members = [Member(0, lr=0.1), Member(1, lr=0.05)]
    for m, df in zip(members, fit_many(model, SPEC, digits32, members)):
        ref = fit(model, dataclasses.replace(SPEC, lr=m.lr), digits32, m.seed)
        rows, params = compare(ref, ref.attrs["model"], df)
        assert rows < 1e-4 and params < 1e-4, (m, rows, params)


def test_regression_data():
    data = datasets.load("deep_linear", dtype=torch.float64)
    model = MLPSpec(depth=2, width=16, norm="batch", activation="identity")
    members = [Member(0, lr=0.01), Member(1, lr=0.02)]
    for m, df in zip(members, fit_many(model, SPEC, data, members)):
        ref, net = sequential(model, SPEC, data, m)
        rows, params = compare(ref, net, df)
        assert rows < TOL64 and params < TOL64


def test_elapsed_is_an_amortised_share(digits32):
    dfs = fit_many(MODELS["plain"], SPEC, digits32, [Member(0), Member(1)])
    for df in dfs:
        assert df.elapsed.is_monotonic_increasing and df.elapsed.iloc[-1] > 0
        assert df.attrs["member"].seed in (0, 1)
    assert dfs[0].elapsed.iloc[-1] == pytest.approx(dfs[1].elapsed.iloc[-1])


def test_fit_grid(digits32):
    df = fit_grid(MODELS["plain"], dataclasses.replace(SPEC, steps=10), digits32, [0, 1], [0.1, 0.2])
    assert list(df.columns[:2]) == ["seed", "lr"]
    assert set(zip(df.seed, df.lr)) == {(0, 0.1), (1, 0.1), (0, 0.2), (1, 0.2)}


@pytest.mark.parametrize("model, spec", [
    (CNNSpec(), SPEC),
    (MLPSpec(norm="layer"), SPEC),
    (MLPSpec(norm="group"), SPEC),
    (MLPSpec(norm="ghost", ghost_size=10), SPEC),  # 32 examples: unequal virtual batches
    (MLPSpec(), dataclasses.replace(SPEC, optimizer="adam")),
])
def test_unsupported(model, spec, digits32):
    assert not supports(model, spec)
    with pytest.raises(ValueError, match="fit_many cannot stack"):
        fit_many(model, spec, digits32, [Member(0)])


def test_supported_and_bad_input(digits32):
    assert supports(MLPSpec(norm="batch", placement="after", residual=True), SPEC)
    with pytest.raises(ValueError, match="at least one member"):
        fit_many(MLPSpec(), SPEC, digits32, [])
    with pytest.raises(ValueError, match="learning rate"):
        fit_many(MLPSpec(), SPEC, digits32, [Member(0, lr=-1.0)])


@pytest.mark.cuda
def test_cuda_matches_fit():
    data = datasets.load("digits")
    spec = dataclasses.replace(SPEC, device="cuda")
    model = MODELS["bn-before"]
    members = [Member(0, lr=0.1), Member(1, lr=0.05)]
    for m, df in zip(members, fit_many(model, spec, data, members)):
        ref = fit(model, dataclasses.replace(spec, lr=m.lr), data, m.seed)
        rows, params = compare(ref, ref.attrs["model"], df)
        assert rows < 1e-3 and params < 1e-3, (m, rows, params)
