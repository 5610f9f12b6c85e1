"""The README's default run, recorded: ``molex-train`` with no arguments, as a user runs it.

    python -m benchmarks.default_run --out benchmarks/results/default_run_auto.json
    python -m benchmarks.default_run --set trainer.precision=32-true --out benchmarks/results/default_run_fp32.json
    python -m benchmarks.default_run --collect RUN_DIR --log LOG [--time TIME] [--set ...] --out ...   # made by hand

Runs the installed ``molex-train`` console script (next to this Python) from a new temporary directory
under ``/usr/bin/time -v`` when it exists, then records the run's ``metrics.json`` (exact match before and
after per task, validation LM loss, routing health on the validation data), the routing-health warnings
and the precision it logged, wall time and peak RSS, and the machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_record
from benchmarks.recipe_health import log_facts

__all__ = ["collect", "main"]

_RUN_DIR = re.compile(r"run directory: (\S+)")


def collect(run_dir: Path, log: str, time_report: str = "") -> dict[str, Any]:
    """The record of a finished run: its ``metrics.json``, what its log says, and ``/usr/bin/time -v``'s report."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    precision, warnings = log_facts(log)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_report)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", time_report)
    return {
        "precision": "as set" if precision == "as given" else precision,
        "before": {k: metrics["before"][k] for k in ("accuracy", "per_task")} if "before" in metrics else None,
        "after": {k: metrics["after"][k] for k in ("accuracy", "per_task")} if "after" in metrics else None,
        "val_lm_loss": metrics.get("val_lm_loss"),
        "routing": metrics.get("routing"),
        "health_warnings": warnings,
        "other_warnings": _distinct_warnings(log),
        "wall_seconds": metrics.get("wall_seconds"),
        "time_wall": wall.group(1) if wall else None,
        "peak_rss_gb": round(int(rss.group(1)) / 1024**2, 2) if rss else None,
    }


_LOG_TIME = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]")


def _distinct_warnings(log: str) -> list[dict[str, Any]]:
    """The log's warnings other than routing health's, each distinct one once with how often it appeared."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if "WARNING" in line and "routing health" not in line:
            text = _LOG_TIME.sub("", line)[:300]
            counts[text] = counts.get(text, 0) + 1
    return [{"text": text, "count": count} for text, count in counts.items()]


def _run(overrides: list[str]) -> tuple[Path, str, str, Path]:
    script = Path(sys.executable).with_name("molex-train")
    if not script.is_file():
        raise SystemExit(f"no molex-train next to {sys.executable}: install molex (pip install -e '.[train]')")
    work = Path(tempfile.mkdtemp(prefix="molex-default-run-"))
    timer = ["/usr/bin/time", "-v"] if shutil.which("/usr/bin/time") else []
    proc = subprocess.run([*timer, str(script), *overrides], cwd=work, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"molex-train failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    found = _RUN_DIR.search(proc.stdout)
    if not found:
        raise SystemExit("molex-train did not print its run directory")
    run_dir = Path(found.group(1))
    run_dir = run_dir if run_dir.is_absolute() else work / run_dir
    # /usr/bin/time writes its report after the program's stderr
    return run_dir, proc.stdout + proc.stderr, proc.stderr, work


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.default_run", description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a molex-train override")
    parser.add_argument("--collect", type=Path, help="the run directory of a run made by hand")
    parser.add_argument("--log", type=Path, help="with --collect: that run's console output")
    parser.add_argument("--time", type=Path, help="with --collect: /usr/bin/time -v's report of it")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.collect is not None:
        if args.log is None:
            parser.error("--collect needs --log (the run's console output)")
        log = args.log.read_text(encoding="utf-8", errors="replace")
        times = args.time.read_text(encoding="utf-8", errors="replace") if args.time else ""
        result = collect(args.collect, log, times)
    else:
        run_dir, log, times, _ = _run(args.set)
        result = collect(run_dir, log, times)
    given = [o.split("=", 1)[1] for o in args.set if o.startswith("trainer.precision=")]
    if result["precision"] == "as set" and given:
        result["precision"] = given[-1]
    report = {
        "command": "molex-train " + " ".join(args.set),
        "recorded_by": "python -m benchmarks.default_run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_record(threads=None, precision=result["precision"]),
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    after = report["after"] or {}
    print(
        f"{report['precision']}: exact match {100 * after.get('accuracy', 0):.1f}%, val LM loss {report['val_lm_loss']}, "
        f"{len(report['health_warnings'])} health warnings, wall {report['time_wall'] or report['wall_seconds']}"
    )
    return report


if __name__ == "__main__":
    main()
