"""Helpers for the notebooks: the book's plotting setup and the scorecard glue.

``verdict("K2", "true", "max |bnlib − torch| = 2e-7")`` records a chapter's verdict and
key number so the landing page's scorecard shows what the executed chapter measured
(via myst-nb's ``glue``); outside a book build it just returns the values.
"""
from __future__ import annotations

__all__ = ["setup", "verdict", "glue", "points", "Verdict", "VERDICTS"]

VERDICTS = ("true", "partly true", "contested", "misleading", "false", "depends", "inconclusive")


class Verdict(tuple):
    """``(word, key_number)``, as returned by :func:`verdict`; shows nothing in a notebook
    (the chapter's admonition states the verdict) so no raw tuple lands on the page."""

    def __new__(cls, word: str, key_number: str) -> "Verdict":
        return super().__new__(cls, (word, key_number))

    @property
    def word(self) -> str:
        return self[0]

    @property
    def key_number(self) -> str:
        return self[1]

    def _ipython_display_(self) -> None:
        return None


def setup() -> None:
    """Seaborn theme and inline figures: the first code cell of a chapter.

    Inside a Jupyter kernel, figures must use the inline backend to appear in the
    notebook and in the book; an inherited ``MPLBACKEND=Agg`` (common in CI and on
    headless servers) would silently drop every figure, so it is overridden here.
    """
    import warnings

    from . import plots, runtime
    # tqdm.auto (imported by some packages, e.g. mnist1d) warns in a kernel without
    # ipywidgets; bnlib's own progress bars are off in a kernel anyway
    warnings.filterwarnings("ignore", message="IProgress not found")
    _inline_figures()
    plots.set_theme()
    runtime.pin_process()


def _inline_figures() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or "IPKernelApp" not in shell.config:
        return  # a plain Python process or terminal IPython: leave the backend alone
    import matplotlib
    if "inline" not in matplotlib.get_backend():
        shell.run_line_magic("matplotlib", "inline")


def glue(key: str, value, display: bool = False) -> None:
    """``myst_nb.glue`` when available (the book build), otherwise nothing."""
    try:
        from myst_nb import glue as _glue
    except ImportError:  # running in a plain Jupyter/Colab without myst-nb
        return
    _glue(key, value, display=display)


def _points(v: float) -> str:
    """``v`` (in points) with one decimal, or two significant digits where one decimal
    would print a nonzero value as ``±0.0`` (a CI that ends at −0.03 is not one at 0)."""
    text = f"{v:+.1f}"
    return f"{v:+.2g}" if v != 0 and float(text) == 0 else text


def points(result) -> str:
    """A paired difference of accuracies in percentage points with its 95% CI, for the prose:
    ``"+1.2 points (95% CI +0.3 to +2.1; better)"`` for a :class:`bnlib.analysis.Comparison`
    (its verdict word last), without the word for a :class:`bnlib.analysis.Diff`."""
    d = getattr(result, "diff", result)
    text = (f"{_points(100 * d.mean)} points (95% CI {_points(100 * d.ci_low)} to "
            f"{_points(100 * d.ci_high)}")
    word = getattr(result, "verdict", None)
    return text + (f"; {word})" if word else ")")


def verdict(claim: str, word: str, key_number: str) -> Verdict:
    """Record the verdict on ``claim`` (e.g. ``"K2"``) for the scorecard.

    ``word`` is one of the book's verdict words (``depends`` may be followed by what it
    depends on, e.g. ``"depends (on the init)"``); ``key_number`` is the short measured
    result shown next to it, formatted from numbers the notebook just computed.
    """
    if not any(word == v or word.startswith(v + " ") for v in VERDICTS):
        raise ValueError(f"verdict must start with one of {VERDICTS}, got {word!r}")
    _check_number(claim, key_number)
    glue(f"{claim}_verdict", word)
    glue(f"{claim}_number", key_number)
    return Verdict(word, key_number)


def _check_number(claim: str, key_number: str) -> None:
    """A key number on the scorecard must be a finite measurement: no ``inf``, ``nan`` or a
    ratio printed as ``0.00x`` (what a run that never arrived used to become)."""
    import re
    text = f" {key_number} ".lower()
    if re.search(r"(?<![a-z])(inf|nan)[x×]?(?![a-z])", text) or re.search(r"(?<![\d.])0\.0+x", text):
        raise ValueError(f"{claim}: key number {key_number!r} is not a finite measurement")
    if not re.search(r"\d", key_number):
        raise ValueError(f"{claim}: key number {key_number!r} holds no number")
