"""Choosing a ``*_tuned`` variant's learning rate (or any tuned override) on validation data.

For a variant with ``tune = (key, values)`` the study trains seed 0 once per value, without the test
evaluation (``eval.after=false``), and keeps the value with the lowest validation LM loss (the last
step's ``val/lm_loss``, over the whole validation split). Every seed of the variant then runs with that
value and is scored on the test split once; seed 0 is not trained again: the chosen value's tuning run is
that seed (:func:`chosen_run_dir`), its adapter scored on the test split by the study. A run that diverges (a non-finite loss) loses; if every
value diverges, the study stops rather than pick one. Results are cached in
``tuning/<variant>/<last part of key>_<value>/result.json`` (``lr_0.003``) like the study's own runs, so an interrupted study resumes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.study_runs import run_all, train_run
from benchmarks.study_variants import VARIANTS
from molex.core.files import write_json

__all__ = ["chosen_run_dir", "tune_variants"]


def _run_dir(out: Path, variant: str, key: str, value: float) -> Path:
    # no "=" in the folder name: it goes into a Hydra override (hydra.run.dir=...)
    return out / "tuning" / variant / f"{key.rsplit('.', 1)[-1]}_{value:g}"


def chosen_run_dir(out: Path, variant: str, choice: dict[str, Any]) -> Path:
    """The tuning run of ``variant`` at its chosen value (``choice``: one entry of :func:`tune_variants`)."""
    return _run_dir(out, variant, choice["key"], choice["chosen"])


def _tuning_run(
    out: Path, variant: str, key: str, value: float, overrides: list[str], timeout: float, threads: int | None
) -> dict[str, Any]:
    run_dir = _run_dir(out, variant, key, value)
    overrides = [*overrides, f"{key}={value:g}", "eval.after=false"]
    path = run_dir / "result.json"
    if path.is_file():
        done = json.loads(path.read_text(encoding="utf-8"))
        if done["overrides"] == overrides:
            return done
        raise SystemExit(f"{run_dir} holds a tuning run made with other settings; use another --out or delete it")
    metrics = train_run(overrides, run_dir, timeout, threads=threads)
    loss = float(metrics["train"].get("val/lm_loss", math.nan))
    result = {
        "variant": variant,
        "key": key,
        "value": value,
        "overrides": overrides,
        "val_lm_loss": round(loss, 5) if math.isfinite(loss) else None,
        "train_seconds": metrics["train"]["seconds"],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, result, sort_keys=False)
    return result


def tune_variants(
    names: list[str],
    seed0_overrides: Callable[[str], list[str]],
    *,
    out: Path,
    jobs: int,
    timeout: float,
    threads: int | None,
) -> dict[str, dict[str, Any]]:
    """``{variant: {"key", "losses": {value: val LM loss or None}, "chosen"}}`` for the tuned ``names``.

    ``seed0_overrides(variant)``: the variant's seed-0 ``molex-train`` overrides before tuning.
    """
    tuned = [n for n in names if VARIANTS[n].tune is not None]
    order = [(n, value) for n in tuned for value in VARIANTS[n].tune[1]]
    index = {f"{n}@{v!r}": (n, v) for n, v in order}

    def run(label: str, _seed: int) -> dict[str, Any]:
        variant, value = index[label]
        key = VARIANTS[variant].tune[0]
        return _tuning_run(out, variant, key, value, seed0_overrides(variant), timeout, threads)

    results = run_all(run, [(label, 0) for label in index], jobs=jobs, describe=_describe) if order else []
    choices: dict[str, dict[str, Any]] = {}
    for variant in tuned:
        key = VARIANTS[variant].tune[0]
        losses = {r["value"]: r["val_lm_loss"] for r in results if r["variant"] == variant}
        finite = {v: loss for v, loss in losses.items() if loss is not None}
        if not finite:
            raise SystemExit(f"{variant}: every {key} in {list(losses)} diverged; widen the grid downwards")
        chosen = min(finite, key=finite.__getitem__)
        choices[variant] = {"key": key, "losses": {f"{v:g}": loss for v, loss in losses.items()}, "chosen": chosen}
        print(f"tuning {variant}: {key}={chosen:g} (validation LM loss {finite[chosen]:.4f}; {losses})", flush=True)
    return choices


def _describe(result: dict[str, Any]) -> str:
    loss = "diverged" if result["val_lm_loss"] is None else f"{result['val_lm_loss']:.4f}"
    return f"tuning {result['variant']} {result['key']}={result['value']:g}: validation LM loss {loss}"
