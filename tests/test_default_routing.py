"""The default recipe's routers stay healthy: molex-train's own defaults, scaled down to the tiny model.

Everything but the model's size, the data's size and the number of steps is the default of
``molex-train`` (top-2 router, MoLA 2-4-6-8 allocation, AdamW with the routers at 10x, the default
load-balance settings). After training, the run's routing over the validation data must have at most 2%
dead experts and no collapsed layer, and no routing-health warning may have been logged. The
previous defaults (a load-balance coefficient of 0.01 averaged over the layers, balancing token slots)
fail the same check on the same run, which shows the check can fail.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from molex.cli.train import train
from tests.helpers.cli import CONF

pytestmark = pytest.mark.usefixtures("single_thread")

#: 8 layers, so that each quarter of the 2-4-6-8 allocation has two; the rest as the default recipe
SCALED_DOWN = [
    "model=tiny_llama",
    "+model.config_overrides={num_hidden_layers: 8}",
    "data.num_per_task=32",
    "data.eval_per_task=2",
    "data.max_length=96",
    "trainer.max_steps=40",
    "trainer.val_check_interval=40",
    "trainer.enable_progress_bar=false",
    "eval.before=false",
    "eval.after=false",
    "logger=csv",
]
PREVIOUS_DEFAULTS = [
    "router.options.load_balance_coef=0.01",
    "router.options.balance_share=slots",
    "router.options.input_norm=none",
    "router.options.temperature=1.0",
]


def run_health(tmp_path: Path, caplog: pytest.LogCaptureFixture, *overrides: str) -> tuple[dict, list[str]]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*SCALED_DOWN, f"run_dir={tmp_path}", *overrides])
    with caplog.at_level(logging.WARNING, logger="molex"):
        metrics = train(cfg)
    warnings = [r.getMessage() for r in caplog.records if "routing health" in r.getMessage()]
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert saved["routing"]["health"] == metrics["routing"]["health"]
    return metrics["routing"]["health"], warnings


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_default_recipe_routes_without_dead_or_collapsed_experts(tmp_path, caplog, precision):
    health, warnings = run_health(tmp_path, caplog, f"trainer.precision={precision}")
    assert health["experts"] == 2 * (2 + 4 + 6 + 8) * 3  # 8 layers x q, v, down in 2-4-6-8
    assert health["dead_fraction"] <= 0.02, health
    assert health["collapsed_layers"] == [], health
    assert warnings == []


def test_previous_defaults_fail_the_same_check(tmp_path, caplog):
    health, warnings = run_health(tmp_path, caplog, "trainer.precision=32-true", *PREVIOUS_DEFAULTS)
    assert health["dead_fraction"] > 0.02 or health["collapsed_layers"], health
    assert warnings
