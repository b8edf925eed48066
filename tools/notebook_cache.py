"""The book build reuses the notebooks that the test run executed.

The README's test command executes every chapter under nbval; the book build then needs the
same notebooks executed once more, with their outputs, to render them. Executing them twice
costs CI about seven minutes and proves nothing new, so:

* ``conftest.py`` hands each notebook that nbval ran *completely and without a failure* to
  :func:`store`, which writes it, with the outputs nbval captured, into the Jupyter cache that
  the book build reads (``_build/.jupyter_cache``; ``_config.yml`` sets
  ``execute_notebooks: cache``). The record carries a :func:`stamp`.
* ``tools/book_sphinx.py`` calls :func:`prune` when the build starts: a record whose stamp is
  not today's (bnlib's source, torch, the Python environment, BNLIB_SCALE or BNLIB_THREADS changed, or
  the record was not written here) is removed, so its notebook is executed afresh.

The cache matches a notebook by a hash of its code cells, so an edited chapter is executed
again too. A build without a test run first simply executes every chapter.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "_build" / ".jupyter_cache"      # where Jupyter Book looks (beside _build/html)
# The settings that change what a chapter computes. Not BNLIB_PROGRESS (bars never draw in a
# kernel; tests/conftest.py sets it to 0 for the test run), nor BNLIB_CACHE / BNLIB_DATA
# (where results and data sets are kept, not what they are).
ENV_KEYS = ("BNLIB_SCALE", "BNLIB_THREADS")


def stamp() -> dict[str, Any]:
    """Everything besides a notebook's own code that decides its outputs."""
    from bnlib.cache import (
        code_hash,  # bnlib's source files, hashed (the results cache's key)
    )

    return {
        "bnlib_code": code_hash(),
        "torch": importlib.metadata.version("torch"),
        "python": sys.prefix,
        "env": {k: os.environ.get(k, "") for k in ENV_KEYS},
    }


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One writer at a time (test workers run in parallel; the cache is one SQLite file)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as handle:
        try:
            import fcntl
        except ImportError:          # Windows: no advisory locks; writes are rare and short
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def store(path: Path, nb: Any, outputs: dict[int, list], seconds: float,
          cache: Path = CACHE) -> None:
    """Cache notebook ``nb`` (read from ``path``) with ``outputs[i]`` for its i-th code cell.

    Every code cell must have run: a partly executed notebook is never stored.
    """
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    nb = copy.deepcopy(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    if set(outputs) != set(range(len(code))):
        raise ValueError(f"{path}: outputs for {len(outputs)} of {len(code)} code cells")
    count = 0
    for i, cell in enumerate(code):
        cell.outputs = outputs[i]
        if outputs[i] is not None:
            count += 1
            cell.execution_count = count
            for out in cell.outputs:
                if out.get("output_type") == "execute_result":
                    out["execution_count"] = count
        else:                       # skipped by an nbval tag: not executed
            cell.outputs, cell.execution_count = [], None
    data = {"execution_seconds": seconds, "executed_by": "nbval", "stamp": stamp()}
    with _locked(cache):
        get_cache(str(cache)).cache_notebook_bundle(
            CacheBundleIn(nb, str(Path(path).resolve()), data=data),
            check_validity=False, overwrite=True)


def prune(cache: Path = CACHE) -> tuple[int, int]:
    """Remove the cached notebooks not executed with today's :func:`stamp`.

    Returns ``(kept, removed)``.
    """
    if not (cache / "global.db").exists():
        return 0, 0
    from jupyter_cache import get_cache

    now, kept, removed = stamp(), 0, 0
    with _locked(cache):
        jc = get_cache(str(cache))
        for record in jc.list_cache_records():
            if (record.data or {}).get("stamp") == now:
                kept += 1
            else:
                jc.remove_cache(record.pk)
                removed += 1
    return kept, removed
