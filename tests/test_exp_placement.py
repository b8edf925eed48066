"""Mechanics of chapter 12's placement experiment (tiny configs, a few seconds)."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from bnlib import experiments
from bnlib.experiments.placement import (PlacementConfig, placement_differences, placement_sweep,
                                         saturation, tuned_lrs)

TINY = PlacementConfig(n_train=100, depth=1, width=8, steps=3, lrs=(0.01, 0.1),
                       activations=("relu", "tanh"), seeds=(0, 1, 2), device="cpu")


def test_sweep_is_paired_and_tidy():
    df = placement_sweep(TINY)
    assert list(df.columns) == ["arm", "activation", "lr", "seed", "val_accuracy", "test_accuracy",
                                "diverged"]
    assert len(df) == 2 * 2 * 2 * 3
    assert set(df["arm"]) == {"before", "after"}
    grid = placement_differences(df)
    assert len(grid) == 4 and (grid["n"] == 3).all()
    tuned = placement_differences(df, tuned=True)
    assert len(tuned) == 2 and {"lr_before", "lr_after"} <= set(tuned.columns)


def _fake():
    rows = []
    for seed in range(4):
        for lr in (0.1, 1.0):
            # "before" is best at lr 0.1, "after" at lr 1.0; after − before = +0.01 at lr 1.0
            rows.append(dict(arm="before", activation="relu", lr=lr, seed=seed,
                             val_accuracy=0.9 if lr == 0.1 else 0.8, test_accuracy=0.90 + 0.01 * seed))
            rows.append(dict(arm="after", activation="relu", lr=lr, seed=seed,
                             val_accuracy=0.7 if lr == 0.1 else 0.95,
                             test_accuracy=0.90 + 0.01 * seed + (0.01 if lr == 1.0 else -0.02)))
    return pd.DataFrame(rows)


def test_differences_on_known_numbers():
    df = _fake()
    best = tuned_lrs(df).set_index("arm")["lr"]
    assert best["before"] == 0.1 and best["after"] == 1.0
    grid = placement_differences(df).set_index("lr")
    assert grid.loc[1.0, "mean"] == pytest.approx(0.01) and grid.loc[0.1, "mean"] == pytest.approx(-0.02)
    tuned = placement_differences(df, tuned=True).iloc[0]
    # after at lr 1.0 (0.90+0.01s+0.01) minus before at lr 0.1 (0.90+0.01s)
    assert tuned["mean"] == pytest.approx(0.01) and tuned["lr_after"] == 1.0
    with pytest.raises(ValueError, match="column"):
        placement_differences(df, value="nope")


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="activations"):
        placement_sweep(dataclasses.replace(TINY, activations=("relu", "swish")))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        placement_sweep(dataclasses.replace(TINY, seeds=(0,)))
    with pytest.raises(ValueError, match="architecture"):
        placement_sweep(dataclasses.replace(TINY, architecture="rnn"))
    with pytest.raises(ValueError, match="lrs"):
        placement_sweep(dataclasses.replace(TINY, lrs=(0.0,)))


def test_saturation_probe():
    sat = saturation(TINY, activation="tanh", lr=0.1, seeds=(0,))
    assert len(sat) == 2 * TINY.depth and sat["saturated"].between(0, 1).all()
    assert set(sat["arm"]) == {"before", "after"}
    with pytest.raises(ValueError, match="saturation is defined"):
        saturation(TINY, activation="relu")


def test_registered_with_presets():
    exp = experiments.get("placement")
    assert exp.config is PlacementConfig and exp.chapter == "12_placement"
    assert len(PlacementConfig.quick().seeds) >= 5
    assert PlacementConfig.full().architecture == "cnn"


def test_plot_marks_off_scale_differences():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bnlib.experiments.placement import plot_placement
    df = _fake()
    df.loc[(df["arm"] == "after") & (df["lr"] == 1.0), "test_accuracy"] -= 0.5  # a -49 pp collapse
    ax = plot_placement(df, ax=plt.figure().gca())
    assert ax.get_xlim() == (-8.0, 8.0)
    assert any("pp" in t.get_text() for t in ax.texts)  # the off-scale point is labelled
    plt.close("all")
