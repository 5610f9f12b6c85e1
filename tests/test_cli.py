"""``molex-train`` / ``molex-eval``: end-to-end runs on the tiny model and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
from hydra.errors import MissingConfigException

import molex
from molex.cli.common import CLIError
from molex.cli.train import train
from tests.helpers.cli import SMOKE, compose_train, run_cli


def test_train_end_to_end_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        "molex.cli.train", *SMOKE, "trainer.max_steps=4", "trainer.log_every_n_steps=1", f"hydra.run.dir={run}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "config.yaml",
        "metrics.json",
        "routing.json",
        "adapter/adapter_config.json",
        "adapter/adapter.safetensors",
        "plots/expert_load.png",
        "plots/router_entropy.png",
        "plots/task_expert_usage.png",
        "checkpoints/last.ckpt",
        "logs/metrics.csv",
        ".hydra/overrides.yaml",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 4
    assert set(metrics["before"]["per_task"]) == set(metrics["after"]["per_task"])
    assert "overall" in proc.stdout and "before" in proc.stdout  # the per-task table
    from molex.models import load_model

    model, _ = load_model("tiny-llama")
    loaded = molex.load_adapter(model, run / "adapter")
    assert molex.get_config(loaded).router_name == "topk"
    csv = (run / "logs" / "metrics.csv").read_text()
    assert "train/loss" in csv and "routing/" in csv

    with pytest.raises(CLIError, match="holds weights only"):  # the default checkpoints are adapter-only
        train(compose_train(tmp_path / "resume", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))

    out = tmp_path / "eval"
    proc = run_cli(
        "molex.cli.eval",
        "model=tiny_llama",
        f"adapter={run / 'adapter'}",
        "data.eval_per_task=2",
        "max_new_tokens=4",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["num_examples"] == metrics["after"]["num_examples"]
    assert result["accuracy"] == pytest.approx(metrics["after"]["accuracy"])


def test_bad_input_exits_with_one_clear_line(tmp_path):
    proc = run_cli("molex.cli.train", "model=tiny_llama", "trainer.max_steps=0", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "molex-train: error: trainer.max_steps=0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_group_option_lists_the_valid_ones(tmp_path):
    with pytest.raises(MissingConfigException, match=r"(?s)Available options in 'router'.*topk"):
        compose_train(tmp_path, "router=nope")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_steps=0"], "max_steps"),
        (["model=hf", "model.name_or_path=/no/such/model"], "does not exist"),
        (["data=jsonl", "data.source=/no/such/file.jsonl"], "no such file"),
        (["router.options.top_k=3", "allocation=mola_increasing"], "top_k=3 exceeds num_experts=2"),
        (["+router.options.bogus=1"], "unknown option"),
        (["mole.target_modules=[nope_proj]"], "matched no module"),
        (["optim.router_lr_scale=0"], "optim.router_lr_scale must be a finite number > 0 .*got 0"),
    ],
)
def test_bad_configuration_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(CLIError, match=message):
        train(compose_train(tmp_path, *overrides))
    assert not (tmp_path / "checkpoints").exists()


def test_dataset_with_wrong_columns_fails_before_training(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "a"}) for i in range(20)) + "\n")
    with pytest.raises(CLIError, match="missing required column"):
        train(compose_train(tmp_path, "data=jsonl", f"data.source={data}"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CLIError, match="data"):
        train(compose_train(tmp_path, "data=jsonl", f"data.source={empty}"))


@pytest.mark.slow
def test_multirun_sweeps_routers(tmp_path):
    proc = run_cli(
        "molex.cli.train",
        "-m",
        *SMOKE,
        "trainer.max_steps=2",
        "eval.before=false",
        "router=topk,soft",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=${router.name}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for router in ("topk", "soft"):
        config = json.loads((tmp_path / router / "adapter" / "adapter_config.json").read_text())
        assert config["mole_config"]["router"]["name"] == router


def test_setup_builds_the_injected_model_and_the_data_once(tmp_path):
    from molex.cli.run_parts import prepare_run

    run = prepare_run(compose_train(tmp_path))
    built = run.built
    assert run.optim.router_lr_scale == 10.0 and run.health.log_every_n_steps == 20
    assert molex.get_config(built.model) == built.mole_config  # injected here, handed to MoLEModule as it is
    assert built.mole_config.router_name == "topk" and built.datamodule.datasets["train"]
    assert built.datamodule.tokenizer is built.tokenizer
    from molex.lightning import MoLEModule

    module = MoLEModule(model=built.model)
    assert module.model is built.model and module.mole_config == built.mole_config
