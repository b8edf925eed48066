"""Sphinx extension for the book (loaded through _config.yml ``sphinx: local_extensions``).

1. Author-year bibliography.  The text cites author-year (``bibtex_reference_style:
   author_year``), so the bibliography must be labelled the same way: "[Ioffe and Szegedy,
   2015]", not the alpha style's "[IS15]".  pybtex has no author-year label style, so this
   module registers one (``authoryear``) and a formatting style that uses it; _config.yml
   selects it with ``bibtex_default_style: authoryear``.

2. MathJax without a CDN.  ``python tools/vendor_mathjax.py`` puts MathJax 3 into
   ``_build/vendor/mathjax/``; when it is there, the book serves that copy from
   ``_static/mathjax/`` and never asks a CDN, so formulas render offline.  When it is not,
   the build falls back to Sphinx's default CDN URL and says so (an info line, not a warning,
   so ``-W`` builds still pass).  The copy is added to ``html_static_path`` here, not by
   putting it under ``_static/``: Jupyter Book would load every .js file found in
   ``_static/`` on every page.

3. Notebooks executed by the tests.  The test run stores every chapter nbval executed in the
   Jupyter cache (``conftest.py``); before reading, entries not made with today's bnlib, torch
   and settings are removed (``tools/notebook_cache.py``), so only those chapters execute.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from pybtex.plugin import register_plugin
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle

MATHJAX_DIR = Path("_build") / "vendor"  # relative to the book; all of it is copied into _static/
MATHJAX_ENTRY = "mathjax/tex-mml-chtml.js"       # the same bundle Sphinx loads from the CDN


# ---------------------------------------------------------------------------- bibliography


def _last_names(persons: Iterable[Any]) -> list[str]:
    names = []
    for p in persons:
        last = " ".join(p.prelast_names + p.last_names)
        names.append(re.sub(r"[{}]", "", last))
    return names


def author_year_label(entry: Any) -> str:
    """"Ioffe and Szegedy, 2015", "He et al., 2016", "Ioffe, 2017" (editors or the key if no
    author) — the text a ``{cite:p}`` shows, so the list and the citations agree."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    names = _last_names(persons)
    if not names:
        who = entry.fields.get("key") or entry.fields.get("organization") or entry.key
    elif len(names) == 1:
        who = names[0]
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    else:
        who = f"{names[0]} et al."
    year = entry.fields.get("year", "n.d.")
    return f"{who}, {year}"


class AuthorYearLabelStyle(BaseLabelStyle):
    """Author-year labels; two works with the same label get 2019a, 2019b."""

    def format_labels(self, sorted_entries: Iterable[Any]) -> Iterator[str]:
        entries = list(sorted_entries)
        labels = [author_year_label(e) for e in entries]
        count, seen = Counter(labels), Counter()
        for label in labels:
            if count[label] == 1:
                yield label
            else:
                yield label + "abcdefghijklmnopqrstuvwxyz"[seen[label]]
                seen[label] += 1


class AuthorYearStyle(PlainStyle):
    """pybtex's plain style, sorted by author, year and title, with author-year labels."""

    default_label_style = "authoryear"
    default_sorting_style = "author_year_title"


register_plugin("pybtex.style.labels", "authoryear", AuthorYearLabelStyle)
register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)


# ---------------------------------------------------------------------------- MathJax


def _use_local_mathjax(app: Any, config: Any) -> None:
    from sphinx.util import logging

    log = logging.getLogger(__name__)
    folder = Path(app.srcdir) / MATHJAX_DIR
    if (folder / MATHJAX_ENTRY).is_file():
        config.html_static_path = list(config.html_static_path) + [str(folder)]
        config.mathjax_path = MATHJAX_ENTRY
        log.info("MathJax: served from the book (%s)", folder / MATHJAX_ENTRY)
    else:
        log.info("MathJax: no local copy in %s (run python tools/vendor_mathjax.py);"
                 " the pages load it from a CDN and show raw TeX offline", folder)


# ---------------------------------------------------------------------------- page fixes


def _fix_page(app: Any, pagename: str, templatename: str, context: dict[str, Any],
              doctree: Any) -> None:
    """Two JavaScript errors every page of a Jupyter Book 1.x build shows in the console:

    * sphinx-thebe's inline ``const THEBE_JS_URL = ...`` script is registered twice, and the
      second copy throws "Identifier 'THEBE_JS_URL' has already been declared" (the
      togglebutton's inline script is doubled too): keep the first of identical scripts;
    * the theme reads the light/dark mode from localStorage or else from ``default_mode``,
      which is empty, so a first visit logs "Got invalid theme mode": default to "auto".
    """
    scripts = context.get("script_files")
    if scripts:
        seen, unique = set(), []
        for js in scripts:
            # file name and attributes (an inline script's body is one), not the priority
            key = (str(getattr(js, "filename", js) or ""),  # None and "" both mean inline
                   repr(sorted(getattr(js, "attributes", {}).items())))
            if key not in seen:
                seen.add(key)
                unique.append(js)
        context["script_files"] = unique
    if not context.get("default_mode"):
        context["default_mode"] = "auto"


# ---------------------------------------------------------------------------- executed notebooks


def _prune_notebook_cache(app: Any) -> None:
    """Drop cached notebooks whose outputs today's code might not reproduce (see module doc)."""
    import sys

    from sphinx.util import logging
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import notebook_cache
    finally:
        sys.path.pop(0)
    cache = Path(app.env.mystnb_config.execution_cache_path)
    kept, removed = notebook_cache.prune(cache)
    logging.getLogger(__name__).info("notebooks executed by the tests, reused: %d; stale, removed: %d", kept, removed)


def setup(app: Any) -> dict[str, Any]:
    app.connect("config-inited", _use_local_mathjax)
    app.connect("builder-inited", _prune_notebook_cache, priority=900)
    app.connect("html-page-context", _fix_page, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
