"""molex-export: every mode on the tiny model through the console script's main, and clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import molex
from tests.helpers.hub import one_thread  # noqa: F401 - fixture

pytest.importorskip("hydra")
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["data.num_per_task=2", "data.eval_per_task=2", "data.builtin_tasks=[add,parity,reverse]"]


def make_adapter(folder, router: str, **options):
    from molex.models import load_model

    model, _ = load_model("tiny-llama")
    cfg = molex.MoLEConfig(target_modules=["q_proj", "v_proj"], num_experts=2, rank=2, router=router, **options)
    molex.inject(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.2)
    molex.save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "dlp": make_adapter(root / "dlp", "dlp", router_options={"top_p": 1e-6, "classifier_hidden": 8}),
        "topk": make_adapter(root / "topk", "topk", top_k=1),
    }


def run(monkeypatch, tmp_path, *overrides: str) -> None:
    from molex.cli.export import main

    argv = ["molex-export", "model=tiny_llama", *DATA, f"hydra.run.dir={tmp_path / 'hydra'}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    main()


@pytest.mark.slow  # reads and tokenises the data: about 30 s on a busy 2-core CPU
def test_routes_from_the_data_tasks(monkeypatch, tmp_path, adapters, capsys):
    run(monkeypatch, tmp_path, f"adapter={adapters['dlp']}", "mode=routes", "out=routes", "per_task=2")
    index = json.loads((tmp_path / "routes" / "routes.json").read_text())
    assert set(index["by_name"]) == {"add", "parity", "reverse"}
    for entry in index["routes"].values():
        assert (tmp_path / "routes" / entry["adapter"] / "adapter_model.safetensors").is_file()
    assert "written:" in capsys.readouterr().out


def test_routes_from_a_prompt_file_and_merged(monkeypatch, tmp_path, adapters):
    from transformers import AutoModelForCausalLM

    (tmp_path / "prompts.txt").write_text("Add 2 and 3.\n\nReverse the word: cat\n")
    run(monkeypatch, tmp_path, f"adapter={adapters['dlp']}", "out=routes", "prompts=prompts.txt")
    index = json.loads((tmp_path / "routes" / "routes.json").read_text())
    assert sum(len(e["prompts"]) for e in index["routes"].values()) == 2
    run(monkeypatch, tmp_path, f"adapter={adapters['dlp']}", "mode=merged", "out=merged", "weights=[1,0]")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any(isinstance(m, molex.MoLELinear) for m in reloaded.modules())


def test_single_from_validation_batches(monkeypatch, tmp_path, adapters):
    run(
        monkeypatch,
        tmp_path,
        f"adapter={adapters['topk']}",
        "mode=single",
        "out=single",
        "rank=1",
        "calibration_batches=1",
    )
    report = json.loads((tmp_path / "single" / "export_report.json").read_text())
    assert report["rank"] == 1 and set(report["ranks"].values()) == {1}
    assert 0 < report["mean_relative_frobenius_error"] < 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mode=zip", "out=x"], "mode=zip: choose one of routes, single, merged"),
        (["mode=single"], "out= is required"),
        (["mode=single", "out=x", "rank=0"], "rank=0: give a positive integer"),
        (["mode=single", "out=x", "calibration_batches=-1"], "calibration_batches=-1"),
        (["mode=routes", "out=x", "prompts=missing.txt"], "no such file"),
        (["mode=routes", "out=x", "weights=[a,b]"], "one number per expert"),
        (["mode=routes", "out=x", "task=add"], "task= picks the one route of mode=merged"),
        (["mode=merged", "out=x", "task=nope"], "task=nope: not a task of the data"),
        (["mode=routes", "out=x", "per_task=0"], "per_task=0"),
        (["mode=routes", "out=x", "ADAPTER=topk"], "export_single"),
    ],
)
def test_bad_values_stop_with_one_line(monkeypatch, tmp_path, adapters, capsys, overrides, message):
    adapter = adapters["topk"] if "ADAPTER=topk" in overrides else adapters["dlp"]
    overrides = [o for o in overrides if not o.startswith("ADAPTER=")]
    with pytest.raises(SystemExit) as exit_info:
        run(monkeypatch, tmp_path, f"adapter={adapter}", *overrides)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars of the data loader come first
    assert last.startswith("molex-export: error:") and message in last
    assert not (tmp_path / "x").exists()


def test_missing_adapter(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(monkeypatch, tmp_path, f"adapter={tmp_path / 'gone'}", "out=x")
    assert "is not an adapter folder" in capsys.readouterr().err
