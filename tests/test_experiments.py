"""The experiment protocol: registry, presets, paired sweeps, checkpoints, LR tuning, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

import bnlib
from bnlib import cache
from bnlib import experiments as ex
from bnlib.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


# --- a tiny experiment, registered at import like the chapters' ones ------------------------

@dataclass(frozen=True)
class DummyConfig(ex.Config):
    seeds: tuple[int, ...] = (0, 1)
    scale_factor: float = 1.0

    @classmethod
    def full(cls) -> "DummyConfig":
        return cls(seeds=(0, 1, 2, 3), scale_factor=10.0)


CALLS: list[tuple] = []


def _dummy_cell(*, seed: int, factor: float, scale_factor: float, device: str) -> pd.DataFrame:
    CALLS.append((seed, factor))
    return pd.DataFrame({"step": [0, 1], "value": [seed * factor * scale_factor] * 2,
                         "device": [device] * 2})


def _plot_dummy(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    ax = plt.gca()
    ax.plot(df["step"], df["value"])
    return ax


@ex.register("test_cli_dummy", DummyConfig, title="A tiny test experiment", chapter="00_tests",
             plot=_plot_dummy)
def dummy_experiment(cfg: DummyConfig) -> pd.DataFrame:
    return ex.sweep(_dummy_cell, seeds=cfg.seeds, arms={"a": {"factor": 1.0}, "b": {"factor": 2.0}},
                    common={"scale_factor": cfg.scale_factor, "device": cfg.device})


# --- registry and presets -------------------------------------------------------------------

def test_registry_finds_experiment_modules(tmp_path, monkeypatch):
    """A new module in bnlib/experiments/ is found with no edit anywhere else."""
    (tmp_path / "zz_test_plugin.py").write_text(
        "from dataclasses import dataclass\n"
        "import pandas as pd\n"
        "from bnlib.experiments import Config, register\n"
        "@register('zz_plugin_experiment', Config, title='plugin')\n"
        "def plugin(cfg):\n"
        "    return pd.DataFrame({'seed': list(cfg.seeds)})\n")
    (tmp_path / "_zz_private.py").write_text("raise RuntimeError('private modules are not imported')\n")
    monkeypatch.setattr(ex, "__path__", [*ex.__path__, str(tmp_path)])
    try:
        names = ex.names()
        assert "zz_plugin_experiment" in names and "test_cli_dummy" in names
        assert names == sorted(names)
        assert "bnlib.experiments.zz_test_plugin" in sys.modules
        assert list(ex.run("zz_plugin_experiment", seeds=(4, 5))["seed"]) == [4, 5]
    finally:
        ex._REGISTRY.pop("zz_plugin_experiment", None)
        sys.modules.pop("bnlib.experiments.zz_test_plugin", None)


def test_every_registered_experiment_is_well_formed():
    for name in ex.names():
        exp = ex.get(name)
        assert exp.name == name and callable(exp.fn) and issubclass(exp.config, ex.Config)
        assert exp.title


def test_get_unknown_lists_the_names():
    with pytest.raises(KeyError, match="available: .*test_cli_dummy"):
        ex.get("no_such_experiment")


def test_register_validation():
    with pytest.raises(TypeError, match="subclass of bnlib.experiments.Config"):
        ex.register("bad", dict)

    def other(cfg):
        return pd.DataFrame()

    other.__module__ = "somewhere.else"
    with pytest.raises(ValueError, match="registered twice"):
        ex.register("test_cli_dummy", DummyConfig)(other)
    assert ex.get("test_cli_dummy").fn is dummy_experiment


def test_presets_and_bnlib_scale(monkeypatch):
    monkeypatch.delenv("BNLIB_SCALE", raising=False)
    assert bnlib.scale() == "quick"
    assert DummyConfig.preset() == DummyConfig()
    assert DummyConfig.preset("full") == DummyConfig.full()
    assert DummyConfig.preset("quick", seeds=(7,)).seeds == (7,)
    monkeypatch.setenv("BNLIB_SCALE", "full")
    assert bnlib.scale() == "full"
    assert DummyConfig.preset().scale_factor == 10.0
    assert DummyConfig.preset("quick").scale_factor == 1.0  # an explicit scale wins
    monkeypatch.setenv("BNLIB_SCALE", " Quick ")
    assert bnlib.scale() == "quick"
    monkeypatch.setenv("BNLIB_SCALE", "huge")
    with pytest.raises(ValueError, match="BNLIB_SCALE"):
        DummyConfig.preset()
    with pytest.raises(ValueError, match="scale"):
        DummyConfig.preset("medium")
    with pytest.raises(NotImplementedError, match="no full preset"):
        ex.Config.preset("full")


def test_experiment_run_and_config_hash(monkeypatch):
    monkeypatch.setenv("BNLIB_SCALE", "quick")
    CALLS.clear()
    exp = ex.get("test_cli_dummy")
    df = exp.run(seeds=(3,))
    assert set(df["seed"]) == {3} and len(CALLS) == 2
    df = ex.run("test_cli_dummy", "full")
    assert set(df["seed"]) == {0, 1, 2, 3} and (df["value"] == df["seed"] * 10.0 *
                                                 df["arm"].map({"a": 1.0, "b": 2.0})).all()
    h = ex.config_hash(DummyConfig())
    assert h == ex.config_hash(DummyConfig()) and len(h) == 12
    assert h != ex.config_hash(DummyConfig(seeds=(0,)))


# --- sweeps ---------------------------------------------------------------------------------

def test_sweep_adds_columns_and_pairs_seeds():
    calls = []

    def cell(*, seed, width, lr, data):
        calls.append((seed, width, lr, data))
        return pd.DataFrame({"step": [0, 1], "loss": [1.0, 0.5]})

    df = ex.sweep(cell, seeds=(0, 1), arms={"plain": {"width": 4}, "bn": {"width": 8}},
                  grid={"lr": [0.1, 1.0]}, common={"data": "digits"})
    assert len(calls) == 2 * 2 * 2 and len(df) == 2 * len(calls)
    assert {"arm", "seed", "lr", "step", "loss"} <= set(df.columns)
    # seeds are the outer loop: a cut-short run still holds complete pairs
    assert [c[0] for c in calls] == [0] * 4 + [1] * 4
    # every arm × grid point ran with every seed, all with the same common kwargs
    cells = df.groupby(["arm", "lr"])["seed"].apply(lambda s: sorted(set(s))).tolist()
    assert all(c == [0, 1] for c in cells)
    assert {c[3] for c in calls} == {"digits"}
    assert dict(df.groupby("arm")["arm"].size()) == {"bn": 8, "plain": 8}


def test_sweep_accepts_dicts_and_defaults():
    df = ex.sweep(lambda *, seed: {"score": seed * 2}, seeds=(1, 2))
    assert list(df["score"]) == [2, 4] and list(df["arm"]) == ["default", "default"]
    assert ex.sweep(lambda *, seed: {}, seeds=()).empty


def test_checkpointing_resumes_finished_cells(tmp_path):
    calls = []

    def cell(*, seed, lr):
        calls.append((seed, lr))
        return pd.DataFrame({"acc": [seed + lr]})

    with cache.checkpointing(tmp_path / "cells"):
        first = ex.sweep(cell, seeds=(0, 1), grid={"lr": [0.1, 0.2]})
    assert len(calls) == 4 and len(list((tmp_path / "cells").glob("cell-*.pkl"))) == 4
    with cache.checkpointing(tmp_path / "cells"):
        again = ex.sweep(cell, seeds=(0, 1), grid={"lr": [0.1, 0.2]})
    assert len(calls) == 4  # nothing recomputed
    pd.testing.assert_frame_equal(first, again)
    # an interrupted run: one finished cell lost, one new grid point added
    sorted(tmp_path.glob("cells/cell-*.pkl"))[0].unlink()
    with cache.checkpointing(tmp_path / "cells"):
        more = ex.sweep(cell, seeds=(0, 1), grid={"lr": [0.1, 0.2, 0.3]})
    assert len(calls) == 4 + 1 + 2 and len(more) == 6
    assert not list(tmp_path.glob("cells/*.tmp"))
    # outside the block nothing is cached
    ex.sweep(cell, seeds=(0,), grid={"lr": [0.1]})
    assert len(calls) == 8


# --- choosing the learning rate on the validation split --------------------------------------

def _history(arm, lr, seed, val_acc, test_acc, diverged=False, last_step=10):
    rows = [dict(step=s, split=split, loss=1 - acc, accuracy=acc)
            for s in (0, last_step) for split, acc in (("val", val_acc if s else 0.1),
                                                       ("test", test_acc if s else 0.1))]
    return pd.DataFrame(rows).assign(arm=arm, lr=lr, seed=seed, diverged=diverged)


# --- the command line -----------------------------------------------------------------------

def test_cli_run_writes_csv_png_and_provenance(tmp_path, capsys):
    CALLS.clear()
    argv = ["run", "test_cli_dummy", "--out", str(tmp_path), "--device", "cpu", "--seeds", "0,2"]
    assert main(argv) == 0
    out = tmp_path / "test_cli_dummy"
    files = {p.name for p in out.iterdir()}
    assert {"test_cli_dummy.csv", "test_cli_dummy.png", "provenance.json"} <= files
    df = pd.read_csv(out / "test_cli_dummy.csv")
    assert set(df["seed"]) == {0, 2} and set(df["arm"]) == {"a", "b"} and set(df["device"]) == {"cpu"}
    assert (out / "test_cli_dummy.png").read_bytes()[:4] == b"\x89PNG"
    prov = json.loads((out / "provenance.json").read_text())
    for key in ("device", "device_name", "torch_version", "bnlib_version", "git_commit", "command",
                "seeds", "started", "duration_seconds"):
        assert key in prov, key
    assert prov["device"] == "cpu" and prov["device_name"]
    assert prov["bnlib_version"] == bnlib.__version__ and prov["torch_version"].startswith("2.")
    assert prov["seeds"] == [0, 2] and prov["scale"] == "quick" and prov["experiment"] == "test_cli_dummy"
    assert prov["command"].startswith("python -m bnlib run test_cli_dummy")
    assert "--seeds 0,2" in prov["command"]
    assert prov["duration_seconds"] >= 0 and prov["started"][:2] == "20"
    assert "test_cli_dummy" in capsys.readouterr().out
    n_calls = len(CALLS)
    assert n_calls == 4
    # a second run with the same options loads the finished cells instead of recomputing
    assert main(argv) == 0
    assert len(CALLS) == n_calls
    pd.testing.assert_frame_equal(pd.read_csv(out / "test_cli_dummy.csv"), df)
    # other options -> another config hash -> computed afresh
    assert main(argv[:-1] + ["1"] + ["--no-plot"]) == 0
    assert len(CALLS) == n_calls + 2


def test_cli_list_and_unknown(capsys):
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "test_cli_dummy" in listing and "A tiny test experiment" in listing
    assert main(["run", "no_such_experiment", "--device", "cpu"]) == 2
    assert "no experiment named" in capsys.readouterr().err
    assert main([]) == 2                       # a usage error is an exit status, not an exception
    assert "required" in capsys.readouterr().err


def test_python_m_bnlib_list():
    res = subprocess.run([sys.executable, "-m", "bnlib", "list"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    assert names == sorted(names) and len(names) >= 1
    assert "test_cli_dummy" not in names  # registered by this test module only
