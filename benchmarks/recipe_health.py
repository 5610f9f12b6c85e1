"""Routing health of candidate default recipes: one ``molex-train`` run each, what a user would see.

    python -m benchmarks.recipe_health --candidate v02="router.options.input_norm=none router.options.load_balance_coef=0.01 router.options.balance_share=slots" \
        --candidate default="" --out benchmarks/results/recipe_health.json
    python -m benchmarks.recipe_health --collect default=/path/to/run_dir ...   # runs made before, by hand
                                       # (with the run's output in stdout.log and overrides in overrides.txt)

Each candidate is the default ``molex-train`` (SmolLM2-135M, built-in tasks, 60 steps, ``precision=auto``)
with its overrides, without the before/after generation (``eval.before=false eval.after=false``: routing and
the validation LM loss do not need it). For each run the result records the routing-health warnings it
logged while training, the end-of-run health on the validation data (dead experts, collapsed layers with
4 or more experts, router entropy; :mod:`molex.evaluation.health_summary`), the validation LM loss, the
precision Lightning trained in, and the machine. One seed per candidate: a screen, not a comparison
(``benchmarks/study.py`` compares recipes over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_record

__all__ = ["collect", "log_facts", "main", "markdown"]

_WARNING = re.compile(r"routing health at step (\d+): (.*)")
_PRECISION = re.compile(r"trainer\.precision=auto: (\S+) on this machine")
_TRAINABLE = re.compile(r"MoLE layers, ([\d,]+) trainable")
SCREEN = ["eval.before=false", "eval.after=false", "trainer.enable_progress_bar=false"]


def log_facts(log: str) -> tuple[str, list[dict[str, Any]]]:
    """``(precision, routing-health warnings)`` from a ``molex-train`` console log: the precision ``auto``
    chose (``"as given"`` when the run set one), and each warning's step and text."""
    precision = _PRECISION.search(log)
    warnings = [{"step": int(m.group(1)), "text": m.group(2)[:300]} for m in _WARNING.finditer(log)]
    return (precision.group(1) if precision else "as given"), warnings


def collect(name: str, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """The result of one finished run in ``run_dir`` (its ``metrics.json`` and ``stdout.log``)."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    log = (run_dir / "stdout.log").read_text(encoding="utf-8", errors="replace")
    precision, warnings = log_facts(log)
    health = (metrics.get("routing") or {}).get("health")
    if health is None and (run_dir / "routing.json").is_file():  # a run made before metrics.json held it
        health = _health_from_routing(run_dir / "routing.json")
    summary = run_dir / "summary.txt"
    counted = _TRAINABLE.search(summary.read_text(encoding="utf-8")) if summary.is_file() else None
    return {
        "name": name,
        "overrides": overrides,
        "trainable_params": int(counted.group(1).replace(",", "")) if counted else None,
        "precision": precision,
        "val_lm_loss": metrics.get("val_lm_loss"),
        "health": health,
        "health_warnings": warnings,
        "wall_seconds": metrics.get("wall_seconds"),
    }


def _health_from_routing(path: Path) -> dict[str, Any]:
    import torch

    from molex.evaluation.analysis import RoutingReport
    from molex.evaluation.health_summary import mixture_health

    layers = json.loads(path.read_text(encoding="utf-8"))["layers"]
    names = list(layers)
    report = RoutingReport(
        layers=names,
        load=[torch.tensor(layers[n]["load"]) for n in names],
        entropy=[float("nan") if layers[n]["entropy"] is None else layers[n]["entropy"] for n in names],
    )
    return mixture_health(report).to_dict()


def _run(name: str, overrides: list[str], root: Path, threads: int) -> dict[str, Any]:
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [
        sys.executable,
        "-m",
        "molex.cli.train",
        *SCREEN,
        *overrides,
        f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    (run_dir / "overrides.txt").write_text("\n".join(overrides) + "\n", encoding="utf-8")
    with open(run_dir / "stdout.log", "w", encoding="utf-8") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: molex-train failed (exit {proc.returncode}); see {run_dir / 'stdout.log'}")
    return collect(name, run_dir, overrides)


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise SystemExit(f"{flag} takes NAME=VALUE, got {value!r}")
        pairs.append((name, rest))
    return pairs


def markdown(report: dict[str, Any]) -> str:
    """One table row per run: warnings while training, end-of-run health on validation, validation loss."""
    lines = [
        "| candidate | overrides | precision | health warnings (steps) | dead / experts | collapsed (E ≥ 4) "
        "| router entropy | val LM loss |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        h = r["health"] or {}
        steps = ", ".join(str(w["step"]) for w in r["health_warnings"])
        entropy = "-" if h.get("router_entropy") is None else f"{h['router_entropy']:.2f}"
        loss = "-" if r["val_lm_loss"] is None else f"{r['val_lm_loss']:.4f}"
        lines.append(
            f"| `{r['name']}` | `{' '.join(r['overrides']) or '(none)'}` | {r['precision']} | "
            f"{len(r['health_warnings'])}{f' ({steps})' if steps else ''} | {h.get('dead_experts', '-')} / "
            f"{h.get('experts', '-')} | {len(h.get('collapsed_layers', []))} | {entropy} | {loss} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe_health", description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", action="append", default=[], help='NAME="override override ..." to run')
    parser.add_argument("--collect", action="append", default=[], help="NAME=RUN_DIR of a run made before")
    parser.add_argument("--out", type=Path, required=True, help="the result JSON (its runs go to <out>.runs/)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each gets cpu_count / jobs threads)")
    args = parser.parse_args(argv)
    threads = max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    root = args.out.with_suffix(".runs")
    todo = [(name, shlex.split(rest)) for name, rest in _pairs(args.candidate, "--candidate")]
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = list(pool.map(lambda item: _run(*item, root, threads), todo))
    for name, run_dir in _pairs(args.collect, "--collect"):
        listed = Path(run_dir) / "overrides.txt"  # one override per line, as the run was started
        overrides = listed.read_text(encoding="utf-8").split() if listed.is_file() else []
        results.append(collect(name, Path(run_dir), overrides))
    report = {
        "command": "python -m benchmarks.recipe_health " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": machine_record(threads=threads, precision="trainer.precision=auto (per run: 'precision')"),
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    for r in results:
        h = r["health"] or {}
        print(
            f"{r['name']}: {len(r['health_warnings'])} health warnings, dead {h.get('dead_experts')}/{h.get('experts')}, "
            f"collapsed {len(h.get('collapsed_layers', []))}, entropy {h.get('router_entropy')}, val {r['val_lm_loss']}"
        )
    return report


if __name__ == "__main__":
    main()
