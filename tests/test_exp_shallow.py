"""Mechanics of chapter 14's experiment (bnlib/experiments/shallow.py)."""
from __future__ import annotations

import pandas as pd
import pytest

from bnlib import experiments
from bnlib.config import override
from bnlib.experiments.shallow import ShallowConfig, as_of, choices, reported, rows, shallow_nets

TINY = {"datasets": ("wine",), "logreg_on": ("wine",), "train.steps": 4, "train.eval_every": 2,
        "early_step": 2, "model.width": 8, "seeds": (0, 1), "tuning.seeds": (10,),
        "tuning.allow_edge": True, "tuning.grid": (0.05, 0.2)}


def test_as_of_uses_no_later_information():
    h = pd.DataFrame({"step": [0, 10, 20, 0, 10], "split": "val", "loss": 1.0,
                      "accuracy": [0.1, 0.5, 0.9, 0.1, 0.6], "elapsed": 0.0,
                      "diverged": [False] * 3 + [True] * 2, "lr": [0.1] * 3 + [1.0] * 2})
    at10 = as_of(h, 10)
    assert at10["step"].max() == 10
    assert not at10["diverged"].any()  # the lr=1.0 run diverged after step 10: unknown at 10
    assert as_of(h, 20)[lambda d: d["lr"] == 1.0]["diverged"].all()


def test_shallow_nets_tiny():
    cfg = override(ShallowConfig(), TINY)
    df = shallow_nets(cfg)
    assert set(df["kind"]) == {"tuning", "history"}
    pick = choices(rows(df, "tuning"), cfg)
    assert set(pick["horizon"]) == {2, 4} and len(pick) == 2 * 5
    early = reported(df, cfg, 2)
    assert len(early) == 5 * 2 and {"accuracy_val", "accuracy_test", "lr"} <= set(early.columns)
    assert set(early["seed"]) == {0, 1}
    with pytest.raises(ValueError, match="unknown arms"):
        shallow_nets(override(cfg, {"arms": {"deep": {}}}))
    with pytest.raises(ValueError, match="multiples"):
        shallow_nets(override(cfg, {"early_step": 3}))


def test_registered():
    assert experiments.get("shallow_nets").chapter == "14_shallow"
    ShallowConfig.full()
