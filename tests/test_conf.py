"""The Hydra config tree: every option of every group composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import molex
from molex.cli.common import CLIError, build_mole_config, check_sources, check_trainer
from molex.cli.precision import resolve_precision

CONF = Path(molex.__file__).parent / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=False)


def test_default_config_is_the_documented_default_run():
    cfg = compose_train()
    assert cfg.model.name_or_path == "smollm2-135m"
    assert cfg.router.name == "topk" and cfg.router.options.top_k == 2
    mole = build_mole_config(cfg)
    assert mole.rank == 8 and mole.allocation.schedule == "mola-increasing"
    assert {"q_proj", "down_proj"} <= set(mole.target_modules)
    assert cfg.trainer.accelerator == "cpu"


def test_every_registered_router_has_a_conf_file():
    missing = sorted(set(molex.available_routers()) - set(options("router")))
    assert not missing, f"add molex/conf/router/<name>.yaml for {missing}"


@pytest.mark.parametrize("router", options("router"))
def test_router_confs_instantiate(router):
    cfg = compose_train(f"router={router}", "allocation=uniform")
    assert cfg.router.name == router
    if router not in molex.available_routers():
        pytest.skip(f"router {router!r} is not registered in this build")
    config = instantiate(cfg.router)
    assert isinstance(config, molex.routers.get_router_class(router).config_class)
    assert build_mole_config(cfg).router_name == router


@pytest.mark.parametrize("allocation", options("allocation"))
def test_allocation_confs_instantiate(allocation):
    cfg = compose_train(f"allocation={allocation}")
    alloc = build_mole_config(cfg).allocation
    assert alloc.schedule == allocation.replace("_", "-").replace("-uniform", "uniform")


@pytest.mark.parametrize("trainer", [pytest.param(t, id=f"trainer_{t}") for t in options("trainer")])
def test_trainer_confs_compose(trainer):
    cfg = compose_train(f"trainer={trainer}")
    assert cfg.trainer.max_steps > 0 and cfg.trainer._target_ == "lightning.Trainer"
    check_trainer(cfg.trainer)
    if trainer in ("cpu", "ddp"):  # the others name GPUs (test_fsdp_trainer_builds_on_cpu builds fsdp on CPU)
        # molex-train resolves precision=auto before it builds the trainer (molex.cli.precision)
        precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
        built = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, precision=precision)
        assert built.max_steps == cfg.trainer.max_steps
        assert built.num_devices == (2 if trainer == "ddp" else 1)


def test_fsdp_trainer_builds_on_cpu():
    from molex.lightning.fsdp import FullyShardedStrategy

    cfg = compose_train("trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true")
    built = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(built.strategy, FullyShardedStrategy) and built.num_devices == 2


def test_7b_recipes_compose_to_what_their_headers_say():
    qlora = compose_train("experiment=llama7b_qlora")
    assert qlora.model.quantization == "nf4" and qlora.trainer.devices == 1 and qlora.trainer.accelerator == "gpu"
    fsdp = compose_train("experiment=llama7b_fsdp")
    assert fsdp.trainer.strategy._target_.endswith("FullyShardedStrategy") and fsdp.trainer.devices == 4
    for cfg in (qlora, fsdp):
        assert list(build_mole_config(cfg).target_modules) == [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        check_trainer(cfg.trainer)


@pytest.mark.parametrize("data", options("data"))
def test_data_confs_compose(data, tmp_path):
    overrides = [f"data={data}"]
    if data != "builtin_multitask":
        overrides.append(f"data.source={tmp_path / 'train.jsonl'}")
    cfg = compose_train(*overrides)
    assert cfg.data._target_.endswith("InstructionDataModule")
    assert cfg.data.seed == cfg.seed


@pytest.mark.parametrize("model", options("model"))
def test_model_confs_compose(model):
    cfg = compose_train(f"model={model}", "model.name_or_path=tiny-llama" if model == "hf" else "seed=0")
    assert cfg.model._target_ == "molex.models.load_model"


def test_tiny_llama_model_conf_instantiates():
    pytest.importorskip("molex.models")
    cfg = compose_train("model=tiny_llama")
    model, tokenizer = instantiate(cfg.model)
    assert tokenizer is not None and sum(p.numel() for p in model.parameters()) > 0


def test_experiment_overrides_the_primary_config():
    cfg = compose_train("experiment=smoke")
    assert cfg.mole.num_experts == 4 and build_mole_config(cfg).allocation.num_experts == 4


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_confs_compose(experiment):
    cfg = compose_train(f"experiment={experiment}")
    if cfg.router.name not in molex.available_routers():
        pytest.skip(f"router {cfg.router.name!r} is not registered in this build")
    build_mole_config(cfg)


def test_bad_values_are_reported_before_training(tmp_path):
    pytest.importorskip("molex.models")
    with pytest.raises(CLIError, match="max_steps"):
        check_trainer(compose_train("trainer.max_steps=0").trainer)
    cfg = compose_train("model=hf", f"model.name_or_path={tmp_path / 'nope'}")
    with pytest.raises(CLIError, match="does not exist"):
        check_sources(cfg.model, cfg.data)
    cfg = compose_train("data=jsonl", f"data.source={tmp_path / 'missing.jsonl'}")
    with pytest.raises(CLIError, match="no such file"):
        check_sources(cfg.model, cfg.data)
    with pytest.raises(CLIError, match="unknown option"):
        build_mole_config(compose_train("+router.options.topk=3"))
    with pytest.raises(CLIError, match="rank"):
        build_mole_config(compose_train("mole.rank=0"))


def test_eval_conf_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["adapter=/some/run/adapter", "model=tiny_llama"])
    assert cfg.adapter == "/some/run/adapter" and cfg.model.name_or_path == "tiny-llama"
    assert cfg.data._target_.endswith("InstructionDataModule")


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("tiny-llama", False),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
        ("data/train", False),  # could be either: loaders look on disk first
        ("./model", True),
        ("/abs/model", True),
        ("~/model", True),
        ("a/b/c", True),
        ("C:\\models\\x", True),
        ("train.JSONL", True),
        ("weights.gguf", True),
        ("model.safetensors", True),
    ],
)
def test_one_rule_tells_local_paths_from_hub_names(name, local):
    from molex.core.sources import looks_like_path

    assert looks_like_path(name) is local


def test_check_sources_and_the_model_loader_share_the_rule(tmp_path):
    pytest.importorskip("molex.models")
    from molex.models import load_model

    deep = "no/such/deep/model"  # not a hub name: both reject it without asking the hub
    with pytest.raises(CLIError, match="does not exist"):
        check_sources(compose_train("model=hf", f"model.name_or_path={deep}").model, compose_train().data)
    with pytest.raises(FileNotFoundError, match="model path not found"):
        load_model(deep)
