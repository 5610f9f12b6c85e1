"""Bad input that only shows once a command's config is composed: every ``molex-*`` command stops with one
line naming the bad value, never a traceback (that needs ``HYDRA_FULL_ERROR=1``), and before it trains.

Each case runs the real command in a subprocess. Placeholders in braces are filled from the fixtures:
``{hub}`` (PEFT adapters of a base with other dimensions), ``{other_base}`` (a molex adapter of that base),
``{binary}`` (a file that is not text), ``{cores}`` / ``{devices}`` (this machine's cores, and more than it).
"""

from __future__ import annotations

import pytest

from molex.cli.common import usable_cores
from tests.helpers.cli import SMOKE, run_cli
from tests.helpers.hub import make_peft_adapter

#: a tiny-llama of other dimensions than the ``model=tiny_llama`` preset (hidden size 64)
OTHER_DIMENSIONS = {"hidden_size": 32, "intermediate_size": 48}

TRAIN, EVAL, FUSE, EXPORT = "molex.cli.train", "molex.cli.eval", "molex.cli.fuse", "molex.cli.export"
FAST_TRAIN = [*SMOKE, "trainer.max_steps=2"]

#: (command, arguments, exit status, texts the error line must contain)
CASES = [
    # the router's ids against the data's (8 built-in tasks): found after the data is set up, before fit
    (
        TRAIN,
        [*FAST_TRAIN, "router=features", "router.options.features.task=2"],
        2,
        ["router.options.features.task=2", "8 tasks (ids 0-7)", "set router.options.features.task=8"],
    ),
    (
        TRAIN,
        [*FAST_TRAIN, "router=mtl", "router.options.num_tasks=2"],
        2,
        ["router.options.num_tasks=2 but the data has 8 tasks (ids 0-7): set router.options.num_tasks=8"],
    ),
    (
        TRAIN,
        [*FAST_TRAIN, "router=gate", "router.options.task_loss_coef=1"],
        2,
        ["router.options.task_loss_coef=1", "8 tasks", "4 experts", "mole.num_experts=8"],
    ),
    (TRAIN, [*FAST_TRAIN, "eval.max_new_tokens=0"], 2, ["eval.max_new_tokens=0"]),
    # more CPU processes than cores: refused before anything is built
    (TRAIN, ["trainer=ddp", "trainer.devices={devices}"], 2, ["trainer.devices={devices}", "{cores} CPU core"]),
    # adapters of a base with other dimensions
    (
        FUSE,
        ["adapters={hub}", "model=tiny_llama", "data.num_per_task=2", "data.eval_per_task=1", "eval.max_new_tokens=2"],
        1,
        ["{hub}/add", "different dimensions"],
    ),
    (
        EVAL,
        ["model=tiny_llama", "adapter={other_base}", "data.eval_per_task=1"],
        2,
        ["adapter={other_base}: ", "different dimensions"],
    ),
    (
        EXPORT,
        ["model=tiny_llama", "adapter={other_base}", "mode=single", "out={tmp}/single"],
        2,
        ["adapter={other_base}: ", "different dimensions"],
    ),
    # options generation refuses only once it runs
    (EVAL, ["model=tiny_llama", "batch_size=0", "data.eval_per_task=1"], 2, ["batch_size=0"]),
    (EVAL, ["model=tiny_llama", "max_new_tokens=-3", "data.eval_per_task=1"], 2, ["max_new_tokens=-3"]),
    (FUSE, ["adapters={hub}", "model=tiny_llama", "eval.batch_size=0"], 2, ["eval.batch_size=0"]),
    # a prompts file that is not text
    (
        EXPORT,
        ["model=tiny_llama", "adapter={other_base}", "mode=routes", "prompts={binary}", "out={tmp}/routes"],
        2,
        ["prompts='{binary}'", "not UTF-8"],
    ),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The files the cases name: adapters of a base with other dimensions, and a binary file."""
    pytest.importorskip("peft")
    import molex
    from molex.models import load_model

    root = tmp_path_factory.mktemp("inputs")

    def other_base():
        return load_model("tiny-llama", config_overrides=OTHER_DIMENSIONS)[0]

    for seed, task in enumerate(["add", "parity"]):
        make_peft_adapter(other_base, root / "hub" / task, seed=seed)
    model = molex.inject(other_base(), molex.MoLEConfig(target_modules=["q_proj"], rank=2, num_experts=2))
    molex.save_adapter(model, root / "other_base")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00prompt")
    cores = usable_cores()
    return {
        "hub": str(root / "hub"),
        "other_base": str(root / "other_base"),
        "binary": str(root / "binary.txt"),
        "cores": str(cores),
        "devices": str(max(64, cores + 1)),
    }


def _error_line(stderr: str, module: str) -> str:
    prog = "molex-" + module.rsplit(".", 1)[1]
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(("module", "args", "status", "texts"), CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_fails_in_one_line(inputs, tmp_path, module, args, status, texts):
    values = {**inputs, "tmp": str(tmp_path)}
    run_dir = tmp_path / "run"
    proc = run_cli(
        module,
        *(arg.format(**values) for arg in args),
        f"hydra.run.dir={run_dir}",
        env={"HYDRA_FULL_ERROR": None, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = _error_line(proc.stderr, module)
    for text in texts:
        assert text.format(**values) in line
    assert not (run_dir / "checkpoints").exists()  # nothing trained


def test_full_error_shows_the_traceback(inputs, tmp_path):
    """``HYDRA_FULL_ERROR=1`` is how to see where an unexpected error came from: it is not swallowed then."""
    proc = run_cli(
        FUSE,
        f"adapters={inputs['hub']}",
        "model=tiny_llama",
        "data.num_per_task=2",
        "data.eval_per_task=1",
        f"hydra.run.dir={tmp_path}",
        env={"HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "different dimensions" in proc.stderr


def test_cpu_devices_within_the_cores_pass_the_check():
    from omegaconf import OmegaConf

    from molex.cli.common import CLIError, check_cpu_devices

    cores = usable_cores()
    check_cpu_devices(OmegaConf.create({"accelerator": "cpu", "devices": cores}))
    check_cpu_devices(OmegaConf.create({"accelerator": "cpu", "devices": "auto"}))
    check_cpu_devices(OmegaConf.create({"accelerator": "gpu", "devices": cores + 1}))  # not CPU processes
    with pytest.raises(CLIError, match=f"trainer.devices={cores + 1} .* {cores} CPU core"):
        check_cpu_devices(OmegaConf.create({"accelerator": "cpu", "devices": str(cores + 1)}))


def test_routing_data_check_passes_matching_sizes():
    """The sizes the data needs (and more) pass: only too few ids for the data are refused."""
    from molex.cli.common import CLIError
    from molex.cli.data_checks import check_routing_data
    from molex.routers import make_router_config

    class Data:
        num_tasks = 8
        feature_values = {"lang": ["de", "en", "fr"]}

    check_routing_data("mtl", make_router_config("mtl", {"num_tasks": 8}), Data())
    check_routing_data("mtl", make_router_config("mtl", {"num_tasks": 9}), Data())
    features = make_router_config("features", {"features": {"task": 8, "lang": 3}})
    check_routing_data("features", features, Data())
    with pytest.raises(CLIError, match=r"router.options.features.lang=2 .* 3 'lang' values \(ids 0-2\)"):
        check_routing_data("features", make_router_config("features", {"features": {"lang": 2}}), Data())
    with pytest.raises(CLIError, match="data.columns.features holds \\['lang'\\].*features.lang=3"):
        check_routing_data("features", make_router_config("features", {"features": {"task": 8}}), Data())
    Data.feature_values = {}
    with pytest.raises(CLIError, match="no feature 'domain'"):
        check_routing_data("features", make_router_config("features", {"features": {"domain": 2}}), Data())
