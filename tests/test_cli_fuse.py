"""molex-fuse: adapters from a folder, router choice, table and outputs; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import molex
from tests.helpers.hub import one_thread  # noqa: F401 - fixture

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
        f"router={router}",
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


def test_fuse_cli_reads_data_files_with_the_data_reader(hub, tmp_path, capsys):
    from molex.cli.common import CLIError
    from molex.cli.fuse import fuse

    rows = [
        {"instruction": "Add the numbers.", "input": f"{i} {i}", "output": str(2 * i), "task": "add"} for i in range(4)
    ]
    rows += [
        {"instruction": "Even or odd?", "input": str(i), "output": "odd" if i % 2 else "even", "task": "parity"}
        for i in range(4)
    ]
    train = tmp_path / "train.csv"  # any format the data reader knows, not only jsonl
    train.write_text("instruction,input,output,task\n" + "\n".join(",".join(r.values()) for r in rows) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps(r) for r in rows[::3]) + "\n")
    common = [f"adapters={hub}", "model=tiny_llama", "train.steps=2", "eval.enabled=false", f"output_dir={tmp_path}"]
    results = fuse(compose(*common, f"data.source={train}", f"data.eval_source={test}"))
    assert "routing accuracy (gate)" in capsys.readouterr().out
    assert 0.0 <= results["fused"]["routing_accuracy"] <= 1.0
    untagged = tmp_path / "untagged.jsonl"
    untagged.write_text(json.dumps({"instruction": "Add.", "output": "2"}) + "\n")
    with pytest.raises(CLIError, match=r"tasks \['default'\] that name no adapter"):
        fuse(compose(*common, f"data.source={train}", f"data.eval_source={untagged}"))
    with pytest.raises(CLIError, match="also give data.eval_source"):
        fuse(compose(*common, f"data.source={train}"))
