"""Smoke test of the kernel benchmarks on a tiny point (keeps the scripts runnable)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from benchmarks.bench_sweep import main as sweep_main
from benchmarks.bench_sweep import roofline_floor
from benchmarks.harness import ratio, time_candidates
from benchmarks.summarize import summarize

pytestmark = pytest.mark.usefixtures("single_thread")


def test_time_candidates_and_ratio():
    stats = time_candidates({"a": lambda: None, "b": lambda: sum(range(1000))}, warmup=0, repeats=3)
    assert set(stats) == {"a", "b"} and stats["a"]["repeats"] == 3
    assert ratio(stats, "a", "a") == 1.0


def test_sweep_writes_json_and_summary(tmp_path, monkeypatch):
    point = dict(experts=4, rank=2, top_k=2, tokens=16, dim=24, sequences=4)
    assert roofline_floor(point, 2) > 0
    monkeypatch.setattr("benchmarks.bench_sweep.QUICK_GRID", [point])
    out = tmp_path / "sweep.json"
    sweep_main(["--quick", "--repeats", "1", "--warmup", "1", "--json", str(out)])
    payload = json.loads(out.read_text())
    (res,) = payload["results"]
    assert {"dense", "per_seq", "grouped", "reference"} <= set(res["speedup_vs_loop"])
    assert res["selected_vs_best"] >= 1.0 and payload["env"]["torch"] == torch.__version__
    assert "within 10% of the best at" in summarize(payload)
