"""The one place that decides how many CPU threads bnlib's experiments use.

Float reductions add up in a different order with a different number of threads, and a deep
network amplifies the last bit into a different run: the same arm, seed and learning rate gave
test accuracies up to 0.21 apart with one and with two threads. So the experiments do not take
the machine's default; they run with :func:`threads` intra-op threads, one unless
``$BNLIB_THREADS`` says otherwise, whatever ``OMP_NUM_THREADS`` is.

Why one: the book's runs are small networks where per-operation overhead, not arithmetic, sets
the time (a second thread buys little), the stacked-runs engine gets its speed from fewer and
larger operations rather than from threads, and two test workers each spinning two threads on
two cores run up to ten times slower than one thread each. One thread is fast for a single
notebook and for ``pytest -n 2`` alike, and it makes every reader's numbers equal CI's.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

__all__ = ["threads", "pinned_threads", "pin_process"]

DEFAULT_THREADS = 1


def threads() -> int:
    """Intra-op threads for experiments: ``$BNLIB_THREADS`` or 1."""
    value = os.environ.get("BNLIB_THREADS", "").strip()
    if not value:
        return DEFAULT_THREADS
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"BNLIB_THREADS must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"BNLIB_THREADS must be a positive integer, got {value!r}")
    return n


@contextlib.contextmanager
def pinned_threads(n: int | None = None) -> Iterator[int]:
    """Run the block with ``n`` (default :func:`threads`) intra-op threads, then restore."""
    n = threads() if n is None else n
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def pin_process() -> int:
    """Set the whole process to :func:`threads` threads (a notebook's first cell does this)."""
    n = threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
