"""Every benchmark the documentation tells users to run as ``python benchmarks/<name>.py`` starts that way:
from the checkout's root, with no ``PYTHONPATH``, ``--help`` exits 0 (the script finds its own package)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *(ROOT / "docs").rglob("*.md")]
PAGES += sorted((ROOT / "benchmarks").glob("*.py"))
SCRIPTS = sorted(
    {name for page in PAGES for name in re.findall(r"python benchmarks/(\w+)\.py", page.read_text(encoding="utf-8"))}
)


def test_the_documentation_names_script_benchmarks():
    assert {"bench_decode", "bench_hub", "demo_hub"} <= set(SCRIPTS), SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_documented_script_runs_from_the_checkout_root(name):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{name}.py", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
