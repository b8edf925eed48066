"""Provenance: what a recorded result needs to say about how it was made."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from . import __version__

__all__ = ["record", "device_name", "git_commit"]


def device_name(device: torch.device) -> str:
    """A human name for the device: the GPU's model, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return _cpu_model() or platform.processor() or platform.machine() or "cpu"


def _cpu_model() -> str | None:
    """The CPU's model name on Linux (``platform.processor()`` is often empty there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the checkout holding bnlib (with ``-dirty`` when it has changes)."""
    root = path or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def record(*, device: torch.device, started: _dt.datetime, seconds: float, **extra) -> dict:
    """The provenance dictionary written next to every result."""
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "bnlib", *sys.argv[1:]])
        if sys.argv and sys.argv[0].endswith("__main__.py") else " ".join(map(shlex.quote, sys.argv)),
        "started": started.isoformat(timespec="seconds"),
        "duration_seconds": round(seconds, 3),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "bnlib_version": __version__,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "env": {k: os.environ[k] for k in ("BNLIB_SCALE", "OMP_NUM_THREADS") if k in os.environ},
        **extra,
    }
