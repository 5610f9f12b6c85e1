"""Plain-text and Markdown tables: per-task accuracy of two results side by side and their change
(:func:`format_table`), and any rows of cells in aligned columns (:func:`format_rows`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_rows", "format_table"]


def format_table(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    tasks: Sequence[str] | None = None,
    digits: int = 1,
    labels: tuple[str, str] = ("before", "after"),
    markdown: bool = False,
) -> str:
    """A per-task accuracy table (percent) of two results and their change, with the overall row last.

    ``before`` / ``after`` are results of :func:`molex.evaluation.generation.evaluate_generation` or
    :func:`molex.evaluation.generation.score_multiple_choice` (``per_task``, ``counts``, ``accuracy``, ``num_examples``;
    missing values show as ``-``); rows follow ``tasks`` (for example ``dm.task_names``), then any other
    task in sorted order. ``labels`` name the two result columns (``molex-fuse`` compares "adapter alone"
    with the fused model); ``markdown=True`` writes a Markdown table instead of aligned plain-text columns.
    """
    found = set(after.get("per_task", {})) | set(before.get("per_task", {}))
    order = list(tasks or [])
    tasks = [t for t in order if t in found] + sorted(found - set(order))
    counts = {**before.get("counts", {}), **after.get("counts", {})}
    total = after.get("num_examples", before.get("num_examples", "-"))

    def pct(result: Mapping[str, Any], task: str | None) -> float:
        value = result.get("accuracy") if task is None else result.get("per_task", {}).get(task)
        return math.nan if value is None else 100.0 * value

    def cells(name: str, n: Any, b: float, a: float) -> list[str]:
        values = [f"{v:.{digits}f}" if not math.isnan(v) else "-" for v in (b, a, a - b)]
        return [name, str(n), *values]

    header = ["task", "n", *labels, "change"]
    rows = [cells(t, counts.get(t, "-"), pct(before, t), pct(after, t)) for t in tasks]
    overall = cells("overall", total, pct(before, None), pct(after, None))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in [*rows, overall]])
    width = max([len("overall"), len("task"), *map(len, tasks)])
    widths = [width, 5, *(max(7, len(label)) for label in labels), 7]

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    lines = [line(header)]
    lines.append("-" * len(lines[0]))
    lines += [line(row) for row in rows]
    lines.append("-" * len(lines[0]))
    lines.append(line(overall))
    return "\n".join(lines)


def format_rows(header: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False) -> str:
    """``rows`` under ``header`` in aligned columns (the first left-aligned, the others right-aligned), or
    a Markdown table with ``markdown=True``. Cells are formatted with ``str``."""
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    if any(len(row) != len(header) for row in cells):
        raise ValueError(f"every row needs {len(header)} cells like the header {list(header)}")
    if markdown:
        rule = "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join([lines[0], rule, *lines[1:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
