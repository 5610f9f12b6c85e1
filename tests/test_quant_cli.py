"""``model.quantization=`` in Hydra: bad values fail with the allowed ones, a tiny run trains on a quantized
base, and the study's ``--set`` passes the override through to every run."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import molex
from benchmarks import study
from benchmarks.study_measure import compose_config
from molex.cli.common import CLIError, build_model
from molex.quant import is_quantized

pytest.importorskip("torchao")

CONF = Path(molex.__file__).parent / "conf"
SMOKE = ["experiment=smoke", "data.num_per_task=8", "data.eval_per_task=2", "eval.max_new_tokens=4"]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("group", ["hf", "smollm2_135m", "tiny_llama"])
def test_every_model_config_has_the_quantization_option_off(group):
    assert compose_train(f"model={group}").model.quantization is None


def test_a_bad_quantization_names_the_value_and_the_choices():
    cfg = compose_train("model=tiny_llama", "model.quantization=nf5")
    with pytest.raises(CLIError, match=r"model.quantization='nf5'.*'nf4'.*'torchao-int8'"):
        build_model(cfg.model)


def test_a_tiny_run_trains_on_a_torchao_int8_base(tmp_path):
    from molex.cli.train import train

    cfg = compose_train(
        *SMOKE, "model.quantization=torchao-int8", "trainer.max_steps=2", "eval.before=false",
        "analysis.enabled=false", f"run_dir={tmp_path}",
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["train"]["steps"] == 2
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    model, _ = build_model(cfg.model)
    assert is_quantized(model.model.layers[0].self_attn.q_proj)


def test_the_study_passes_the_quantization_to_every_run():
    args = study._parse(["--quick", "--set", "model.quantization=torchao-int8"])
    overrides = study.common_overrides(args)
    assert overrides[-1] == "model.quantization=torchao-int8"
    assert compose_config(overrides).model.quantization == "torchao-int8"
