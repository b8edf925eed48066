"""Mechanics of chapter 22's bug museum (bnlib/experiments/museum.py), on a tiny config."""
from __future__ import annotations

import pytest
import torch

from bnlib import experiments
from bnlib.config import override
from bnlib.experiments.museum import EXHIBITS, MuseumConfig, bug_museum, build, fit
from bnlib.train import TrainSpec


@pytest.fixture(scope="module")
def tiny():
    cfg = override(MuseumConfig(), {"train.steps": 6, "finetune_steps": 3, "model.width": 8,
                                    "seeds": (0,), "eval_batches": (2, 64), "device": "cpu"})
    return cfg, bug_museum(cfg)


def test_table_and_findings(tiny):
    cfg, df = tiny
    assert list(df.columns) == ["exhibit", "arm", "seed", "accuracy", "eval_batch", "new_task",
                                "note", "findings"]
    assert set(df["exhibit"]) == set(EXHIBITS)
    bug = df[df["arm"] == "bug"].groupby("exhibit")["findings"].first()
    expect = {"keras_momentum": "[keras-momentum]", "no_running_stats": "[no-running-stats]",
              "params_only_checkpoint": "[stats-never-updated]",
              "one_value_per_channel": "[one-value-per-channel]",
              "frozen_bn_finetune": "[frozen-but-updating]"}
    for exhibit, code in expect.items():
        assert code in bug[exhibit], (exhibit, bug[exhibit])
    assert (df.loc[df["arm"] == "fix", "findings"] == "").all()
    crash = df[(df["exhibit"] == "one_value_per_channel") & (df["arm"] == "bug")].iloc[0]
    assert "Expected more than 1 value per channel when training" in crash["note"]
    assert crash["accuracy"] != crash["accuracy"]  # NaN: it never finished
    nrs = df[df["exhibit"] == "no_running_stats"]
    assert sorted(set(nrs["eval_batch"])) == [2, 64]
    fix = nrs[nrs["arm"] == "fix"]["accuracy"]
    assert fix.nunique() == 1  # running statistics: the test batch size does not matter
    ft = df[df["exhibit"] == "frozen_bn_finetune"].set_index("arm")["accuracy"]
    assert ft["fix"] == ft["pretrained"]  # BN kept in eval mode: the old task is untouched


def test_build_and_fit():
    cfg = override(MuseumConfig(), {"model.width": 8})
    net = build(cfg, 0, momentum=0.5)
    assert all(b.norm.momentum == 0.5 for b in net.blocks)
    x, y = torch.randn(33, 64), torch.randint(0, 10, (33,))
    spec = TrainSpec(steps=5, batch_size=16)
    assert fit(net, x, y, spec, 0) == 5 and not net.training
    with pytest.raises(ValueError, match="more than 1 value"):
        fit(build(cfg, 0), x, y, TrainSpec(steps=3, batch_size=16), 0, drop_last=False)
    frozen = build(cfg, 0)
    before = frozen.blocks[0].norm.running_mean.clone()
    fit(frozen, x, y, spec, 0, bn_eval=True)   # the fine-tuning fix: running statistics stay put
    torch.testing.assert_close(frozen.blocks[0].norm.running_mean, before)


def test_registered_and_unknown_exhibit():
    assert experiments.get("bug_museum").chapter == "22_bug_museum"
    MuseumConfig.full()
    with pytest.raises(ValueError, match="unknown exhibits"):
        bug_museum(override(MuseumConfig(), {"exhibits": ("nope",)}))
