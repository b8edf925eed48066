"""The protocol core: typed overrides, specs and fit, arms × grid × seeds, the results cache,
the thread policy and the command line."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bnlib import cache, experiments, runtime
from bnlib.__main__ import main
from bnlib.config import ConfigError, config_hash, format_config, override, parse_value, to_dict
from bnlib.models import CNNSpec, MLPSpec
from bnlib.protocol import Protocol, arm_config, column, rows, runs, tuned
from bnlib.train import HISTORY_COLUMNS, TrainSpec, fit

TINY = Protocol(data="digits", model=MLPSpec(depth=2, width=16),
                train=TrainSpec(steps=12, eval_every=4, batch_size=32), seeds=(0, 1))


# --- configurator ---------------------------------------------------------------------

@pytest.mark.parametrize("text, tp, expected", [
    ("3", int, 3), ("0.5", float, 0.5), ("1e-3", float, 1e-3), ("true", bool, True),
    ("off", bool, False), ("0,1,2", tuple[int, ...], (0, 1, 2)), ("(0.1, 0.3)", tuple[float, ...], (0.1, 0.3)),
    ("none", float | None, None), ("2", float | None, 2.0), ("relu", str, "relu"),
    ('{"a": 1}', dict[str, int], {"a": 1}),
])
def test_parse_value(text, tp, expected):
    assert parse_value(text, tp) == expected


@pytest.mark.parametrize("text, tp", [("banana", int), ("1.5", int), ("abc", tuple[int, ...]),
                                      ("maybe", bool), ("x", float), ("[1", dict[str, int])])
def test_parse_value_rejects(text, tp):
    with pytest.raises(ConfigError):
        parse_value(text, tp, "key")


def test_override_nested_and_typed():
    cfg = override(TINY, ["model.depth=5", "train.lr=0.3", "seeds=4,5", "data=wine"])
    assert (cfg.model.depth, cfg.train.lr, cfg.seeds, cfg.data) == (5, 0.3, (4, 5), "wine")
    assert cfg.model.width == 16 and TINY.model.depth == 2          # the original is untouched
    assert override(TINY, {"train.steps": 7}).train.steps == 7
    with pytest.raises(ConfigError, match="unknown key 'model.depht'.*did you mean depth"):
        override(TINY, ["model.depht=3"])
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        override(TINY, ["train.steps=1.5"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        override(TINY, ["seeds"])
    with pytest.raises(ConfigError, match="one by one"):
        override(TINY, ["model=cnn"])


def test_config_hash_and_format_follow_the_values():
    assert config_hash(TINY) == config_hash(override(TINY, {"train.lr": TINY.train.lr}))
    assert config_hash(TINY) != config_hash(override(TINY, {"train.lr": 0.2}))
    text = format_config(TINY)
    assert "model.depth = 2" in text and "train.eval_every = 4" in text
    assert json.loads(json.dumps(to_dict(TINY)))["model"]["width"] == 16


# --- specs, fit, runs -------------------------------------------------------------------

def test_fit_is_paired_and_tidy():
    a = fit(MLPSpec(depth=2, width=16), TrainSpec(steps=8, eval_every=4), "digits", seed=3)
    b = fit(MLPSpec(depth=2, width=16), TrainSpec(steps=8, eval_every=4), "digits", seed=3)
    assert list(a.columns) == HISTORY_COLUMNS
    pd.testing.assert_frame_equal(a.drop(columns="elapsed"), b.drop(columns="elapsed"))
    assert set(a["split"]) == {"batch", "val", "test"}


def test_specs_build_the_same_net_for_the_same_seed():
    from bnlib.data import load
    ds = load("digits")
    n1, n2 = MLPSpec(norm="batch").build(5, ds), MLPSpec(norm="batch").build(5, ds)
    for p, q in zip(n1.parameters(), n2.parameters()):
        assert torch.equal(p, q)
    net = CNNSpec(channels=(4, 8), norm="batch").build(0, ds.images())
    assert net(ds.images().train.x[:3]).shape == (3, 10)


def test_cnn_spec_builds_1d_convolutions_for_sequences():
    from bnlib.models import cnn
    net = cnn(1, 10, channels=(4, 8), norm="batch", dims=1)
    assert isinstance(net.blocks[0].layer, torch.nn.Conv1d)
    assert net(torch.randn(5, 1, 40)).shape == (5, 10)


def test_runs_arms_grid_and_seeds_are_paired():
    df = runs(TINY, grid={"train.lr": (0.05, 0.1)})
    assert set(df["kind"]) == {"history"}
    counts = df.groupby(["arm", "lr", "seed"]).size()
    assert len(counts) == 2 * 2 * 2
    # arm configs: the overrides reach the spec
    assert arm_config(TINY, "BN").model.norm == "batch" and arm_config(TINY, "plain").model.norm == "none"
    # one run equals fit with the same seed
    one = fit(MLPSpec(depth=2, width=16, norm="batch"), TrainSpec(steps=12, eval_every=4, batch_size=32,
                                                                     lr=0.1), "digits", seed=1)
    got = df[(df["arm"] == "BN") & (df["lr"] == 0.1) & (df["seed"] == 1)]
    assert got["loss"].to_numpy() == pytest.approx(one["loss"].to_numpy(), rel=1e-4, abs=1e-6)
    assert column("train.lr") == "lr"
    with pytest.raises(KeyError):
        arm_config(TINY, "nope")


def test_runs_stack_a_dropout_grid_like_the_sequential_runs(monkeypatch):
    """A grid over the learning rate and the dropout rate is one stack per arm, and gives what
    the runs one by one give; the grid columns are the same either way."""
    from bnlib import stacked
    calls = []
    real = stacked.fit_many
    monkeypatch.setattr(stacked, "fit_many", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    grid = {"train.lr": (0.05, 0.1), "model.dropout": (0.0, 0.3)}
    together = runs(TINY, grid=grid, arms=["BN"])
    apart = runs(TINY, grid=grid, arms=["BN"], stacked=False)
    assert calls == [2 * 2 * 2]  # one stack: 2 lrs × 2 dropout rates × 2 seeds
    keys = ["lr", "dropout", "seed", "step", "split"]
    assert list(together.columns) == list(apart.columns) and {"lr", "dropout"} <= set(together)
    a, b = (d.sort_values(keys).reset_index(drop=True) for d in (together, apart))
    assert a[keys].equals(b[keys])
    assert a["loss"].to_numpy() == pytest.approx(b["loss"].to_numpy(), rel=1e-4, abs=1e-6)


def test_rows_reads_one_kind():
    df = pd.DataFrame({"kind": ["history", "timing"], "loss": [1.0, None], "seconds": [None, 2.0]})
    assert list(rows(df, "timing").columns) == ["kind", "seconds"]
    with pytest.raises(KeyError, match="kinds: history, timing"):
        rows(df, "nope")


# --- results cache ----------------------------------------------------------------------

def test_run_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_CACHE", str(tmp_path))
    calls = []

    @experiments.register("_tiny_cached", Protocol, title="tiny")
    def _tiny(cfg):
        calls.append(cfg)
        return pd.DataFrame({"x": [len(cfg.seeds)]})

    experiments._MEMO.clear()
    a = experiments.run("_tiny_cached", "quick", seeds=(0, 1))
    experiments._MEMO.clear()
    b = experiments.run("_tiny_cached", "quick", seeds=(0, 1))
    assert len(calls) == 1 and a.equals(b)
    assert a.attrs["provenance"]["duration_seconds"] == b.attrs["provenance"]["duration_seconds"]
    assert a.attrs["config"].seeds == (0, 1)
    experiments.run("_tiny_cached", "quick", seeds=(0, 2))
    assert len(calls) == 2                                   # another config: computed
    k = cache.key("_tiny_cached", calls[0], "cpu")
    assert cache.load("_tiny_cached", k) is not None
    experiments._REGISTRY.pop("_tiny_cached")


def test_cell_keeps_finished_work_and_the_folder_goes_on_success(tmp_path):
    calls = []

    def compute(v):
        calls.append(v)
        return pd.DataFrame({"v": [v]})

    assert cache.cell({"a": 1}, lambda: compute(1))["v"][0] == 1     # no folder: just computed
    where = tmp_path / "partial"
    with pytest.raises(RuntimeError):
        with cache.checkpointing(where, remove=True):
            cache.cell({"a": 1, "spec": TINY}, lambda: compute(1))
            raise RuntimeError("killed")
    assert len(list(where.glob("cell-*.pkl"))) == 1                  # an error keeps the cells
    with cache.checkpointing(where, remove=True):
        again = cache.cell({"a": 1, "spec": TINY}, lambda: compute(99))   # loaded, not computed
        other = cache.cell({"a": 1, "spec": override(TINY, {"seeds": (5,)})}, lambda: compute(2))
    assert again["v"][0] == 1 and other["v"][0] == 2 and calls == [1, 1, 2]
    assert not where.exists()                                        # success: the folder goes


def test_a_killed_run_resumes_from_its_finished_runs(tmp_path, monkeypatch):
    """A run killed after its first arm trains only the second one when started again, and
    gives the same result as an uninterrupted run."""
    from bnlib import stacked
    monkeypatch.setenv("BNLIB_CACHE", str(tmp_path))
    trained_arms, kill = [], [True]
    real = stacked.fit_many

    def counting(model, *a, **kw):
        trained_arms.append(model.norm)
        return real(model, *a, **kw)

    monkeypatch.setattr(stacked, "fit_many", counting)

    @experiments.register("_tiny_resume", Protocol, title="tiny")
    def _tiny(cfg):
        first = runs(cfg, arms=["plain"])
        if kill[0]:
            raise KeyboardInterrupt
        return pd.concat([first, runs(cfg, arms=["BN"])], ignore_index=True)

    experiments._MEMO.clear()
    with pytest.raises(KeyboardInterrupt):
        experiments.run("_tiny_resume", "quick", overrides=to_dict_overrides(TINY))
    kill[0] = False
    resumed = experiments.run("_tiny_resume", "quick", overrides=to_dict_overrides(TINY))
    assert trained_arms == ["none", "batch"]                          # plain was not trained twice
    assert resumed.attrs["provenance"]["resumed_cells"] == 1
    assert not list(tmp_path.glob("*.partial"))
    whole = pd.concat([runs(TINY, arms=["plain"]), runs(TINY, arms=["BN"])], ignore_index=True)
    pd.testing.assert_frame_equal(resumed.drop(columns="elapsed"), whole.drop(columns="elapsed"))
    experiments._REGISTRY.pop("_tiny_resume")


def to_dict_overrides(cfg: Protocol) -> dict:
    return {"data": cfg.data, "model.depth": cfg.model.depth, "model.width": cfg.model.width,
            "train.steps": cfg.train.steps, "train.eval_every": cfg.train.eval_every,
            "train.batch_size": cfg.train.batch_size, "seeds": cfg.seeds}


def test_cache_key_changes_with_config_and_code(monkeypatch):
    k1 = cache.key("x", TINY, "cpu")
    assert k1 == cache.key("x", TINY, "cpu")
    assert k1 != cache.key("x", override(TINY, {"seeds": (9,)}), "cpu")
    assert k1 != cache.key("x", TINY, "cuda")
    monkeypatch.setattr(cache, "code_hash", lambda: "edited")
    assert k1 != cache.key("x", TINY, "cpu")


def test_recorded_results_need_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "recorded_folder", lambda name, scale: tmp_path / name / scale)
    assert cache.load_recorded("speed") is None
    base = tmp_path / "speed" / "full"
    base.mkdir(parents=True)
    pd.DataFrame({"a": [1]}).to_csv(base / "result.csv", index=False)
    (base / "provenance.json").write_text(json.dumps({"device_name": "H200"}))
    with pytest.raises(ValueError, match="lacks provenance"):
        cache.load_recorded("speed")


# --- threads ----------------------------------------------------------------------------

def test_pinned_threads_sets_and_restores(monkeypatch):
    old = torch.get_num_threads()
    with runtime.pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old
    monkeypatch.setenv("BNLIB_THREADS", "2")
    assert runtime.threads() == 2
    monkeypatch.setenv("BNLIB_THREADS", "zero")
    with pytest.raises(ValueError, match="BNLIB_THREADS"):
        runtime.threads()
    monkeypatch.delenv("BNLIB_THREADS")
    assert runtime.threads() == 1


def test_progress_bars_off_when_not_a_terminal(monkeypatch):
    from bnlib import progress
    monkeypatch.delenv("BNLIB_PROGRESS", raising=False)
    assert progress.enabled() is False                      # pytest captures stderr
    monkeypatch.setenv("BNLIB_PROGRESS", "1")
    assert progress.enabled() is True


# --- command line -----------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["run", "nope"], "no experiment named 'nope'"),
    (["run", "depth", "seeds=banana"], "seeds: expected int"),
    (["run", "depth", "--seeds", "abc"], "seeds: expected int"),
    (["run", "depth", "bogus=1"], "unknown key 'bogus'"),
    (["run", "depth", "nokeyvalue"], "not KEY=VALUE"),
    (["show", "depth", "--scale", "huge"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cli_cuda_without_gpu(capsys):
    assert main(["run", "depth", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cli_show_prints_the_resolved_config(capsys):
    assert main(["show", "depth", "seeds=4,5"]) == 0
    out = capsys.readouterr().out
    assert "seeds = (4, 5)" in out
    assert main(["show", "depth", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["_type"]


@pytest.fixture
def tiny_experiment():
    """A registered experiment that trains nothing (the CLI's plumbing, not training, is tested)."""
    import matplotlib.pyplot as plt

    def plot(df):
        fig, ax = plt.subplots()
        ax.plot(df["x"])
        return fig

    @experiments.register("_tiny_cli", Protocol, title="tiny", plot=plot)
    def _tiny(cfg):
        return pd.DataFrame({"x": list(cfg.seeds), "lr": cfg.train.lr})

    yield "_tiny_cli"
    experiments._REGISTRY.pop("_tiny_cli")


def test_cli_run_writes_csv_png_and_provenance(tmp_path, monkeypatch, tiny_experiment):
    monkeypatch.setenv("BNLIB_CACHE", str(tmp_path / "cache"))
    experiments._MEMO.clear()
    argv = ["run", tiny_experiment, "--out", str(tmp_path), "seeds=0,1", "train.lr=0.5"]
    assert main(argv) == 0
    out = tmp_path / tiny_experiment
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["command"] == "python -m bnlib " + " ".join(argv)
    assert prov["config"]["train"]["lr"] == 0.5
    assert {f"{tiny_experiment}.csv", f"{tiny_experiment}.png"} <= {p.name for p in out.iterdir()}
    first = prov["duration_seconds"]
    experiments._MEMO.clear()
    assert main(argv) == 0                                   # served from the cache ...
    prov2 = json.loads((out / "provenance.json").read_text())
    assert prov2["duration_seconds"] == first                # ... with the first run's duration
    df = pd.read_csv(out / f"{tiny_experiment}.csv")
    assert list(df["x"]) == [0, 1] and set(df["lr"]) == {0.5}


def test_tuned_tunes_on_disjoint_seeds_then_reports():
    from bnlib.analysis import GridEdgeError
    cfg = override(TINY, {"tuning.grid": (0.01, 0.1, 10.0), "tuning.seeds": (7, 8), "seeds": (0, 1)})
    df = tuned(cfg)
    tune_rows, report = rows(df, "tuning"), rows(df, "history")
    assert set(tune_rows["seed"]) == {7, 8} and set(report["seed"]) == {0, 1}
    assert set(tune_rows["lr"]) == {0.01, 0.1, 10.0}
    assert report.groupby("arm")["lr"].nunique().eq(1).all()       # one chosen rate per arm
    assert set(report["lr"]) <= {0.1}                               # 0.01 too slow, 10 diverges
    with pytest.raises(GridEdgeError):
        tuned(override(cfg, {"tuning.grid": (0.001, 0.003)}))
    with pytest.raises(ValueError, match="overlap"):
        tuned(override(cfg, {"tuning.seeds": (0, 7)}))


def test_tuning_overrides_reach_the_tuning_runs_only():
    cfg = override(TINY, {"tuning.grid": (0.01, 0.1, 10.0), "tuning.seeds": (7, 8), "seeds": (0, 1),
                          "train.eval_splits": ("val", "test")})
    plain = tuned(cfg)
    quiet = tuned(cfg, tuning_overrides={"train.eval_splits": ("val",)})
    assert set(rows(quiet, "tuning")["split"]) == {"batch", "val"}
    rep, rep0 = rows(quiet, "history"), rows(plain, "history")
    assert set(rep["split"]) == set(rep0["split"]) == {"batch", "val", "test"}  # as configured
    assert rep.groupby("arm")["lr"].first().equals(rep0.groupby("arm")["lr"].first())
