"""``molex-train`` runs AdaMix, FLix, MTL-LoRA and shared-A pools from plain Hydra overrides."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from tests.helpers.cli import CONF, SMOKE

DESIGNS = {
    "stochastic": ["router=stochastic", "router.options.consistency_coef=0.1"],
    "features": ["router=features"],
    "mtl": ["router=mtl"],
    "share_A": ["mole.share_A=true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("design", list(DESIGNS))
def test_train_runs_each_design(design, tmp_path):
    from molex.cli.train import train

    overrides = [*SMOKE, "trainer.max_steps=2", "eval.before=false", f"run_dir={tmp_path}", *DESIGNS[design]]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        train(compose(config_name="train", overrides=overrides))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    mole = saved["mole_config"]
    assert mole["router"]["name"] == ("topk" if design == "share_A" else design)
    assert mole["share_A"] == (design == "share_A")
    if design == "features":  # one expert per task, whatever the allocation says
        assert {layer["num_experts"] for layer in saved["layers"]} == {8}
    assert json.loads((tmp_path / "metrics.json").read_text())["after"]["num_examples"] > 0


@pytest.mark.slow
def test_train_reads_feature_columns_for_flix(tmp_path):
    from molex.cli.train import train

    rows = [
        {"instruction": f"Echo {i}", "output": f"{i}", "task": "ab"[i % 2], "lang": "xyz"[i % 3]} for i in range(24)
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        *SMOKE,
        "trainer.max_steps=2",
        "eval.before=false",
        f"run_dir={tmp_path / 'run'}",
        "data=jsonl",
        f"data.source={data}",
        "data.max_length=64",
        "+data.columns.features=[task,lang]",
        "router=features",
        "router.options.features.task=2",
        "+router.options.features.lang=3",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        train(compose(config_name="train", overrides=overrides))
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert {layer["num_experts"] for layer in saved["layers"]} == {5}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["after"]["num_examples"] > 0
