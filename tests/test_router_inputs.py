"""``python -m benchmarks.router_inputs`` on the tiny model: one row per target layer, cosines in range."""

from __future__ import annotations

import json

import pytest

from benchmarks import router_inputs

pytestmark = pytest.mark.usefixtures("single_thread")


def test_every_target_layer_gets_its_sizes_and_cosines(tmp_path):
    out = tmp_path / "inputs.json"
    report = router_inputs.main(["--model", "tiny-llama", "--per-task", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    names = list(report["layers"])
    assert len(names) == 2 * 3 and all(n.rsplit(".", 1)[-1] in router_inputs.TARGETS for n in names)
    for row in report["layers"].values():
        assert row["rms"] > 0 and row["max_abs"] >= row["rms"] and 0 < row["largest_channel_energy"] <= 1
        assert row["mean_cosine_none"] == pytest.approx(row["mean_cosine_l2"], abs=1e-3)  # l2 keeps the direction
        for norm in ("none", "l2", "log"):
            assert -1.0 <= row[f"mean_cosine_{norm}"] <= 1.0
