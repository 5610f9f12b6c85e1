"""What a committed result file records about where it was made: CPU, bf16 support, threads, precision,
torch, commit and date, so that a number can be traced to a machine and a version of the code."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any

import torch

from molex.cli.precision import cpu_has_native_bf16

__all__ = ["cpu_name", "git_commit", "machine_record"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    except OSError:
        return name


def git_commit() -> str | None:
    """The checkout's short commit, with ``+dirty`` when tracked files differ from it (``None`` outside git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here, check=False
    )
    if head.returncode != 0:
        return None
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here, check=False).returncode != 0
    return head.stdout.strip() + ("+dirty" if dirty else "")


def machine_record(*, threads: int | None, precision: str, seconds: float | None = None) -> dict[str, Any]:
    """The record for a result file; ``threads``: CPU threads per run (``None``: torch's default)."""
    record = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "precision": precision,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if seconds is not None:
        record["seconds"] = round(seconds, 1)
    return record
