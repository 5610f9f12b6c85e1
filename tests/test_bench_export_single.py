"""benchmarks/bench_export_single.py runs end to end on a tiny random adapter (--quick) and writes its table."""

from __future__ import annotations

import json

import pytest

from tests.helpers.hub import one_thread  # noqa: F401 - fixture

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # loads the data and decodes through two models: about 50 s on a busy 2-core CPU
def test_quick_run_writes_one_row_per_rank(tmp_path, capsys):
    from benchmarks.bench_export_single import main

    result = main(["--quick", "--threads", "1", "--out", str(tmp_path / "out.json")])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [row["rank"] for row in saved["rows"]] == [None, 1, 2]
    assert saved["test_examples"] == 4
    errors = [row["mean_error"] for row in result["rows"][1:]]
    assert 0 <= errors[1] <= errors[0] <= 1  # a higher rank keeps more of the expected update
    assert "| export_single (PEFT) | 2 |" in capsys.readouterr().out
