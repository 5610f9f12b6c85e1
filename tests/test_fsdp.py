"""``molex-train trainer=fsdp`` on two CPU processes (gloo): the adapter, the checkpoints, and resuming.

The reference for the sharded run is one process stepping through the same examples with the same
global batch: each optimizer step takes rank 0's batch and rank 1's batch as two accumulated micro-batches,
which is what data parallelism computes (the mean of the per-process mean losses, not one mean over all
tokens). Tolerance ``atol=1e-5, rtol=1e-4`` in float32: the sharded run sums the two processes'
gradients by a reduce-scatter, the single process by adding the micro-batches' gradients, and the two
orders round differently in the last bits (``benchmarks/RESULTS.md`` has the measured difference).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import molex
from tests.helpers.cli import ROOT, SMOKE

pytestmark = pytest.mark.slow  # every test starts two training processes: minutes on a busy CPU

STEPS = 4
PER_RANK_BATCH = 2
RUN = [
    *SMOKE,
    f"trainer.max_steps={STEPS}",
    "trainer.limit_val_batches=0",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    f"data.batch_size={PER_RANK_BATCH}",
    "eval.before=false",
    "eval.after=false",
    "analysis.enabled=false",
    "log_routing_every_n_steps=0",
    "checkpoint.save_weights_only=false",
    "checkpoint.every_n_train_steps=1",
]
FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "molex.cli.train", *RUN, *FSDP, f"hydra.run.dir={run_dir}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train(run_dir: Path, *extra: str) -> None:
    proc = subprocess.run(_cmd(run_dir, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    _train(run)
    return run


def _single_process_adapter(tmp_path: Path) -> dict[str, torch.Tensor]:
    """One process, one Lightning Trainer: rank 0's and rank 1's batches of each step accumulated."""
    import lightning as L
    from torch.utils.data import DataLoader

    from molex.cli.common import build_training
    from molex.data.sampling import ResumableSampler
    from molex.lightning import MoLEModule
    from tests.helpers.cli import compose_train

    cfg = compose_train(tmp_path, *RUN[len(SMOKE) :])
    built = build_training(cfg)  # seeded as molex-train seeds it: the same initial experts
    dm = built.datamodule
    plain = dm.train_dataloader()  # for its dataset and collate function
    shards = [list(ResumableSampler(plain.dataset, seed=dm.seed, num_replicas=2, rank=r)) for r in (0, 1)]
    b = PER_RANK_BATCH
    batches = [shards[r][k * b : (k + 1) * b] for k in range(STEPS) for r in (0, 1)]
    loader = DataLoader(plain.dataset, batch_sampler=batches, collate_fn=plain.collate_fn)
    module = MoLEModule(
        model=built.model,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps,
        min_lr_ratio=cfg.optim.min_lr_ratio,
        router_lr_scale=cfg.optim.router_lr_scale,
        log_routing_every_n_steps=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=STEPS,
        accumulate_grad_batches=2,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    return molex.adapter_state_dict(module.model)


def test_two_process_fsdp_adapter_equals_the_single_process_one(sharded_run: Path, tmp_path: Path) -> None:
    sharded = load_file(sharded_run / "adapter" / "adapter.safetensors")
    single = _single_process_adapter(tmp_path)
    assert sharded.keys() == single.keys()
    worst = max((sharded[k] - single[k]).abs().max().item() for k in single)
    print(f"FSDP vs one process: max abs difference of adapter tensors {worst:.3e}")
    for key, value in single.items():
        torch.testing.assert_close(sharded[key], value, atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
    assert any(v.abs().max() > 0 for k, v in single.items() if "lora_B" in k)  # it did train
    # the adapter loads onto a fresh base with the public loader
    from molex.models import load_model

    molex.load_adapter(load_model("tiny-llama")[0], sharded_run / "adapter")


def test_sharded_checkpoint_holds_the_adapter_and_its_optimizer_state_only(sharded_run: Path) -> None:
    ckpt = torch.load(sharded_run / "checkpoints" / "last.ckpt", weights_only=True)
    adapter = load_file(sharded_run / "adapter" / "adapter.safetensors")
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in adapter}  # no base weight was gathered into it
    for key, value in adapter.items():
        torch.testing.assert_close(ckpt["state_dict"][f"model.{key}"], value, rtol=0, atol=0)
    trainable = [k for k in adapter if not k.endswith(".scaling")]  # `scaling` is a buffer
    assert len(ckpt["optimizer_states"][0]["state"]) == len(trainable)
    assert not list((sharded_run / "checkpoints").glob(".*.tmp"))  # written through AtomicCheckpointIO


def test_sigkilled_sharded_run_resumes_to_the_uninterrupted_adapter(sharded_run: Path, tmp_path: Path) -> None:
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    target = killed / "checkpoints" / "step-2.ckpt"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:  # a new session: the kill reaches both ranks at once
        proc = subprocess.Popen(_cmd(killed), cwd=ROOT, env=_env(), stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 1200
    while not target.exists():
        assert proc.poll() is None, f"training ended before step 2: {log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no step-2 checkpoint in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _train(resumed, f"ckpt_path={target}")
    expected = load_file(sharded_run / "adapter" / "adapter.safetensors")
    got = load_file(resumed / "adapter" / "adapter.safetensors")
    assert expected.keys() == got.keys()
    worst = max((got[k] - v).abs().max().item() for k, v in expected.items())
    print(f"FSDP resumed after SIGKILL at step 2 vs uninterrupted: max abs difference {worst:.3e}")
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
