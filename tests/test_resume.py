"""Exact resume: data order, the training steps' random stream, crash-safe checkpoints, matching settings.

The end-to-end proof is :func:`test_sigkill_mid_epoch_then_at_epoch_boundary_resumes_bit_identical`: a real
``molex-train`` process is killed with SIGKILL twice (mid-epoch, then at an epoch boundary) and the
twice-resumed run must end with an adapter equal, tensor for tensor, to an uninterrupted run's.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import molex
from molex.data.sampling import ResumableSampler
from molex.lightning.rng import TrainingRNG

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ sampler


def test_sampler_order_is_a_function_of_seed_and_epoch():
    a, b = ResumableSampler(range(50), seed=3), ResumableSampler(range(50), seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)  # two processes (or a run and its resumption) agree
    assert sorted(a) == list(range(50))  # one pass is a permutation
    b.set_epoch(3)
    assert list(b) != list(a)  # every epoch has its own order
    assert list(ResumableSampler(range(50), seed=4)) != list(ResumableSampler(range(50), seed=3))


def test_sampler_resumes_mid_epoch_once_then_whole_epochs():
    sampler = ResumableSampler(range(10), seed=0)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.resume_at(1, 4)
    sampler.set_epoch(1)  # Lightning sets the same epoch again before iterating: the position stays
    assert len(sampler) == 10  # Lightning sizes the epoch from this, also on a resumed pass
    assert list(sampler) == epoch1[4:]
    assert list(sampler) == epoch1  # the position applies to one pass only
    sampler.resume_at(1, 10)  # a checkpoint at the epoch's last batch: the next pass is the next epoch
    sampler.set_epoch(2)
    assert sampler.epoch == 2 and sorted(sampler) == list(range(10))
    sampler.resume_at(2, 3)
    sampler.set_epoch(5)  # a position recorded for another epoch does not apply
    assert len(list(sampler)) == 10
    with pytest.raises(ValueError, match="consumed=-1"):
        sampler.resume_at(0, -1)


def test_sampler_shards_every_epoch_across_ranks():
    ranks = [ResumableSampler(range(9), seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(4)
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 5  # padded to equal length, as DistributedSampler does
    assert set(shards[0]) | set(shards[1]) == set(range(9))
    ranks[1].resume_at(4, 2)
    assert list(ranks[1]) == shards[1][2:]


def test_datamodule_records_and_restores_the_training_position():
    from molex.data.datamodule import InstructionDataModule
    from molex.models import load_model

    _, tokenizer = load_model("tiny-llama")
    kw = dict(tokenizer=tokenizer, num_per_task=4, eval_per_task=1, builtin_tasks=["add", "reverse"], batch_size=3)
    dm = InstructionDataModule(**kw)
    assert dm.state_dict() == {}  # not fitting: nothing to record
    loader = dm.train_dataloader()
    epoch1 = [row for batch in _epoch_rows(loader, 1) for row in batch]
    dm.trainer = SimpleNamespace(  # what Lightning exposes mid-fit: epoch 1, two batches of it fetched
        current_epoch=1,
        world_size=1,
        global_rank=0,
        fit_loop=SimpleNamespace(
            epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(ready=2)))
        ),
    )
    state = dm.state_dict()
    assert state["train_position"] == {"epoch": 1, "batches": 2, "batch_size": 3, "examples": 8}

    resumed = InstructionDataModule(**kw)
    resumed.load_state_dict(state)
    rest = [row for batch in resumed.train_dataloader() for row in batch["input_ids"].tolist()]
    assert rest == epoch1[6:]  # the rest of epoch 1, not epoch 0 from the start

    other = InstructionDataModule(**{**kw, "batch_size": 4})
    with pytest.raises(ValueError, match="batches of 3; this data gives 8 rows in batches of 4"):
        other.load_state_dict(state)


def _epoch_rows(loader, epoch: int) -> list[list[list[int]]]:
    loader.sampler.set_epoch(epoch)
    return [batch["input_ids"].tolist() for batch in loader]


# ------------------------------------------------------------------ random stream of the steps


def test_training_rng_is_not_shifted_by_draws_between_steps():
    cpu = torch.device("cpu")

    def run(draws_between: int, stream: TrainingRNG, steps: int) -> list[float]:
        out = []
        for _ in range(steps):
            stream.enter(cpu)
            out.append(torch.rand(()).item())  # what dropout / router noise draw inside a step
            stream.exit(cpu)
            torch.rand(draws_between)  # validation loaders, evaluation, ... between steps
        return out

    torch.manual_seed(0)
    plain = run(0, TrainingRNG(), 4)
    torch.manual_seed(0)
    busy = TrainingRNG()
    assert run(5, busy, 2) == plain[:2]
    saved = busy.state_dict(cpu)
    torch.manual_seed(123)  # a new process, seeded differently
    resumed = TrainingRNG()
    resumed.load_state_dict(saved)
    assert run(3, resumed, 2) == plain[2:]
    with pytest.raises(ValueError, match="'cpu' generator state"):
        resumed.load_state_dict({"cuda": torch.zeros(2)})


# ------------------------------------------------------------------ matching settings


def test_resume_mismatch_names_each_setting_with_both_values():
    from molex.lightning.resume import resume_mismatch, training_record
    from tests.helpers.models import tiny_llama

    def record(**kw):
        cfg = molex.MoLEConfig(target_modules=["q_proj", "v_proj"], rank=4, num_experts=4, **kw)
        return training_record(molex.inject(tiny_llama(num_layers=2), cfg))

    topk = record(router="topk")
    assert resume_mismatch(topk, record(router="topk", kernel_backend="dense")) is None  # same function
    assert resume_mismatch(topk, record(router="soft")) == "router: checkpoint 'topk', requested 'soft'"
    rank = resume_mismatch(record(router="topk", top_k=2), record(router="topk", top_k=1, alpha=8.0))
    assert rank == "top_k: checkpoint 2, requested 1; alpha: checkpoint 16.0, requested 8.0"
    options = resume_mismatch(topk, record(router="topk", router_options={"jitter_noise": 0.1}))
    assert options == "router_options.jitter_noise: checkpoint 0.0, requested 0.1"


# ------------------------------------------------------------------ crash-safe checkpoint files


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_checkpoint_io_leaves_a_loadable_checkpoint_after_any_sigkill(tmp_path):
    from molex.lightning.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": -1, "w": torch.zeros(4)}, path)
    rng = random.Random(0)
    for kill in range(20):
        pid = os.fork()
        if pid == 0:  # child: overwrite the checkpoint with new versions until killed
            try:
                io = AtomicCheckpointIO()
                for step in range(10**6):
                    io.save_checkpoint({"step": step, "w": torch.full((1 << 18,), float(step))}, path)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        ckpt = torch.load(path, weights_only=True)  # old or new, never half-written
        assert torch.all(ckpt["w"] == max(ckpt["step"], 0)), kill
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    AtomicCheckpointIO().save_checkpoint({"step": 0}, path)  # the next run's first save sweeps them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], leftovers
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as readable as any other output


# ------------------------------------------------------------------ the real thing: molex-train, SIGKILL, resume

#: 12 rows of two built-in tasks in batches of 8: two batches per epoch, so odd steps end mid-epoch and even
#: steps at an epoch boundary; dropout and router noise make every step draw random numbers, and validation
#: every 2 steps draws from the global generator between steps
RESUME_RUN = [
    "experiment=smoke",
    "data.builtin_tasks=[add,reverse]",
    "data.num_per_task=12",
    "data.eval_per_task=2",
    "trainer.precision=32-true",
    "trainer.max_steps=8",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "eval.before=false",
    "eval.after=false",
    "analysis.enabled=false",
    "log_routing_every_n_steps=0",
    "checkpoint.save_weights_only=false",
    "checkpoint.every_n_train_steps=1",
    "mole.dropout=0.1",
    "router.options.jitter_noise=0.1",
]


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "molex.cli.train", *RESUME_RUN, f"hydra.run.dir={run_dir}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _train(cwd: Path, run_dir: Path, *extra: str) -> None:
    proc = subprocess.run(_train_cmd(run_dir, *extra), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_after(cwd: Path, run_dir: Path, step: int, *extra: str) -> None:
    """Start a run and SIGKILL it as soon as its step-``step`` checkpoint is in place."""
    target = run_dir / "checkpoints" / f"step-{step}.ckpt"
    log_path = cwd / f"{run_dir.name}.log"
    with open(log_path, "w") as log:  # a file, not a pipe: nobody reads while it runs
        proc = subprocess.Popen(_train_cmd(run_dir, *extra), cwd=cwd, env=_env(), stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while not target.exists():
        assert proc.poll() is None, f"training ended before step {step}: {log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no step-{step} checkpoint after 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_mid_epoch_then_at_epoch_boundary_resumes_bit_identical(tmp_path):
    rng = random.Random()
    mid = rng.choice([1, 3])  # a step that ends mid-epoch
    boundary = rng.choice([s for s in (4, 6) if s > mid])  # a step that ends an epoch, after the first kill
    full, first, second, last = (tmp_path / name for name in ("full", "first", "second", "last"))
    full_log = tmp_path / "full.log"
    with open(full_log, "w") as log:  # runs alongside the killed legs: they share nothing but the CPU
        uninterrupted = subprocess.Popen(_train_cmd(full), cwd=tmp_path, env=_env(), stdout=log, stderr=log)
    _kill_after(tmp_path, first, mid)
    # each leg writes its own folder, so the checkpoint resumed from is the killed leg's own
    _kill_after(tmp_path, second, boundary, f"ckpt_path={first / 'checkpoints' / f'step-{mid}.ckpt'}")
    _train(tmp_path, last, f"ckpt_path={second / 'checkpoints' / f'step-{boundary}.ckpt'}")
    assert uninterrupted.wait(timeout=300) == 0, full_log.read_text()[-3000:]

    from safetensors.torch import load_file

    expected = load_file(full / "adapter" / "adapter.safetensors")
    resumed = load_file(last / "adapter" / "adapter.safetensors")
    assert expected.keys() == resumed.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, (
        f"killed after step {mid} and {boundary}: {len(different)} tensors differ, e.g. {different[:3]}"
    )
    assert any(v.abs().max() > 0 for k, v in expected.items() if "lora_B" in k)  # it did train


def test_cli_refuses_to_resume_under_other_settings_before_training(tmp_path):
    from molex.cli.common import CLIError
    from molex.cli.train import train
    from tests.helpers.cli import compose_train

    quick = ["trainer.max_steps=1", "eval.before=false", "eval.after=false", "analysis.enabled=false"]
    train(compose_train(tmp_path / "a", *quick, "checkpoint.save_weights_only=false"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    for override, message in (
        ("router=soft", "router: checkpoint 'topk', requested 'soft'"),
        ("mole.rank=4", "rank: checkpoint 8, requested 4"),
        ("mole.target_modules=[q_proj]", "target_modules: checkpoint ['q_proj', 'v_proj', 'down_proj'], requested"),
        ("data.batch_size=4", "in batches of 8; this data gives"),
        ("optim.router_lr_scale=1", "was trained with optim.router_lr_scale=10.0; resume with that value"),
    ):
        with pytest.raises(CLIError, match=re.escape(message)) as err:
            train(compose_train(tmp_path / "b", *quick, f"ckpt_path={ckpt}", override))
        assert "\n" not in str(err.value) and str(ckpt) in str(err.value)
        assert not (tmp_path / "b" / "checkpoints").exists()  # refused before training started
