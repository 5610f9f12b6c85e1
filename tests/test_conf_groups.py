"""The optim, health, callbacks and logger config groups of molex-train: what they build, and how a bad value
fails (one line naming it, before the model is loaded)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import molex
from molex.cli.common import CLIError
from molex.cli.run_parts import build_callbacks, build_loggers, build_settings, prepare_run
from molex.cli.train import train
from molex.lightning.health import HealthSettings
from molex.training.optim import OptimSettings

CONF = Path(molex.__file__).parent / "conf"
SMOKE = ["experiment=smoke", "data.num_per_task=8", "data.eval_per_task=2", "eval.max_new_tokens=4"]
QUICK = ["eval.before=false", "eval.after=false", "analysis.enabled=false", "trainer.max_steps=2"]


def compose_train(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*SMOKE, f"run_dir={run_dir}", *overrides])


def test_the_overrides_users_know_land_in_the_typed_settings(tmp_path):
    cfg = compose_train(
        tmp_path,
        "optim.lr=2e-3",
        "optim.router_lr_scale=4",
        "optim.warmup_steps=3",
        "health.collapse_share=0.5",
        "health.collapse_logs=2",
        "log_routing_every_n_steps=7",
    )
    assert build_settings(cfg.optim, "optim") == OptimSettings(
        lr=2e-3, weight_decay=0.0, betas=(0.9, 0.999), warmup_steps=3, min_lr_ratio=0.1, router_lr_scale=4.0
    )
    assert build_settings(cfg.health, "health") == HealthSettings(
        log_every_n_steps=7, collapse_share=0.5, collapse_logs=2
    )


def test_the_default_settings_are_the_documented_ones(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"run_dir={tmp_path}"])  # the SmolLM2 run's config
    optim = build_settings(cfg.optim, "optim")
    assert (optim.lr, optim.warmup_steps, optim.min_lr_ratio, optim.router_lr_scale) == (3e-3, 10, 0.1, 10.0)
    assert build_settings(cfg.health, "health") == HealthSettings(log_every_n_steps=20)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=0", r"^optim\.lr: the learning rate must be > 0, got 0$"),
        ("optim.lr=fast", r"^optim\.lr must be a number, got 'fast'$"),
        ("optim.weight_decay=-1", r"^optim\.weight_decay must be >= 0, got -1$"),
        ("optim.warmup_steps=2.5", r"^optim\.warmup_steps: need a whole number warmup_steps >= 0, got 2\.5$"),
        ("optim.min_lr_ratio=2", r"^optim\.min_lr_ratio must satisfy 0 <= min_lr_ratio <= 1, got 2$"),
        ("optim.betas=[0.9]", r"^optim\.betas must be two numbers in \[0, 1\), got \[0\.9\]$"),
        ("optim.router_lr_scale=-2", r"^optim\.router_lr_scale must be a finite number > 0 .*got -2$"),
        ("+optim.momentum=0.9", r"^optim: .*momentum"),
        ("health.collapse_share=1.5", r"^health\.collapse_share must be in \(0, 1\] .*got 1\.5$"),
        ("health.collapse_logs=0", r"^health\.collapse_logs must be >= 1 .*got 0$"),
        ("log_routing_every_n_steps=-1", r"^health\.log_every_n_steps must be >= 0 .*got -1$"),
        ("checkpoint.every_n_train_steps=0", r"^callbacks\.model_checkpoint: checkpoint\.every_n_train_steps=0: "),
        ("trainer.log_every_n_steps=0", r"^callbacks\.progress: trainer\.log_every_n_steps=0"),
    ],
)
def test_a_bad_value_fails_at_the_config_in_one_line(tmp_path, monkeypatch, override, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the bad value was found")

    monkeypatch.setattr("molex.cli.run_parts.build_training", no_model)
    with pytest.raises(CLIError, match=message) as err:
        prepare_run(compose_train(tmp_path, "trainer.enable_progress_bar=true", override))
    assert "\n" not in str(err.value)


def test_default_callbacks_are_the_progress_lines_and_the_checkpoints_with_the_checkpoint_options(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from molex.cli.progress import LineProgress

    cfg = compose_train(tmp_path, "checkpoint.every_n_train_steps=3", "checkpoint.save_weights_only=false")
    progress, checkpoints = build_callbacks(cfg)
    assert isinstance(progress, LineProgress) and progress.every_n_steps == cfg.trainer.log_every_n_steps
    assert isinstance(checkpoints, ModelCheckpoint)
    assert Path(checkpoints.dirpath) == tmp_path / "checkpoints"
    assert checkpoints._every_n_train_steps == 3 and checkpoints.save_top_k == -1
    assert not checkpoints.save_weights_only and checkpoints.save_last
    (only_last,) = build_callbacks(compose_train(tmp_path, "trainer.enable_progress_bar=false"))
    assert only_last._every_n_train_steps == 0 and only_last.save_top_k == 0 and only_last.save_weights_only


def test_a_callback_can_be_added_and_removed_on_the_command_line(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    added = build_callbacks(
        compose_train(
            tmp_path, "+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor", "~callbacks.progress"
        )
    )
    assert [type(c) for c in added] == [ModelCheckpoint, LearningRateMonitor]


def test_logger_choices(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    default = build_loggers(compose_train(tmp_path))
    assert [type(x) for x in default] == [CSVLogger, TensorBoardLogger]
    assert Path(default[0].log_dir) == tmp_path / "logs" and Path(default[1].log_dir) == tmp_path / "tensorboard"
    assert [type(x) for x in build_loggers(compose_train(tmp_path, "logger=csv"))] == [CSVLogger]


def test_a_missing_logger_package_names_the_extra(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.setattr("lightning.pytorch.loggers.wandb._WANDB_AVAILABLE", False)
    with pytest.raises(CLIError, match=r"^logger\.wandb needs the wandb package.*molex-lora\[loggers\]"):
        build_loggers(compose_train(tmp_path, "logger=wandb"))
    # the default's TensorBoard logger alone is left out (CSV only), as before the logger group existed
    monkeypatch.setattr("lightning.fabric.loggers.tensorboard._TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr("lightning.fabric.loggers.tensorboard._TENSORBOARDX_AVAILABLE", False)
    assert [type(x) for x in build_loggers(compose_train(tmp_path))] == [CSVLogger]


needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="wandb is not installed (extra: loggers)"
)
needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="mlflow-skinny is not installed (extra: loggers)"
)


@needs_wandb
def test_wandb_offline_writes_a_local_run_with_the_logged_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose_train(tmp_path, *QUICK, "trainer.log_every_n_steps=1", "logger=wandb"))
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (records,) = run.glob("run-*.wandb")
    deadline = time.monotonic() + 60  # wandb's writer process closes the file just after finish() returns
    while b"train/lm_loss" not in (data := records.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"train/lm_loss" in data and b"train/lr" in data


@needs_mlflow
def test_mlflow_writes_a_file_store_in_the_run_directory_with_the_logged_losses(tmp_path):
    train(compose_train(tmp_path, *QUICK, "trainer.log_every_n_steps=1", "logger=mlflow"))
    (metric,) = (tmp_path / "mlruns").glob("*/*/metrics/train/lm_loss")
    lines = metric.read_text().split()
    assert len(lines) >= 2 and float(lines[1]) > 0  # "<timestamp> <value> <step>" per logged step


@needs_mlflow
def test_loggers_combine_as_a_list_of_groups(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger

    loggers = build_loggers(compose_train(tmp_path, "logger=[tensorboard,mlflow]"))
    assert [type(x) for x in loggers] == [CSVLogger, TensorBoardLogger, MLFlowLogger]
