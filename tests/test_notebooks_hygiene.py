"""Repository hygiene for the book's notebooks and pages.

Chapter notebooks are committed *stripped*: the book build and nbval execute them, so stored
outputs would only be stale copies (and un-executed cells that carry outputs break nbval).
These tests need no kernel and run in well under a second.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
TOC = ROOT / "_toc.yml"
BIB = ROOT / "references.bib"

NOTEBOOKS = sorted(
    p for p in CHAPTERS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
)
PAGES = sorted(ROOT.glob("*.md")) + sorted(
    p for p in CHAPTERS.rglob("*.md") if ".ipynb_checkpoints" not in p.parts
)

# IPython magics and shell escapes at the start of a line: `%time`, `%%timeit`, `!pip ...`.
# nbval silently swallows a failing magic, while the book build fails on it, and plain-Python
# runners cannot execute them at all.  `% b` (modulo on a continuation line) and `!=` do not match.
MAGIC = re.compile(r"^\s*(%{1,2}|!)[A-Za-z_].*$", re.MULTILINE)
# {cite}`a,b`  {cite:p}`a`  {cite:t}`a`  {cite:ps}`a; b` ...
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
BIBKEY = re.compile(r"^\s*@(\w+)\s*\{\s*([^,\s]+)\s*,", re.MULTILINE)
# {glue}`path::key`, {glue:text}`path::key:fmt`, {glue:md}`...`
GLUE = re.compile(r"\{glue(?::(any|text|md))?\}`([^`]+)`")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _toc_files() -> list[str]:
    """All `file:` entries of _toc.yml (and its root), without suffix, relative to the repo root."""
    toc = yaml.safe_load(TOC.read_text(encoding="utf-8"))
    found = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return [re.sub(r"\.(ipynb|md)$", "", f) for f in found]


def _bib_keys() -> list[str]:
    return [key for kind, key in BIBKEY.findall(BIB.read_text(encoding="utf-8"))
            if kind.lower() not in {"comment", "preamble", "string"}]


def _markdown_sources() -> list[tuple[str, str]]:
    """(where, text) for every page and every markdown cell of every chapter notebook."""
    out = [(_rel(p), p.read_text(encoding="utf-8")) for p in PAGES]
    for nb_path in NOTEBOOKS:
        nb = nbformat.read(nb_path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "markdown":
                out.append((f"{_rel(nb_path)} cell {i}", cell.source))
    return out


def test_there_are_chapter_notebooks():
    assert NOTEBOOKS, "no notebooks found under chapters/"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_rel)
def test_notebook_is_valid_and_stripped(nb_path: Path):
    nb = nbformat.read(nb_path, as_version=4)
    nbformat.validate(nb)  # raises nbformat.ValidationError

    problems = []
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != "python3":
        problems.append(f"kernelspec name is {kernel!r}, expected 'python3'")
    dirty = [
        i for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    if dirty:
        problems.append(
            f"cells {dirty} have outputs or an execution count; "
            "clear them (e.g. `nbstripout chapters/*.ipynb`) before committing"
        )
    assert not problems, f"{_rel(nb_path)}: " + "; ".join(problems)


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_rel)
def test_notebook_has_a_title(nb_path: Path):
    nb = nbformat.read(nb_path, as_version=4)
    first = nb.cells[0] if nb.cells else None
    assert first is not None and first.cell_type == "markdown" and first.source.lstrip().startswith("# "), (
        f"{_rel(nb_path)}: the first cell must be a markdown cell starting with a '# Title' heading"
    )


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_rel)
def test_notebook_uses_no_magics(nb_path: Path):
    nb = nbformat.read(nb_path, as_version=4)
    hits = [
        f"cell {i}: {m.group(0).strip()!r}"
        for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
        for m in MAGIC.finditer(cell.source)
    ]
    assert not hits, f"{_rel(nb_path)} uses IPython magics or shell escapes: {hits}"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_rel)
def test_notebook_is_in_toc(nb_path: Path):
    stem = _rel(nb_path)[: -len(".ipynb")]
    assert stem in _toc_files(), f"{_rel(nb_path)} is not listed in _toc.yml (it would not be built)"


def test_toc_entries_exist():
    missing = [
        f for f in _toc_files()
        if not any((ROOT / f"{f}{ext}").exists() for ext in (".ipynb", ".md"))
    ]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"


def test_bib_keys_are_unique():
    keys = _bib_keys()
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    assert not dupes, f"duplicate keys in references.bib: {dupes}"


def test_every_cited_key_is_in_references_bib():
    known = set(_bib_keys())
    missing = []
    for where, text in _markdown_sources():
        for group in CITE.findall(text):
            for key in re.split(r"[,;]", group):
                key = key.strip()
                if key and key not in known:
                    missing.append(f"{where}: {key}")
    assert not missing, f"cited keys missing from references.bib: {missing}"


def test_cross_document_glue_references_are_well_formed():
    """`{glue:text}` across documents must be `path/to/nb.ipynb::key:fmt`.

    Without the `.ipynb` suffix myst-nb cannot find the document, and {glue:text} splits the
    format spec off at the *last* colon, so `nb.ipynb::key` without `:s` loses its key.
    """
    bad = []
    for where, text in _markdown_sources():
        base = ROOT / where.split(" cell ")[0]
        for role, body in GLUE.findall(text):
            if "::" not in body:
                continue  # same-document glue: checked by the build
            doc, rest = body.split("::", 1)
            if not doc.endswith(".ipynb"):
                bad.append(f"{where}: {body!r} (document path needs the .ipynb suffix)")
            elif not (base.parent / doc).exists():
                bad.append(f"{where}: {body!r} ({doc} does not exist relative to the page)")
            if role == "text" and ":" not in rest:
                bad.append(f"{where}: {body!r} (add a format spec, e.g. '{body}:s')")
    assert not bad, "malformed cross-document glue references:\n" + "\n".join(bad)
