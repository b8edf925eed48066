"""The book build reuses the notebooks the tests executed (tools/notebook_cache.py)."""
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import notebook_cache

jupyter_cache = pytest.importorskip("jupyter_cache")


def _notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter"),
                nbformat.v4.new_code_cell("print('hi')"),
                nbformat.v4.new_code_cell("1 + 1", metadata={"tags": ["nbval-skip"]}),
                nbformat.v4.new_code_cell("2 * 3")]
    return nb


def _outputs() -> dict:
    return {0: [nbformat.v4.new_output("stream", name="stdout", text="hi\n")],
            1: None,  # skipped by its tag
            2: [nbformat.v4.new_output("execute_result", data={"text/plain": "6"})]}


def test_stored_notebook_is_what_the_book_build_finds(tmp_path):
    nb = _notebook()
    notebook_cache.store(tmp_path / "ch.ipynb", nb, _outputs(), 1.5, cache=tmp_path / "cache")
    cache = jupyter_cache.get_cache(str(tmp_path / "cache"))
    record = cache.match_cache_notebook(_notebook())          # matched by its code, as myst-nb does
    assert record.data["execution_seconds"] == 1.5
    _, merged = cache.merge_match_into_notebook(_notebook())
    code = [c for c in merged.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, None, 2]
    assert code[0].outputs[0]["text"] == "hi\n" and code[1].outputs == []
    assert code[2].outputs[0]["execution_count"] == 2
    assert not nb.cells[1].get("outputs")                      # the caller's notebook is untouched


def test_partly_executed_notebook_is_refused(tmp_path):
    outputs = _outputs()
    del outputs[2]
    with pytest.raises(ValueError, match="2 of 3 code cells"):
        notebook_cache.store(tmp_path / "ch.ipynb", _notebook(), outputs, 1.0, cache=tmp_path / "c")


def test_edited_notebook_does_not_match(tmp_path):
    notebook_cache.store(tmp_path / "ch.ipynb", _notebook(), _outputs(), 1.0, cache=tmp_path / "c")
    edited = _notebook()
    edited.cells[3].source = "2 * 4"
    with pytest.raises(KeyError):
        jupyter_cache.get_cache(str(tmp_path / "c")).match_cache_notebook(edited)


def test_prune_keeps_todays_entries_and_drops_the_rest(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    assert notebook_cache.prune(cache) == (0, 0)               # no cache yet: nothing to do
    notebook_cache.store(tmp_path / "ch.ipynb", _notebook(), _outputs(), 1.0, cache=cache)
    assert notebook_cache.prune(cache) == (1, 0)
    monkeypatch.setenv("BNLIB_PROGRESS", "0")                  # bars: not an output setting
    assert notebook_cache.prune(cache) == (1, 0)
    monkeypatch.setenv("BNLIB_SCALE", "full")                  # another scale: stale
    assert notebook_cache.prune(cache) == (0, 1)
    with pytest.raises(KeyError):
        jupyter_cache.get_cache(str(cache)).match_cache_notebook(_notebook())
