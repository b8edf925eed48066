"""The book's repository URL, for code that needs it (installing bnlib on Colab, links).

The one place the URL is configured is ``_config.yml`` (``repository: url:``), which the book
build reads.  An installed ``bnlib`` has no ``_config.yml`` next to it, so the URL is also
written here; ``tests/test_repo_url.py`` fails when the two (or the chapters' install cell,
the README or binder/) disagree.
"""
from __future__ import annotations

import re
from pathlib import Path

REPOSITORY_URL = "https://github.com/bn-measured/batchnorm-measured"

_CONFIG = Path(__file__).resolve().parents[1] / "_config.yml"


def config_repository_url(config: Path = _CONFIG) -> str | None:
    """``repository: url:`` from the book's ``_config.yml``, or None if there is no such file.

    Read with a regular expression so that importing bnlib does not need PyYAML."""
    try:
        text = config.read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r"^repository:\s*\n(?:[ \t]+.*\n|[ \t]*#.*\n|\s*\n)*?[ \t]+url:\s*['\"]?([^'\"\s#]+)",
                  text, re.MULTILINE)
    return m.group(1) if m else None


def repository_url() -> str:
    """The book's repository, e.g. ``https://github.com/OWNER/NAME`` (no trailing slash):
    from ``_config.yml`` in a checkout of the repository, else the copy in this module."""
    return (config_repository_url() or REPOSITORY_URL).rstrip("/")


def pip_install_target() -> str:
    """What ``pip install`` needs to install bnlib from the repository: ``git+URL``."""
    return "git+" + repository_url()
