"""Mechanics of chapter 16's experiments (tiny configs; the notebook runs the real ones)."""
from __future__ import annotations

import pytest
import torch

from bnlib.config import override
from bnlib.experiments.when_it_hurts import (NonIIDConfig, SmallBatchConfig, final_table,
                                             non_iid_batches, pooled_values, small_batches,
                                             two_sample_normalisation)


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
