"""The named steps of molex-train around the fit (molex.cli.run_outputs, molex.cli.run_parts), one at a time."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from molex.allocation.plan import AllocationConfig
from molex.cli.common import CLIError
from molex.cli.run_outputs import checkpoint_metrics, close_trackers, finish, fit_metrics, write_health
from molex.cli.run_parts import check_auto_allocation, step_checkpoints


def test_fit_metrics_put_the_lm_losses_first_and_copy_the_validation_lm_loss():
    trainer = SimpleNamespace(
        global_step=3,
        callback_metrics={
            "train/aux_loss": torch.tensor(0.5),
            "train/lm_loss": torch.tensor(2.0),
            "val/lm_loss": torch.tensor(1.234567),
            "routing/x": torch.tensor(1.0),
        },
    )
    metrics = fit_metrics(trainer, 1.2345, auto=None)
    assert list(metrics["train"]) == ["steps", "seconds", "train/lm_loss", "val/lm_loss", "train/aux_loss"]
    assert metrics["train"]["seconds"] == 1.23 and metrics["val_lm_loss"] == 1.23457
    assert "allocation" not in metrics
    decided = SimpleNamespace(decision=SimpleNamespace(to_dict=lambda: {"per_layer": [2, 4]}))
    assert fit_metrics(trainer, 0.0, auto=decided)["allocation"] == {"per_layer": [2, 4]}


def test_checkpoint_metrics_compare_the_last_checkpoint_with_the_frozen_base(tmp_path):
    model = nn.Linear(256, 256)  # 65792 float32 parameters, frozen: 257 KiB
    model.requires_grad_(False)
    assert checkpoint_metrics(tmp_path, model) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 65792)
    sizes = checkpoint_metrics(tmp_path, model)
    assert sizes == {
        "last_mib": round(65792 / 2**20, 2),
        "base_model_mib": round(4 * 65792 / 2**20, 2),
        "share_of_base": 0.25,
    }


def test_finish_writes_metrics_and_predictions_and_prints_the_run(tmp_path, capsys):
    metrics = {
        "run_dir": str(tmp_path),
        "after": {"accuracy": 0.5, "per_task": {"a": 0.5}, "predictions": [{"task": "a", "prediction": "x"}]},
        "val_lm_loss": 1.5,
    }
    finish(metrics, tmp_path, time.perf_counter(), ["a"])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert "predictions" not in written["after"] and written["wall_seconds"] >= 0
    assert json.loads((tmp_path / "predictions.json").read_text()) == {"after": [{"task": "a", "prediction": "x"}]}
    out = capsys.readouterr().out
    assert "validation LM loss: 1.5000 (auxiliary losses not included)" in out
    assert f"run directory: {tmp_path}" in out


def test_write_health_leaves_the_summary_alone_without_reads(tmp_path):
    (tmp_path / "summary.txt").write_text("table\n")
    write_health(tmp_path, "table", None)
    write_health(tmp_path, "table", SimpleNamespace(history=[]))
    assert (tmp_path / "summary.txt").read_text() == "table\n" and not (tmp_path / "plots").exists()


def test_close_trackers_finishes_only_an_opened_wandb_run():
    finished = []
    WandbLogger = type("WandbLogger", (), {})  # stands in for Lightning's class, matched by name
    opened, unopened = WandbLogger(), WandbLogger()
    opened._experiment = opened.experiment = SimpleNamespace(finish=lambda: finished.append(1))
    unopened._experiment = None
    close_trackers([opened, unopened, SimpleNamespace()])
    assert finished == [1]


def test_auto_allocation_must_leave_training_after_its_warm_up():
    auto = SimpleNamespace(allocation=AllocationConfig(schedule="auto", total_experts=8, warmup_steps=5))
    check_auto_allocation(6, auto)
    check_auto_allocation(-1, auto)  # no step limit: nothing to compare
    check_auto_allocation(2, SimpleNamespace(allocation=None))
    with pytest.raises(CLIError, match=r"allocation.warmup_steps=5 leaves no training .*trainer.max_steps=5"):
        check_auto_allocation(5, auto)


def test_step_checkpoints_keep_the_last_one_or_every_n(tmp_path):
    last_only = step_checkpoints(dirpath=tmp_path, every_n_train_steps=None, save_weights_only=True)
    assert last_only.save_top_k == 0 and last_only.save_last and last_only.save_weights_only
    every = step_checkpoints(dirpath=tmp_path, every_n_train_steps=2, save_weights_only=False)
    assert every.save_top_k == -1 and every._every_n_train_steps == 2
    with pytest.raises(ValueError, match=r"checkpoint.every_n_train_steps=-1: need a step count >= 1, or null"):
        step_checkpoints(dirpath=tmp_path, every_n_train_steps=-1, save_weights_only=True)
