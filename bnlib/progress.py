"""Progress bars that appear only where a person watches a terminal.

A bar is drawn when standard error is an interactive terminal. Inside a Jupyter kernel (a
notebook, nbval, a book build) or when output goes to a file or a pipe (CI logs), bars are off,
so no built page and no log ever holds progress-bar lines. ``BNLIB_PROGRESS=1`` or ``0`` forces
them on or off.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")

__all__ = ["enabled", "bar"]


def _in_kernel() -> bool:
    return "ipykernel" in sys.modules and type(sys.stderr).__module__.startswith("ipykernel")


def enabled() -> bool:
    """``$BNLIB_PROGRESS`` when set; otherwise on only for an interactive terminal."""
    flag = os.environ.get("BNLIB_PROGRESS")
    if flag is not None and flag.strip():
        return flag.strip().lower() not in ("0", "false", "no", "off")
    if _in_kernel():
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def bar(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
        show: bool | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar when bars are enabled (``show`` overrides)."""
    if not (enabled() if show is None else show):
        return iterable
    from tqdm import tqdm  # plain tqdm: tqdm.auto needs ipywidgets
    # delay: runs that finish within two seconds never draw a bar
    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=0.5, delay=2.0)
