"""Distributed data parallel on CPU: two gloo processes through ``molex-train trainer=ddp``."""

from __future__ import annotations

import json

import torch

import molex
from tests.helpers.cli import SMOKE, run_cli


def test_two_process_ddp_trains_and_rank_zero_saves(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        "molex.cli.train",
        *SMOKE,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "eval.before=false",
        "eval.after=false",
        "analysis.enabled=false",
        "checkpoint.every_n_train_steps=3",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3
    # the checkpoint of rank 0 equals the adapter it saved after training: one set of weights
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    from molex.models import load_model

    model = molex.load_adapter(load_model("tiny-llama")[0], run / "adapter")
    adapter = molex.adapter_state_dict(model)
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in adapter}
    for key, value in adapter.items():
        torch.testing.assert_close(ckpt["state_dict"][f"model.{key}"], value, rtol=0, atol=0)
