"""Shared settings of the unit tests (the repo-root conftest.py holds the nbval helpers).

* One intra-op thread: the tests use small tensors, where thread start-up costs more than
  it saves, and on a busy 2-core machine two threads per test process stall each other
  (and ``pytest -n 2`` already uses both cores). ``BNLIB_TEST_THREADS`` overrides it.
* Progress bars off (``BNLIB_PROGRESS=0``) unless the environment says otherwise.
* ``@pytest.mark.cuda`` tests are skipped when no CUDA GPU is available.
"""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("BNLIB_TEST_THREADS", "1")))
os.environ.setdefault("BNLIB_PROGRESS", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
