"""bnlib: batch normalization from scratch, and the experiments of *Batch Normalization, measured*."""
from __future__ import annotations

import os

__version__ = "0.1.0"

SCALES = ("quick", "full")


def scale() -> str:
    """The experiment scale the book runs at: ``$BNLIB_SCALE`` (``quick`` unless set to ``full``)."""
    value = os.environ.get("BNLIB_SCALE", "quick").strip().lower() or "quick"
    if value not in SCALES:
        raise ValueError(f"BNLIB_SCALE must be one of {SCALES}, got {value!r}")
    return value
