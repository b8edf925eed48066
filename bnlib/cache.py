"""The results cache: an experiment's result, keyed by everything that determines it.

A result is a deterministic function of the experiment's name, its resolved config, bnlib's
source code, torch's version and the device type (bnlib runs with a fixed thread count; see
:mod:`bnlib.runtime`). :func:`key` hashes exactly that, so a notebook under nbval, the same
notebook in the book build and ``python -m bnlib run`` share one computation, and any edit to
the library invalidates every entry. Entries live in :func:`folder`: ``<name>-<key>.pkl`` (the DataFrame) and ``.json`` (provenance:
how, where and when it was computed, and how long it took the first time).

A long computation also keeps its finished pieces: while :func:`checkpointing` is active (as it
is whenever :func:`bnlib.experiments.run` computes a result), every finished cell of a run (a
stack of runs trained together, one run, one sweep cell) is saved by :func:`cell` under
``<name>-<key>.partial/``, and a rerun after a kill loads those cells instead of training them
again; the folder goes once the whole result is saved.

Recorded results are the other kind of stored result: a committed CSV with its provenance
under ``recorded/<name>/<scale>/`` in the repository (e.g. a full-scale run made on a GPU),
which the book can show in place of a computation it could not afford (:func:`load_recorded`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import pandas as pd
import torch

from .config import to_dict

__all__ = ["key", "folder", "load", "save", "code_hash", "load_recorded", "recorded_folder",
           "partial_folder", "checkpointing", "cell"]

_PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """A hash of bnlib's own source files (any edit to the library changes it)."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(_PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def folder() -> Path:
    """Where cached results live: ``$BNLIB_CACHE``; else, in a checkout of the book,
    ``_build/bnlib-results`` beside the chapters (so a fresh clone starts empty, and the test
    run and the book build share one computation); else ``~/.cache/bnlib/results``."""
    root = os.environ.get("BNLIB_CACHE")
    if root:
        return Path(root).expanduser()
    checkout = _PACKAGE.parent
    if (checkout / "_toc.yml").exists():
        return checkout / "_build" / "bnlib-results"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlib" / "results"


def key(name: str, cfg: Any, device: str) -> str:
    """The cache key of experiment ``name`` run with ``cfg`` on a ``device`` type."""
    blob = json.dumps({"name": name, "config": to_dict(cfg), "code": code_hash(),
                       "torch": torch.__version__, "device": device},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _paths(name: str, k: str) -> tuple[Path, Path]:
    base = folder() / f"{name}-{k}"
    return base.with_suffix(".pkl"), base.with_suffix(".json")


def load(name: str, k: str) -> tuple[pd.DataFrame, dict] | None:
    """The cached result and its provenance, or ``None``."""
    pkl, meta = _paths(name, k)
    if not (pkl.exists() and meta.exists()):
        return None
    try:
        return pd.read_pickle(pkl), json.loads(meta.read_text())
    except Exception:  # a truncated or foreign file is a cache miss, never an error
        return None


def save(name: str, k: str, df: pd.DataFrame, provenance: dict) -> None:
    """Store a result atomically (a reader never sees half a file)."""
    pkl, meta = _paths(name, k)
    pkl.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{os.getpid()}.tmp"
    frame = df.copy()
    frame.attrs = {}
    frame.to_pickle(pkl.with_suffix(stem))
    pkl.with_suffix(stem).replace(pkl)
    tmp = meta.with_suffix(stem)
    tmp.write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    tmp.replace(meta)


def partial_folder(name: str, k: str) -> Path:
    """Where the finished cells of an unfinished computation of ``name`` wait."""
    return folder() / f"{name}-{k}.partial"


_CHECKPOINT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("bnlib_checkpoint", default=None)
T = TypeVar("T")


@contextlib.contextmanager
def checkpointing(where: str | Path | None, *, remove: bool = False) -> Iterator[None]:
    """Within this block :func:`cell` saves every finished cell under ``where`` and loads
    it on a rerun. With ``remove``, the folder is deleted when the block ends without an
    error (the whole result is then stored elsewhere); after an error it stays, to resume."""
    token = _CHECKPOINT.set(Path(where) if where is not None else None)
    try:
        yield
    finally:
        _CHECKPOINT.reset(token)
    if remove and where is not None:
        shutil.rmtree(where, ignore_errors=True)


def _stable(value: Any) -> Any:
    """A JSON-able stand-in for a cell's description that is the same in every process
    (callables by qualified name, dataclasses by their fields, other objects by ``repr``)."""
    import dataclasses
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"_type": type(value).__name__,
                **{f.name: _stable(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, Mapping):
        return {str(k): _stable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def cell(description: Mapping[str, Any], compute: Callable[[], T]) -> T:
    """``compute()``, saved under the active :func:`checkpointing` folder by a hash of
    ``description`` (everything that determines the cell), and loaded from there when it
    was finished before. Without an active folder, just ``compute()``."""
    where = _CHECKPOINT.get()
    if where is None:
        return compute()
    blob = json.dumps(_stable(description), sort_keys=True)
    path = where / f"cell-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pkl"
    if path.exists():
        try:
            return pd.read_pickle(path)
        except Exception:  # a truncated file (killed mid-write cannot happen, but a foreign one can)
            pass
    value = compute()
    try:  # best effort: a checkpoint that cannot be written never fails the computation
        where.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        pd.to_pickle(value, tmp)
        tmp.replace(path)
    except OSError:
        pass
    return value


def recorded_folder(name: str, scale: str) -> Path:
    """``recorded/<name>/<scale>/`` in the repository that holds bnlib."""
    return _PACKAGE.parent / "recorded" / name / scale


def load_recorded(name: str, scale: str = "full") -> tuple[pd.DataFrame, dict] | None:
    """A committed, recorded result (``result.csv`` + ``provenance.json``), or ``None``.

    The provenance must state the device, the versions, the command and the date: a recorded
    number without them is not allowed in the book.
    """
    base = recorded_folder(name, scale)
    csv, meta = base / "result.csv", base / "provenance.json"
    if not (csv.exists() and meta.exists()):
        return None
    prov = json.loads(meta.read_text())
    missing = [k for k in ("device_name", "torch_version", "bnlib_version", "command", "started")
               if not prov.get(k)]
    if missing:
        raise ValueError(f"recorded result {base} lacks provenance fields: {', '.join(missing)}")
    return pd.read_csv(csv), prov
