"""Running the study's training jobs: one ``molex-train`` process per run, several at once.

Each run trains in its own process; the study measures finished runs in its own process, one at a time
(:class:`benchmarks.study.Study` holds a lock around that), so ``jobs`` processes train while at most one
run is being measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import molex

__all__ = ["describe_run", "run_all", "train_run"]


def train_run(overrides: list[str], run_dir: Path, timeout: float, threads: int | None = None) -> dict[str, Any]:
    """One ``molex-train`` process into ``run_dir`` (with ``threads`` CPU threads, unless the environment
    sets ``OMP_NUM_THREADS``); returns its ``metrics.json``."""
    if run_dir.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    # the child imports the same molex this process analyses with (a checkout or an installed package)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(molex.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    )
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    command = [sys.executable, "-m", "molex.cli.train", *overrides, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"]
    with open(run_dir / "stdout.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = (run_dir / "stdout.log").read_text(encoding="utf-8").splitlines()[-15:]
        raise RuntimeError(f"molex-train failed (exit {proc.returncode}) in {run_dir}:\n" + "\n".join(tail))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # adapter/ holds the same weights
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))


def describe_run(result: dict[str, Any]) -> str:
    """One progress line for a finished study run."""
    return (
        f"{result['variant']} seed {result['seed']}: exact match {100 * result['accuracy']:.1f}%, val LM loss "
        f"{result['val_lm_loss']:.3f}, active rank {result['active_rank']:.1f}, {result['trainable_params']:,} "
        f"trainable ({result['seconds']:.0f} s)"
    )


def run_all(
    run: Callable[[str, int], dict[str, Any]],
    order: list[tuple[str, int]],
    *,
    jobs: int,
    describe: Callable[[dict[str, Any]], str] = describe_run,
) -> list[dict[str, Any]]:
    """``run(variant, seed)`` for each pair of ``order``, ``jobs`` at a time, started in that order; prints
    ``describe(result)`` as each finishes and returns the results in ``order``. A failure cancels the runs
    not yet started."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run, variant, seed) for variant, seed in order]
        try:
            for done, future in enumerate(as_completed(futures), 1):
                print(f"[{done}/{len(order)}] {describe(future.result())}", flush=True)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [future.result() for future in futures]
