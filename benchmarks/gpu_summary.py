"""Short summary of a ``gpu_check.sh`` run: tests, layer roofline, training step, backend sweep.

Reads what the steps left in the output folder (``tests.xml``, ``roofline.json``, ``train.json``,
``sweep.json``; a missing or unreadable file is reported, not fatal), writes ``summary.json`` there
and prints the summary (the script prints it last, so the end of the log carries it).

Run: ``python -m benchmarks.gpu_summary OUT_DIR [--rc tests=0 sweep=124 ...]``.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from benchmarks.harness import write_json
from benchmarks.summarize import summarize

#: the files each step writes into the output folder
FILES = {"tests": "tests.xml", "roofline": "roofline.json", "train": "train.json", "sweep": "sweep.json"}


def junit_counts(path: Path) -> dict[str, Any]:
    """Totals of a pytest junit XML file and the ids of the failed / errored tests."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["failed_ids"] = failed
    return counts


def sweep_digest(payload: dict) -> dict[str, Any]:
    """Cost-model pick vs measured best over the sweep's points, and the points where it was off by > 10%."""
    results = payload["results"]
    misses = [
        {
            "point": r["point"],
            "selected": r["selected"],
            "best": r["best"],
            "selected_vs_best": r["selected_vs_best"],
        }
        for r in results
        if r["selected_vs_best"] > 1.10
    ]
    counts: dict[str, dict[str, int]] = {"selected": {}, "best": {}}
    for r in results:
        for key in counts:
            counts[key][r[key]] = counts[key].get(r[key], 0) + 1
    return {"points": len(results), "within_10pct": len(results) - len(misses), "misses": misses, **counts}


def _load(out: Path, step: str) -> tuple[Any, str | None]:
    path = out / FILES[step]
    if not path.exists():
        return None, f"{path.name} missing"
    try:
        return (junit_counts(path) if step == "tests" else json.loads(path.read_text())), None
    except (ValueError, ET.ParseError) as exc:
        return None, f"{path.name} unreadable: {exc}"


def build(out: Path, rc: dict[str, int]) -> tuple[dict[str, Any], list[str]]:
    """The summary record and its printed lines."""
    summary: dict[str, Any] = {"rc": rc, "problems": []}
    lines = ["== gpu_check summary =="]
    loaded = {}
    for step in FILES:
        loaded[step], problem = _load(out, step)
        if problem:
            summary["problems"].append(problem)
    env = next((v["env"] for k, v in loaded.items() if k != "tests" and v), None)
    if env:
        summary["env"] = env
        lines.append(
            f"device: {env['device']} | torch {env['torch']} | cuda {env.get('cuda')} | triton {env['triton']}"
        )
    lines.append("step exit codes: " + ", ".join(f"{k}={v}" for k, v in rc.items()) + " (124: hit its time limit)")

    tests = loaded["tests"]
    if tests:
        summary["tests"] = tests
        lines.append(
            f"tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped"
        )
        lines += [f"  FAILED {name}" for name in tests["failed_ids"][:10]]

    roof = loaded["roofline"]
    if roof:
        floor = roof["roofline"]["floor_s"]
        cfg = roof["config"]
        summary["roofline"] = {"floor_s": floor, "auto_backend": roof["auto_backend"], "rows": roof["rows"]}
        lines.append(
            f"layer T={cfg['tokens']} d={cfg['dim']} E={cfg['experts']} k={cfg['top_k']} r={cfg['rank']} "
            f"{cfg['dtype']} fwd+bwd: floor {floor * 1e3:.3f} ms, auto -> {roof['auto_backend']}"
        )
        for name, row in roof["rows"].items():
            lines.append(
                f"  {name:<10} {row['median_s'] * 1e3:8.3f} ms  {row['vs_floor']:6.2f}x floor  "
                f"{row['vs_loop']:5.2f}x vs loop  {row['vs_peft']:5.2f} / peft"
            )

    train = loaded["train"]
    if train:
        summary["train"] = {"ratios": train["ratios"], "precision": train["config"]["precision"]}
        for r in train["results"]:
            mem = f", peak {r['peak_mem_mib']:.0f} MiB" if "peak_mem_mib" in r else ""
            lines.append(
                f"train {r['model']} {r['variant']} ({r['batch']}x{r['seq']}, {train['config']['precision']}): "
                f"{r['step_s'] * 1e3:.1f} ms/step{mem}"
            )
        for name, ratios in train["ratios"].items():
            lines.append(f"  {name} MoLE / LoRA: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))

    sweep = loaded["sweep"]
    if sweep:
        digest = sweep_digest(sweep)
        summary["sweep"] = digest
        lines.append(summarize(sweep, short=True))
        lines.append(f"  picked: {digest['selected']}; fastest (loop excluded): {digest['best']}")
        for miss in digest["misses"][:8]:
            p = miss["point"]
            lines.append(
                f"  pick off: E={p['experts']} r={p['rank']} k={p['top_k']} T={p['tokens']} d={p['dim']} "
                f"seq={p.get('sequences') or '-'}: {miss['selected']} vs best {miss['best']} "
                f"({miss['selected_vs_best']:.2f}x)"
            )
    lines += [f"problem: {p}" for p in summary["problems"]]
    return summary, lines


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the output folder of the run")
    p.add_argument("--rc", nargs="*", default=[], help="exit codes of the steps, as step=code")
    args = p.parse_args(argv)
    rc = {}
    for item in args.rc:
        step, sep, code = item.partition("=")
        if not sep or not code.lstrip("-").isdigit():
            raise SystemExit(f"--rc takes step=code pairs, got {item!r}")
        rc[step] = int(code)
    out = Path(args.out)
    summary, lines = build(out, rc)
    write_json(str(out / "summary.json"), summary)
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
