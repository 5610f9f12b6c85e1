"""Every measured number in the README and the documentation is read from a committed result file.

A *measured number* is one written outside code: a percentage (``63.7%``), a ratio (``1.22x``), a decimal
(``0.341``, ``± 1.1``) or a duration (``3:18``). Integers (counts, sizes, settings) are not checked. A table
row, or a paragraph, that holds measured numbers names its source: a file under ``benchmarks/results/``
(linked, or in backticks). Each of its numbers must be found in one of its sources, at the precision
written: ``63.7%`` is found as ``63.7``, ``0.637`` or ``0.6375``; ``3:18`` as ``"3:18.08"``.
Result files record the command that wrote them and the machine (``benchmarks/machine.py``).

A page may also include a study's report whole (``--8<-- "benchmarks/results/<study>/study.md"``): the
report must then be what ``benchmarks.study_report.markdown`` makes of the ``study.json`` beside it.

Numbers that are not measurements (settings, thresholds, estimates from a formula) are allowed in a
paragraph or table whose first line is ``<!-- not-measured: <reason> -->``.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: what a result file must record about the machine and the code it was measured with
MACHINE_KEYS = {"cpu", "cpu_native_bf16", "threads", "precision", "torch", "commit", "date"}

FENCE = re.compile(r"^```.*?^```\s*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
SOURCE = re.compile(r"(?:benchmarks/results/)?((?:[\w.-]+/)*[\w.-]+\.json)")
# a version (molex 0.2, PEFT 0.21.2, torch 2.13) is not a measurement
VERSION = re.compile(
    r"(?:molex|PEFT|peft|torch|torchao|TRL|bitsandbytes|Python|lm-eval|transformers|v)\s*>?=?\s*\d+(?:\.\d+)+"
)
NUMBER = re.compile(
    r"(?<![\w.])(?P<value>\d+:\d\d(?!\d)|\d+\.\d+(?:[eE][-+]?\d+)?|\d+(?=\s?%|x\b))(?P<unit>\s?%|x\b)?(?![\w.]*\d)"
)


NOT_MEASURED = re.compile(r"^<!--\s*not-measured:\s*\S.*?-->\s*$")


def _units(text: str) -> list[str]:
    """Table rows one by one, other text paragraph by paragraph; blocks marked not-measured left out."""
    text = FENCE.sub("", text)
    units: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").splitlines()
        if lines and NOT_MEASURED.match(lines[0].strip()):
            continue
        if lines and all(line.lstrip().startswith("|") for line in lines):
            units += lines
        else:
            units.append(block)
    return units


def _sources(unit: str) -> list[Path]:
    found = []
    for match in SOURCE.finditer(unit):
        name = match.group(1)
        path = RESULTS / name
        if not path.is_file():  # a bare file name: wherever it is under benchmarks/results
            hits = sorted(RESULTS.rglob(Path(name).name))
            path = hits[0] if len(hits) == 1 else path
        if path.is_file():
            found.append(path)
    return found


def measured_numbers(unit: str) -> list[tuple[str, str]]:
    """``(number, unit)`` pairs of the measured numbers of ``unit``, code and link targets left out."""
    prose = VERSION.sub("", LINK_TARGET.sub("]", CODE_SPAN.sub("", unit)))
    return [(m.group("value"), (m.group("unit") or "").strip()) for m in NUMBER.finditer(prose)]


@cache
def _file_values(path: Path) -> tuple[list[float], str]:
    text = path.read_text(encoding="utf-8")
    values = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)]
    return values, text


def _found(number: str, unit: str, path: Path) -> bool:
    values, text = _file_values(path)
    if ":" in number:  # m:ss, recorded as "m:ss.ss" or as seconds
        minutes, seconds = number.split(":")
        total = int(minutes) * 60 + int(seconds)
        clocks = re.findall(r"\b(\d+):(\d\d(?:\.\d+)?)\b", text)
        return any(round(int(m) * 60 + float(s)) == total for m, s in clocks) or any(round(v) == total for v in values)
    decimals = len(number.split(".")[1]) if "." in number else 0
    target = float(number)
    scales = (1.0, 100.0) if unit == "%" else (1.0, 100.0) if decimals else (1.0,)
    tolerance = 0.5 * 10**-decimals + 1e-9
    return any(math.isfinite(v) and abs(abs(v) * s - target) <= tolerance for v in values for s in scales)


def _checks() -> list[tuple[str, str, list[Path], list[tuple[str, str]]]]:
    out = []
    for page in PAGES:
        for unit in _units(page.read_text(encoding="utf-8")):
            numbers = measured_numbers(unit)
            if numbers:
                out.append((page.relative_to(ROOT).as_posix(), unit, _sources(unit), numbers))
    return out


CHECKS = _checks()


@pytest.mark.parametrize(
    ("page", "unit", "sources", "numbers"), CHECKS, ids=[f"{c[0]}:{i}" for i, c in enumerate(CHECKS)]
)
def test_a_documented_number_is_in_its_result_file(page, unit, sources, numbers):
    excerpt = unit.strip()[:300]
    assert sources, f"{page}: measured numbers {[n for n, _ in numbers]} without a result file:\n{excerpt}"
    missing = [n + u for n, u in numbers if not any(_found(n, u, path) for path in sources)]
    names = [p.relative_to(ROOT).as_posix() for p in sources]
    assert not missing, f"{page}: {missing} not found in {names}:\n{excerpt}"


def test_a_cited_result_file_records_its_machine_and_command():
    cited = {path for _, _, sources, _ in CHECKS for path in sources}
    assert cited
    for path in sorted(cited):
        data = json.loads(path.read_text(encoding="utf-8"))
        machine = data.get("machine") or data.get("environment") or data.get("env") or {}
        missing = MACHINE_KEYS - set(machine)
        assert not missing, f"{path.relative_to(ROOT)} does not record {sorted(missing)}"
        assert data.get("command") or data.get("recorded_by"), f"{path.relative_to(ROOT)} names no command"


def test_the_checker_finds_numbers_and_misses():
    marked = "<!-- not-measured: settings -->\n| a | 0.95 |\n| b | 0.1 |\n\nthen 0.5 measured"
    assert [measured_numbers(u) for u in _units(marked)] == [[("0.5", "")]]
    assert measured_numbers("63.7% and 1.22x, 0.341, 3:18, molex 0.2, 444 experts, `lr=3e-3`") == [
        ("63.7", "%"),
        ("1.22", "x"),
        ("0.341", ""),
        ("3:18", ""),
    ]
    run = RESULTS / "default_run_auto.json"
    assert _found("63.7", "%", run) and _found("0.341", "", run) and _found("3:18", "", run)
    assert not _found("64.1", "%", run) and not _found("0.342", "", run) and not _found("3:19", "", run)


INCLUDED = sorted(
    {
        ROOT / m
        for page in PAGES
        for m in re.findall(
            r'^--8<-- "(benchmarks/results/[\w./-]+/study\.md)"', page.read_text(encoding="utf-8"), re.M
        )
    }
)


@pytest.mark.parametrize("report", INCLUDED, ids=[p.parent.name for p in INCLUDED])
def test_an_included_study_report_is_made_from_its_study_json(report):
    from benchmarks.study_report import markdown

    study = json.loads((report.parent / "study.json").read_text(encoding="utf-8"))
    assert report.read_text(encoding="utf-8") == markdown(study)
    machine = study["environment"]
    assert set(machine) >= MACHINE_KEYS, (
        f"{report.parent.name}/study.json does not record {MACHINE_KEYS - set(machine)}"
    )
