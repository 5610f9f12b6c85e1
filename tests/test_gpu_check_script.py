"""The GPU check script: its CPU mode end to end (slow), the roofline formula and the summary (fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks.bench_layer_roofline import layer_bytes, layer_flops, roofline
from benchmarks.gpu_summary import main as summary_main

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"gpu_check.log", "tests.xml", "roofline.json", "train.json", "sweep.json", "summary.json"}


def test_roofline_point_is_compute_bound_by_the_base_gemms():
    point = dict(tokens=4096, dim=4096, experts=8, rank=8)
    flops = layer_flops(**point, top_k=2)
    # two 4096^3 base GEMMs (forward, grad-x) are 2 * 2 * 4096^3 = 274.9 GFLOP of the total
    assert flops == pytest.approx(2 * 2 * 4096**3 + 3 * 2 * 4096 * 4096 * 8 + 3 * 2 * 4096 * 2 * 8 * 8192)
    assert layer_bytes(**point, element_size=2) == pytest.approx(
        2 * (5 * 4096**2 + 2 * 4096**2 + 4 * (8 * 8 * 8192 + 4096 * 8))
    )
    roof = roofline(**point, top_k=2, element_size=2)
    assert roof["floor_s"] == roof["compute_s"] == pytest.approx(flops / 790e12)
    assert roof["memory_s"] < roof["compute_s"]


def test_smollm2_sized_model_has_smollm2_shape():
    pytest.importorskip("transformers")
    from benchmarks.bench_train_step import build_model

    model = build_model("smollm2-135m", device="meta", seq=512)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (576, 30, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    # SmolLM2-135M: 134.5 M parameters with tied embeddings
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    with pytest.raises(ValueError, match="unknown model 'smollm3'"):
        build_model("smollm3", device="meta")


def test_summary_reports_missing_files(tmp_path, capsys):
    summary = summary_main([str(tmp_path), "--rc", "tests=1", "sweep=124"])
    assert summary["rc"] == {"tests": 1, "sweep": 124}
    assert sorted(summary["problems"]) == sorted(
        f"{name} missing" for name in ("tests.xml", "roofline.json", "train.json", "sweep.json")
    )
    assert json.loads((tmp_path / "summary.json").read_text())["rc"]["sweep"] == 124
    assert "problem: sweep.json missing" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="step=code"):
        summary_main([str(tmp_path), "--rc", "tests"])


@pytest.mark.slow
def test_cpu_mode_runs_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS
    # the summary comes last
    tail = proc.stdout[proc.stdout.rindex("== gpu_check summary ==") :]
    assert "tests: 0 passed, 0 failed, 0 errors" in tail and "train tiny mole" in tail
    assert "problem:" not in tail

    ET.parse(tmp_path / "tests.xml")
    roof = json.loads((tmp_path / "roofline.json").read_text())
    assert {"dense", "grouped", "reference", "auto", "peft_lora", "base"} <= set(roof["rows"])
    assert all(row["vs_floor"] > 1 for row in roof["rows"].values())
    train = json.loads((tmp_path / "train.json").read_text())
    assert [(r["model"], r["variant"]) for r in train["results"]] == [("tiny", "lora"), ("tiny", "mole")]
    assert train["ratios"]["tiny"]["step_time_mole_vs_lora"] > 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["results"]) == 2 and all("estimated_s" in r for r in sweep["results"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rc"] == {"tests": 0, "roofline": 0, "train": 0, "sweep": 0}
    assert summary["sweep"]["points"] == 2 and summary["problems"] == []
