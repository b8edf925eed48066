"""Mechanics of chapter 16's experiments (tiny configs; the notebook runs the real ones)."""
from __future__ import annotations

import pytest
import torch

from bnlib import data as datasets
from bnlib.config import override
from bnlib.experiments.when_it_hurts import (NonIIDConfig, SmallBatchConfig, class_sorted_batches,
                                             final_table, non_iid_batches, pooled_values,
                                             small_batches, two_sample_normalisation)
from bnlib.models import mlp
from bnlib.train import train


def test_two_examples_normalise_to_plus_minus_one():
    z = two_sample_normalisation(8, seed=3)
    assert torch.allclose(z[0], -z[1]) and (z.abs() > 0.99).all()   # ±1 up to ε
    z = two_sample_normalisation(8, seed=3, eps=1e-12)
    assert torch.allclose(z.abs(), torch.ones_like(z), atol=1e-5)
    with pytest.raises(ValueError):
        two_sample_normalisation(8, eps=0.0)


def test_pooled_values():
    assert pooled_values(2) == 2
    assert pooled_values(2, conv=True, height=8, width=8) == 128
    with pytest.raises(ValueError):
        pooled_values(0)


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
    ds = datasets.load("digits")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = mlp(64, 10, depth=1, width=16, norm="batch")
        runs.append(train(net, ds, steps=5, batch_size=16, seed=0, show_progress=False,
                          sampler=class_sorted_batches(ds.train.y)))
    assert runs[0]["loss"].tolist() == runs[1]["loss"].tolist()


def test_small_batches_tiny():
    cfg = override(SmallBatchConfig(), {"seeds": (0, 1), "train.steps": 4, "model.width": 8,
                                        "tuning.seeds": (1000,), "tuning.allow_edge": True,
                                        "batch_sizes": (2, 16)})
    df = small_batches(cfg)
    f = df[df["kind"] == "final"]
    assert set(f["eval"]) == {"running", "precise", "batch stats"}
    assert set(f[f["arm"] == "LN"]["eval"]) == {"running"}      # extra evaluations for BN only
    ch = df[df["kind"] == "choice"]
    assert len(ch) == 4 and set(ch["batch_size"]) == {2, 16}
    assert final_table(df).shape == (2, 4)
    with pytest.raises(ValueError):
        small_batches(override(cfg, {"batch_sizes": (1,)}))


def test_non_iid_tiny():
    cfg = override(NonIIDConfig(), {"seeds": (0,), "train.steps": 4, "model.width": 8,
                                    "tuning.seeds": (1000,), "tuning.allow_edge": True})
    df = non_iid_batches(cfg)
    f = df[df["kind"] == "final"]
    assert set(f["sampler"]) == {"shuffled", "class-sorted"}
    assert "batch stats, class-sorted" in set(f["eval"])
    assert final_table(df).shape == (1, 4)
