"""``python -m benchmarks.recipe_health``: what a screened run's folder says, and the table built from it."""

from __future__ import annotations

import json

from benchmarks import recipe_health

LOG = """[2026-12-07 14:17:59][molex.train][INFO] - trainer.precision=auto: bf16-mixed on this machine
step 20/60  epoch 0  loss 0.44
[2026-12-07 14:24:02][molex.layer.health][WARNING] - routing health at step 20: dead experts (share < 1/(10 E)): layers.29.mlp.down_proj 1/8
"""


def test_a_run_folder_gives_its_warnings_health_and_precision(tmp_path):
    health = {"experts": 444, "dead_experts": 1, "dead_fraction": 0.00225, "collapsed_layers": [],
              "router_entropy": 0.47, "specialisation": 0.02}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps({"val_lm_loss": 0.33, "routing": {"health": health}}))
    (tmp_path / "stdout.log").write_text(LOG)
    result = recipe_health.collect("c10", tmp_path, ["router.options.load_balance_coef=10"])
    assert result["precision"] == "bf16-mixed" and result["val_lm_loss"] == 0.33 and result["health"] == health
    assert result["health_warnings"] == [
        {"step": 20, "text": "dead experts (share < 1/(10 E)): layers.29.mlp.down_proj 1/8"}
    ]
    table = recipe_health.markdown({"runs": [result]})
    assert (
        "| `c10` | `router.options.load_balance_coef=10` | bf16-mixed | 1 (20) | 1 / 444 | 0 | 0.47 | 0.3300 |" in table
    )


def test_health_comes_from_routing_json_for_runs_made_before_metrics_held_it(tmp_path):
    layers = {"a": {"load": [0.5, 0.5], "entropy": 0.9}, "b": {"load": [0.97, 0.01, 0.01, 0.01], "entropy": 0.2}}
    (tmp_path / "routing.json").write_text(json.dumps({"task_names": [], "layers": layers}))
    (tmp_path / "metrics.json").write_text(json.dumps({"val_lm_loss": 0.4}))
    (tmp_path / "stdout.log").write_text("no warnings here\n")
    result = recipe_health.collect("old", tmp_path, [])
    assert result["health_warnings"] == [] and result["precision"] == "as given"
    assert result["health"]["experts"] == 6 and result["health"]["dead_experts"] == 3
    assert result["health"]["collapsed_layers"] == ["b"]
