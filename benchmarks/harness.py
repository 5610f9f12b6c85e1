"""Timing harness: warm-up, interleaved repeats, median and spread, ratios within one run, JSON.

Candidates are timed round-robin (one repeat of each in turn) so that load from other processes
on a shared machine hits them all alike; compare ratios from one run, not absolute times.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.machine import machine_record
from molex.core import files

__all__ = ["command_line", "environment", "fwd_bwd", "ratio", "time_candidates", "write_json"]


def command_line() -> str:
    """The command that is running, as a user would type it again (``python -m benchmarks.x ...``)."""
    script = sys.argv[0]
    module = os.path.splitext(os.path.relpath(script))[0].replace(os.sep, ".")
    head = f"python -m {module}" if module.startswith("benchmarks.") else f"python {shlex.quote(script)}"
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])


def environment(*, precision: str) -> dict[str, Any]:
    """Machine (:func:`benchmarks.machine.machine_record`), library versions and device, recorded with every
    result; ``precision``: the dtype the benchmark computes in."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        **machine_record(threads=None, precision=precision),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "triton": triton_version,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_candidates(
    candidates: dict[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 5, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Seconds per call of each candidate: ``{name: {median, min, max, spread, repeats}}``.

    ``spread`` is ``(max - min) / median`` over the repeats.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    stats = {}
    for name, values in times.items():
        median = statistics.median(values)
        stats[name] = {
            "median": median,
            "min": min(values),
            "max": max(values),
            "spread": (max(values) - min(values)) / median if median > 0 else 0.0,
            "repeats": len(values),
        }
    return stats


def ratio(stats: dict[str, dict[str, float]], name: str, baseline: str) -> float:
    """``baseline`` median time / ``name`` median time (> 1: ``name`` is faster)."""
    return stats[baseline]["median"] / stats[name]["median"]


def fwd_bwd(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor, params):
    """A closure running forward and backward (gradients of ``x`` and ``params``, none accumulated)."""
    inputs = [x, *params]

    def run():
        out = module(x)
        return torch.autograd.grad(out, inputs, grad)

    return run


def write_json(path: str, payload: dict[str, Any]) -> None:
    """A benchmark's result file, keys in reading order (:func:`molex.core.files.write_json`), with the command
    that wrote it."""
    files.write_json(path, {"command": command_line(), **payload}, sort_keys=False)
