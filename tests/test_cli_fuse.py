"""molex-fuse: adapters from a folder, router choice, table and outputs; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_helpers import one_thread  # noqa: F401 - fixture

import molex

pytest.importorskip("peft")
pytest.importorskip("hydra")

CONF = str(Path(__file__).resolve().parents[1] / "molex" / "conf")


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name="fuse", overrides=list(overrides), return_hydra_config=False)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from molex.models import load_model

    root = tmp_path_factory.mktemp("hub")
    for seed, task in enumerate(["add", "parity"]):
        model, _ = load_model("tiny-llama")
        torch.manual_seed(seed)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        peft_model.save_pretrained(str(root / task))
    return root


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("router", ["gate", "dlp"])
def test_fuse_cli_writes_fused_model_and_table(hub, tmp_path, router, capsys):
    from molex.cli.fuse import fuse

    cfg = compose(
        f"adapters={hub}",
        "model.name_or_path=tiny-llama",
        f"router.name={router}",
        "train.steps=3",
        "train.dlp_epochs=3",
        "data.num_per_task=4",
        "data.eval_per_task=2",
        "eval.max_new_tokens=2",
        f"output_dir={tmp_path}",
    )
    results = fuse(cfg)
    printed = capsys.readouterr().out
    assert "| add |" in printed and "routing accuracy" in printed
    assert set(results["single"]) == {"add", "parity"}
    assert 0.0 <= results["fused"]["routing_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["router"] == router
    from molex.models import load_model

    loaded = molex.load_adapter(load_model("tiny-llama")[0], tmp_path / "fused")
    assert molex.adapter_names(loaded) == ["add", "parity"]


def test_fuse_cli_errors(hub, tmp_path):
    from molex.cli.fuse import fuse, resolve_adapters

    with pytest.raises(ValueError, match="no PEFT adapter"):
        resolve_adapters(tmp_path)
    (tmp_path / "poetry").mkdir()
    (hub / "add").rename(tmp_path / "poetry" / "x")
    try:
        cfg = compose(
            f"adapters=[{tmp_path / 'poetry' / 'x'}]", "model.name_or_path=tiny-llama", f"output_dir={tmp_path}"
        )
        with pytest.raises(ValueError, match=r"adapters \['x'\] are not built-in tasks"):
            fuse(cfg)
    finally:
        (tmp_path / "poetry" / "x").rename(hub / "add")
