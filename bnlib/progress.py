"""Progress bars that switch themselves off in CI and when ``BNLIB_PROGRESS=0``."""
from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    """Bars are on unless ``BNLIB_PROGRESS=0`` or a ``CI`` variable is set."""
    flag = os.environ.get("BNLIB_PROGRESS")
    if flag is not None:
        return flag.strip().lower() not in ("0", "false", "no", "off", "")
    return not os.environ.get("CI")


def bar(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
        show: bool | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar when bars are enabled (``show`` overrides)."""
    if not (enabled() if show is None else show):
        return iterable
    from tqdm import tqdm  # plain tqdm: tqdm.auto needs ipywidgets
    # delay: runs that finish within two seconds never draw a bar
    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=0.5, delay=2.0)
