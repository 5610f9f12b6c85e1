"""Running and composing the ``molex-*`` commands in tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from hydra import compose, initialize_config_dir

import molex

__all__ = ["CONF", "ROOT", "SMOKE", "compose_train", "run_cli"]

ROOT = Path(__file__).resolve().parents[2]
CONF = Path(molex.__file__).parent / "conf"
#: overrides of a quick run on the tiny model
SMOKE = ["experiment=smoke", "data.num_per_task=8", "data.eval_per_task=2", "eval.max_new_tokens=4"]


def run_cli(
    module: str,
    *args: str,
    timeout: int = 240,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """``python -m module args...`` from the repository root (or ``cwd``), offline; output captured.

    ``env`` adds variables to the environment (a ``None`` value removes one, e.g. ``HYDRA_FULL_ERROR``).
    """
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_train(tmp_path: Path, *overrides: str):
    """``molex-train``'s config for a quick tiny-model run into ``tmp_path``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*SMOKE, f"run_dir={tmp_path}", *overrides])
