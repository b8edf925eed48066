"""The pure checks of tools/check_book.py (no browser): what counts as a problem on a page."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_book", ROOT / "tools" / "check_book.py")
cb = importlib.util.module_from_spec(_spec)
sys.modules["check_book"] = cb
_spec.loader.exec_module(cb)


def test_traceback_found_in_output_and_plain_text():
    assert cb.check_traceback("x\nTraceback (most recent call last):\n  File ...\nValueError: x")
    ipython = ("-" * 75 + "\nValueError                                Traceback (most recent"
               " call last)\nCell In[3], line 1")
    assert len(cb.check_traceback(ipython)) == 1
    assert not cb.check_traceback("We trace back the error to the learning rate.")


@pytest.mark.parametrize("text", [
    " 45%|████▌     | 9/20 [00:01<00:01,  8.50it/s]",
    "epochs:  10%|█         | 1/10",
    "100%|██████████| 3/3 [00:12<00:00,  4.01s/it]",
])
def test_progress_bars(text):
    assert cb.check_progress_bar(["before", "ok\n" + text + "\nafter"])


def test_no_progress_bar_in_plain_numbers():
    assert not cb.check_progress_bar(["accuracy 91.2% | loss 0.31", "speed 12 it/s on average"])


def test_printed_warnings():
    out = cb.check_warning(["/x/y.py:12: UserWarning: The given NumPy array is not writable\n  t()",
                            "FutureWarning: pandas will change", "all good"])
    assert len(out) == 2 and out[0].startswith("/x/y.py:12: UserWarning")
    assert cb.check_warning(["Warning: something"]) == ["Warning: something"]
    assert not cb.check_warning(["no warnings were raised", "warnings: 0"])


@pytest.mark.parametrize("text", [
    "the key number {glue:text}`chapters/04_speed.ipynb::K1_number:s` is",
    "as shown by {cite}`ioffe2015batch`",
    "see {cite:t}`he2016deep`",
    "::: {note}\nhello\n:::",
    "```{code-cell} python",
])
def test_raw_markup(text):
    assert cb.check_raw_markup(text)


def test_rendered_text_is_not_raw_markup():
    assert not cb.check_raw_markup("(Ioffe and Szegedy, 2015) showed that a: b :: c {x} `y`")


def test_figures():
    assert cb.check_figures([{"caption": "Figure 1. a", "image": True, "loaded": True}]) == []
    assert "no image" in cb.check_figures([{"caption": "Figure 2. b", "image": False}])[0]
    assert "did not load" in cb.check_figures([{"caption": "Figure 3.", "image": True,
                                                 "loaded": False}])[0]


def test_verdict_words_take_the_longest_match():
    assert cb.verdict_words("partly true") == ["partly true"]
    assert cb.verdict_words("depends (on the batch size)") == ["depends"]
    assert cb.verdict_words("inference: true; cost: partly true") == ["partly true", "true"]
    assert cb.verdict_words("untrue-ish") == []


ROW = {"ID": "K1", "Claim (paraphrased)": "...", "Verdict": "partly true",
       "Chapter": "4 · Speed", "Key measured number": "1.8× fewer epochs (8 seeds)"}


def test_good_scorecard_row():
    assert cb.check_scorecard_row(ROW) == []
    assert cb.check_scorecard_row({**ROW, "Key measured number": "p = 3e-05; Δ = 0.012"}) == []


@pytest.mark.parametrize("verdict, number, problem", [
    ("", "1.2", "empty verdict"),
    ("probably", "1.2", "no verdict word"),
    ("true", "", "empty key number"),
    ("true", "much faster", "holds no number"),
    ("false", "ratio inf", "not finite"),
    ("false", "nan ± nan", "not finite"),
    ("true", "gap 0.00", "rounded to 0.00"),
    ("true", "Δ = -0.000 (8 seeds)", "rounded to 0.00"),
    ("true", "np.float64(0.93)", "Python repr"),
    ("true", "(0.91, 0.93)", "Python repr"),
])
def test_bad_scorecard_rows(verdict, number, problem):
    problems = cb.check_scorecard_row({**ROW, "Verdict": verdict, "Key measured number": number})
    assert any(problem in p for p in problems), problems
    assert all(p.startswith("K1:") for p in problems)


def test_check_page_collects_every_kind_and_the_scorecard_only_on_the_landing_page():
    data = {"text": "Traceback (most recent call last):", "outputs": ["10%|█ | 1/10"],
            "prose": "{cite}`x`", "unrendered_math": ["\\(x\\)"],
            "figures": [{"caption": "Figure 1.", "image": False}],
            "console": ["JS exception: boom", "HTTP 404: http://127.0.0.1:1/favicon.ico"],
            "scorecard": [{**ROW, "Verdict": "?"}]}
    kinds = {f.kind for f in cb.check_page("p.html", data, landing=True)}
    assert kinds == {"traceback", "progress-bar", "raw-markup", "raw-math", "figure", "console",
                     "scorecard"}
    assert "scorecard" not in {f.kind for f in cb.check_page("p.html", data)}
    assert cb.check_page("q.html", {"scorecard": []}, landing=True)[0].kind == "scorecard"


def test_book_pages_and_landing(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "_static").mkdir()
    for name in ("intro.html", "search.html", "genindex.html", "chapters/01_a.html",
                 "_static/x.html"):
        (tmp_path / name).write_text("<html></html>")
    (tmp_path / "index.html").write_text(
        '<meta http-equiv="Refresh" content="0; url=intro.html" />')
    pages = cb.book_pages(tmp_path)
    assert pages == ["chapters/01_a.html", "intro.html"]
    assert cb.landing_page(tmp_path, pages) == "intro.html"


def test_cli_rejects_a_folder_without_a_book(tmp_path, capsys):
    assert cb.main([str(tmp_path)]) == 2
    assert "no built book" in capsys.readouterr().err
