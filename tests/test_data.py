"""bnlib.data: fixed stratified splits, preprocessing modes, subsets, the regression task."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlib import data
from bnlib.data import class_sorted_batches, rescaled, shifted
from bnlib.models import mlp
from bnlib.train import train


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _rows(split):
    return {tuple(r) for r in split.x.numpy().round(6).tolist()}


def test_split_sizes_and_types(digits):
    n = len(digits.train) + len(digits.val) + len(digits.test)
    assert n == 1797
    assert abs(len(digits.test) / n - 0.2) < 0.01 and abs(len(digits.val) / n - 0.15) < 0.01
    assert digits.train.x.dtype == torch.float32 and digits.train.y.dtype == torch.long
    assert digits.train.x.shape == (len(digits.train), 64)
    assert digits.input_shape == (1, 8, 8) and digits.num_features == 64
    assert digits.num_classes == 10 and digits.task == "classification"


def test_split_is_stable_across_calls_and_disjoint(digits):
    again = data.load("digits")
    for name in ("train", "val", "test"):
        assert torch.equal(digits.split(name).x, again.split(name).x)
        assert torch.equal(digits.split(name).y, again.split(name).y)
    other = data.load("digits", split_seed=1)
    assert not torch.equal(other.train.y, digits.train.y)
    # the three splits do not share examples (digits has a few duplicate images; allow them)
    tr, va, te = _rows(digits.train), _rows(digits.val), _rows(digits.test)
    assert len(tr & te) <= 3 and len(tr & va) <= 3 and len(va & te) <= 3


def test_split_is_stratified(digits):
    overall = np.bincount(np.concatenate([digits.split(s).y.numpy() for s in ("train", "val", "test")]),
                          minlength=10) / 1797
    for s in ("train", "val", "test"):
        y = digits.split(s).y.numpy()
        frac = np.bincount(y, minlength=10) / len(y)
        assert np.abs(frac - overall).max() < 0.01, s


def test_preprocessing_modes():
    raw = data.load("digits", preprocessing="raw")
    assert raw.train.x.max().item() == 16.0 and raw.train.x.min().item() == 0.0
    scaled = data.load("digits", preprocessing="scaled")
    assert scaled.train.x.max().item() == 1.0 and scaled.train.x.min().item() == 0.0
    torch.testing.assert_close(scaled.train.x * 16, raw.train.x)
    std = data.load("digits", preprocessing="standardized")
    assert std.train.x.mean(0).abs().max().item() < 1e-5
    sd = std.train.x.std(0, unbiased=False)
    varying = raw.train.x.std(0) > 0
    torch.testing.assert_close(sd[varying], torch.ones(int(varying.sum())), atol=1e-4, rtol=0)
    # statistics come from the training split only: val is close to, not exactly, standardized
    assert std.val.x.mean(0).abs().max().item() > 1e-4
    assert raw.preprocessing == "raw" and std.preprocessing == "standardized"


def test_tabular_scaling_uses_training_min_max():
    wine = data.load("wine", preprocessing="scaled")
    assert wine.train.x.min().item() == 0.0 and wine.train.x.max().item() == 1.0
    assert wine.input_shape == (13,) and wine.num_classes == 3


def test_n_train_subset_is_stratified_and_from_train(digits):
    small = data.load("digits", n_train=200)
    assert len(small.train) == 200
    assert torch.equal(small.val.x, digits.val.x) and torch.equal(small.test.y, digits.test.y)
    assert _rows(small.train) <= _rows(digits.train)
    counts = np.bincount(small.train.y.numpy(), minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22
    assert torch.equal(data.load("digits", n_train=200).train.x, small.train.x)  # stable
    assert digits.subset(10_000) is digits  # asking for more than there is: unchanged


def test_regression_task():
    reg = data.load("deep_linear", n=300, dim=5)
    assert reg.task == "regression" and reg.num_classes is None
    assert reg.train.y.dtype == torch.float32 and reg.train.y.shape == (len(reg.train), 5)
    assert len(reg.train) + len(reg.val) + len(reg.test) == 300
    # y = A x exactly (before preprocessing of x): recover A by least squares on the raw data
    raw = data.load("deep_linear", n=300, dim=5, preprocessing="raw", dtype=torch.float64)
    a = torch.linalg.lstsq(raw.train.x, raw.train.y).solution
    torch.testing.assert_close(raw.train.x @ a, raw.train.y)


def test_synthetic_classification_and_images(digits):
    gm = data.load("gaussian_mixture", n=400, dim=6, classes=3)
    assert gm.input_shape == (6,) and gm.num_classes == 3
    assert set(gm.train.y.unique().tolist()) == {0, 1, 2}
    img = digits.images()
    assert img.train.x.shape == (len(digits.train), 1, 8, 8)
    with pytest.raises(ValueError, match="no image shape"):
        gm.images()


def test_device_dtype_and_errors(digits):
    assert digits.to("cpu") is digits
    d64 = data.load("digits", dtype=torch.float64)
    assert d64.train.x.dtype == torch.float64 and d64.train.y.dtype == torch.long
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="preprocessing"):
        data.load("digits", preprocessing="whitened")
    with pytest.raises(ValueError, match="fraction"):
        data.load("digits", val_fraction=0.5, test_fraction=0.6)
    with pytest.raises(ValueError, match="split"):
        digits.split("holdout")
    assert "digits" in repr(digits) and "train=" in repr(digits)


def test_cached_source_is_read_only_but_splits_are_writable():
    d = data.load("digits", preprocessing="raw")
    d.train.x[0, 0] = 123.0  # our own copy
    assert data.load("digits", preprocessing="raw").train.x[0, 0].item() != 123.0


# --- MNIST-1D (generated offline by the mnist1d package, cached on disk) -----------------

@pytest.fixture(scope="module")
def mnist1d():
    return data.load("mnist1d", preprocessing="standardized")


def test_mnist1d_shapes_and_balanced_split(mnist1d):
    assert (len(mnist1d.train), len(mnist1d.val), len(mnist1d.test)) == (3250, 750, 1000)
    assert mnist1d.input_shape == (1, 40) and mnist1d.num_classes == 10
    assert mnist1d.train.x.shape == (3250, 40)
    assert mnist1d.images().train.x.shape == (3250, 1, 40)   # (N, C, L) for a Conv1d
    for s in ("train", "val", "test"):
        counts = np.bincount(mnist1d.split(s).y.numpy(), minlength=10)
        assert counts.max() - counts.min() <= 1, (s, counts)       # 500 per class, stratified


def test_mnist1d_preprocessing_pools_statistics_over_steps(mnist1d):
    x = mnist1d.train.x
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    assert x.std(0).min().item() < 0.95 < 1.05 < x.std(0).max().item()  # not per step
    scaled = data.load("mnist1d")
    assert scaled.train.x.min().item() == 0.0 and scaled.train.x.max().item() == 1.0
    raw = data.load("mnist1d", preprocessing="raw")
    # the package's global standardisation is a positive affine map: our modes undo it
    a = raw.train.x.double()
    torch.testing.assert_close(mnist1d.test.x.double(),
                               (raw.test.x.double() - a.mean()) / a.std(unbiased=False),
                               atol=1e-5, rtol=0)


def test_mnist1d_generation_is_deterministic_cached_and_sized(tmp_path, monkeypatch):
    import random
    monkeypatch.setenv("BNLIB_DATA", str(tmp_path))
    np.random.seed(123)
    random.seed(123)
    before = (np.random.get_state()[1].copy(), random.getstate())
    x1, y1, shape, k, _ = data._mnist1d(n=200)
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    assert x1.shape == (200, 40) and shape == (1, 40) and k == 10
    assert np.bincount(y1).tolist() == [20] * 10
    files = list((tmp_path / "mnist1d").glob("*.npz"))
    assert len(files) == 1 and "n200_seed42" in files[0].name
    files[0].unlink()                      # regenerate from scratch: the same arrays
    x2, y2, *_ = data._mnist1d(n=200)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    x3, *_ = data._mnist1d(n=200)          # read back from the cache file
    assert np.array_equal(x1, x3)
    assert not np.array_equal(data._mnist1d(n=200, data_seed=1)[0], x1)
    small = data.load("mnist1d", n=200)
    assert len(small.train) + len(small.val) + len(small.test) == 200
    with pytest.raises(ValueError, match="n >= 100"):
        data.load("mnist1d", n=50)


def test_mnist1d_linear_model_gets_about_a_third_and_mlp_clearly_more(mnist1d):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits
    x, y = mnist1d.train.x, mnist1d.train.y
    with threadpool_limits(1):  # one BLAS thread: two test workers share two cores
        linear = LogisticRegression(max_iter=300).fit(x.numpy(), y.numpy())
    acc_linear = linear.score(mnist1d.test.x.numpy(), mnist1d.test.y.numpy())
    assert 0.25 < acc_linear < 0.45, acc_linear       # Greydanus (2020): about 32 %
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(mlp.parameters(), lr=2e-2)
    for _ in range(100):                              # full batch
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
    with torch.no_grad():
        acc_mlp = (mlp(mnist1d.test.x).argmax(1) == mnist1d.test.y).float().mean().item()
    assert acc_mlp > acc_linear + 0.12, (acc_linear, acc_mlp)


# --- transforms and samplers: rescaled, shifted, class_sorted_batches ----------------------

def test_rescaled_and_raw_digits():
    ds = data.load("digits")
    r = rescaled(ds, 16.0)
    raw = data.load("digits", preprocessing="raw")
    assert torch.allclose(r.train.x, raw.train.x) and torch.equal(r.test.y, ds.test.y)
    only_test = rescaled(ds, 2.0, splits=("test",))
    assert torch.equal(only_test.train.x, ds.train.x)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError):
            rescaled(ds, bad)


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


def test_class_sorted_sampler_gives_one_or_two_classes_per_batch():
    y = torch.arange(10).repeat_interleave(13)            # 10 classes × 13 examples
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    stream = iter(class_sorted_batches(y)(len(y), 8, torch.Generator().manual_seed(1)))
    per_epoch = len(y) // 8
    seen = torch.cat([next(stream) for _ in range(per_epoch)])
    assert len(set(seen.tolist())) == per_epoch * 8        # an epoch visits distinct examples
    for _ in range(3 * per_epoch):
        b = next(stream)
        assert len(b) == 8 and len(torch.unique(y[b])) <= 2
    with pytest.raises(ValueError):
        class_sorted_batches(torch.randn(5))
    with pytest.raises(ValueError):
        next(iter(class_sorted_batches(y)(len(y) + 1, 8, torch.Generator())))


def test_train_accepts_the_sampler_and_is_reproducible():
    ds = data.load("digits")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = mlp(64, 10, depth=1, width=16, norm="batch")
        runs.append(train(net, ds, steps=5, batch_size=16, seed=0, show_progress=False,
                          sampler=class_sorted_batches(ds.train.y)))
    assert runs[0]["loss"].tolist() == runs[1]["loss"].tolist()
