"""The user's path: the installed console scripts, run from a directory outside the repository.

``molex-train``, ``molex-eval``, ``molex-fuse`` and ``molex-export`` are the scripts pip writes next to the interpreter,
run with the working directory in a temporary folder and no ``PYTHONPATH`` into the checkout, exactly
as after the README's install. One (slow) test builds a wheel, installs it into a bare target folder and
runs the scripts from there, so a config or data file left out of the package fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = ("molex-train", "molex-eval", "molex-fuse", "molex-export")
SMOKE = ["experiment=smoke", "data.num_per_task=8", "data.eval_per_task=2", "eval.max_new_tokens=4"]


def user_env(**extra: str) -> dict[str, str]:
    """The caller's environment without a ``PYTHONPATH`` (nothing points into the checkout), offline."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def run(script: Path | str, *args: str, cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(script), *args], cwd=cwd, env=user_env(**env), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> dict[str, Path]:
    """The installed console scripts; they must run this checkout's molex (an editable install of it)."""
    found = {name: BIN / name for name in SCRIPTS}
    missing = [name for name, path in found.items() if not path.is_file()]
    if missing:
        pytest.fail(f"console scripts {missing} are not installed next to {sys.executable}; run scripts/test.sh")
    where = subprocess.run(
        [sys.executable, "-c", "import molex; print(molex.__file__)"],
        cwd=tmp_path_factory.mktemp("where"),
        env=user_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if Path(where).resolve().parent != (ROOT / "molex").resolve():
        pytest.fail(f"the installed scripts run molex from {where}, not this checkout {ROOT}; run scripts/test.sh")
    return found


def test_every_console_script_finds_its_configs_from_any_directory(scripts, tmp_path):
    for name, script in scripts.items():
        proc = run(script, "--help", cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
        assert "== Config ==" in proc.stdout and "model" in proc.stdout, name


def test_train_then_eval_through_the_console_scripts(scripts, tmp_path):
    proc = run(scripts["molex-train"], *SMOKE, "trainer.log_every_n_steps=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = tmp_path.glob("outputs/train/*/*")  # Hydra's default run folder, under the working directory
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter.safetensors").is_file()
    # output is a pipe, not a terminal: plain progress lines counted against max_steps, no redrawn bar
    lines = re.findall(r"^step (\d+)/10  epoch \d+  loss [\d.]+  [\d.]+ steps/s", proc.stdout, flags=re.M)
    assert lines == ["5", "10"], proc.stdout[-2000:]
    assert "\r" not in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())

    proc = run(
        scripts["molex-eval"],
        "model=tiny_llama",
        f"adapter={adapter}",
        "data.eval_per_task=2",
        "max_new_tokens=4",
        "hydra.run.dir=eval",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["num_examples"] == metrics["after"]["num_examples"]
    assert result["accuracy"] == pytest.approx(metrics["after"]["accuracy"])


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """Two PEFT LoRA adapters on the tiny Llama, named after built-in tasks."""
    pytest.importorskip("peft")
    from molex.models import load_model
    from tests.helpers.hub import make_peft_adapter

    root = tmp_path_factory.mktemp("hub")
    for seed, task in enumerate(["add", "parity"]):
        make_peft_adapter(lambda: load_model("tiny-llama")[0], root / task, seed=seed)
    return root


def test_fuse_through_the_console_script_with_train_s_config_groups(scripts, hub, tmp_path):
    import molex
    from molex.models import load_model

    common = [f"adapters={hub}", "model=tiny_llama", "train.steps=2", "train.dlp_epochs=2", "data.num_per_task=4"]
    quick = ["data.eval_per_task=2", "eval.max_new_tokens=2", "output_dir=out"]
    # router= and model= are the same groups as molex-train's: one spelling for both commands
    proc = run(scripts["molex-fuse"], *common, *quick, "router=dlp", "router.options.top_p=0.9", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| add |" in proc.stdout and "routing accuracy (dlp)" in proc.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text())["router"] == "dlp"
    loaded = molex.load_adapter(load_model("tiny-llama")[0], tmp_path / "out" / "fused")
    assert molex.adapter_names(loaded) == ["add", "parity"] and molex.get_config(loaded).router_name == "dlp"


@pytest.mark.parametrize("script", ["molex-fuse", "molex-train"])
def test_router_name_alone_is_refused_with_the_group_spelling(scripts, hub, tmp_path, script):
    args = [f"adapters={hub}"] if script == "molex-fuse" else []
    proc = run(scripts[script], *args, "model=tiny_llama", "router.name=dlp", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "router.name=dlp does not match the router group" in proc.stderr and "router=dlp" in proc.stderr
    assert "Traceback" not in proc.stderr


def readme_commands() -> list[list[str]]:
    """Every ``molex-*`` command line in the README's bash blocks, split as the shell would (comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]  # join continued lines
    return [shlex.split(line, comments=True) for line in lines if line.startswith("molex-")]


def test_readme_commands_compose_as_written():
    """Each README command's overrides name real groups, options and keys (sweeps: every value)."""
    from hydra import compose, initialize_config_dir

    import molex

    commands = readme_commands()
    assert {c[0] for c in commands} == set(SCRIPTS), commands
    conf = str(Path(molex.__file__).parent / "conf")
    for command in commands:
        args = [a for a in command[1:] if a != "-m"]
        sweeps = [[]]
        for arg in args:  # a multirun sweep k=a,b composes as k=a and as k=b
            key, _, value = arg.partition("=")
            values = value.split(",") if "-m" in command and "," in value else [value]
            sweeps = [[*s, f"{key}={v}"] for s in sweeps for v in values]
        for overrides in sweeps:
            with initialize_config_dir(config_dir=conf, version_base="1.3"):
                cfg = compose(
                    config_name=command[0].removeprefix("molex-"), overrides=overrides, return_hydra_config=True
                )
            if "router" in cfg:  # the router is picked by its group, never by router.name alone
                assert cfg.router.name == cfg.hydra.runtime.choices.router, command


def _copy_source(dest: Path) -> Path:
    """The checkout's sources without build outputs, so building a wheel writes nothing into the checkout."""
    skip = shutil.ignore_patterns(".venv*", ".git", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".*cache")
    shutil.copytree(ROOT, dest, ignore=skip, symlinks=True)
    return dest


@pytest.mark.slow
def test_a_wheel_installed_into_a_bare_folder_ships_every_config(tmp_path):
    source = _copy_source(tmp_path / "src")
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("molex_lora-*.whl")  # the distribution is molex-lora (the name molex is taken)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    package = [p for p in (source / "molex").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    wanted = {p.relative_to(source).as_posix() for p in package}
    assert {"molex/conf/__init__.py", "molex/conf/train.yaml", "molex/conf/experiment/smoke.yaml"} <= wanted
    assert not wanted - shipped, f"files missing from the wheel: {sorted(wanted - shipped)}"
    entry_points = next(n for n in shipped if n.endswith(".dist-info/entry_points.txt"))
    assert entry_points.startswith("molex_lora-"), entry_points
    assert all(f"{s} = " in zipfile.ZipFile(wheel).read(entry_points).decode() for s in SCRIPTS)

    target = tmp_path / "target"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300
    )
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    env = {"PYTHONPATH": str(target)}
    where = run(sys.executable, "-c", "import molex; print(molex.__file__)", cwd=work, **env)
    assert Path(where.stdout.strip()).is_relative_to(target), (
        where.stdout + where.stderr
    )  # the wheel's, not the checkout's
    for name in SCRIPTS:
        proc = run(target / "bin" / name, "--help", cwd=work, timeout=120, **env)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
    # every group the experiment file overrides resolves from the installed package
    proc = run(target / "bin" / "molex-train", *SMOKE, "--cfg", "job", cwd=work, timeout=120, **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name_or_path: tiny-llama" in proc.stdout and "num_experts: 4" in proc.stdout
