"""Token-, block- and model-level routers and the routing context under FSDP2 and DDP.

Two gloo processes (forked from the test, so nothing is imported again) each train a tiny Llama on
their half of every batch, sharded with :func:`molex.lightning.sharding.shard_model` or wrapped in
``DistributedDataParallel``; the adapter they end with must equal the one a single process gets from the
same steps on the whole batch, with the loss averaged over the two halves (what data parallelism
averages). MiLoRA decides in its block's forward pre-hook and DLP in the first layer it reaches, both
from the routing context the root's pre-hook fills (``prompt_mask`` passes through the wrappers).

Tolerance: float32, ``atol=1e-5, rtol=1e-4``. The two processes' gradients are summed by an all-reduce
(DDP) or a reduce-scatter (FSDP) in another order than the single process's backward adds them, so they
differ in the last bits; Adam divides by ``sqrt(v)`` and a few steps carry that to about 1e-7..1e-6.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import molex
from molex.training.objective import mole_objective
from tests.helpers.models import tiny_llama

pytestmark = pytest.mark.slow  # six pairs of forked processes: about 25 s each on a busy 2-core machine

WORLD = 2
STEPS = 3
LR = 1e-2
JOIN_TIMEOUT = 300  # seconds; a hang fails the test instead of the whole run
ROUTERS = {
    "topk": {},
    "milora": {"top_k": 2},  # one router per block, its experts the block's 4 MoLE layers
    "dlp": {"classifier_hidden": 16, "dropout": 0.0},  # one router for the model
}


def _model(router: str) -> torch.nn.Module:
    model = tiny_llama(num_layers=2)
    torch.manual_seed(1)  # the experts' A factors: the same in every process
    config = molex.MoLEConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank=4,
        num_experts=4,
        router=router,
        router_options=ROUTERS[router],
    )
    return molex.inject(model, config).train()


def _batches() -> list[dict[str, torch.Tensor]]:
    """``STEPS`` batches of 4 sequences of 10 tokens, the last two right-padded, prompts of 4 tokens."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(1, 128, (4, 10), generator=g)
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[2, 7:] = 0
        mask[3, 5:] = 0
        prompt = torch.zeros(4, 10, dtype=torch.long)
        prompt[:, :4] = 1
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": ids.masked_fill(mask == 0, -100),
                "prompt_mask": prompt,
            }
        )
    return out


def _loss(net: torch.nn.Module, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return mole_objective(model, net(**batch), rerun=lambda: net(**batch)).total


def _share(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank::WORLD] for k, v in batch.items()}  # as DistributedSampler deals rows out


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)


def _worker(rank: int, mode: str, router: str, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        from molex.lightning.sharding import gather_adapter, shard_model

        model = _model(router)
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            net = shard_model(model, init_device_mesh("cpu", (WORLD,)))
        else:  # Lightning's DDP default: find_unused_parameters=False
            net = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = _optimizer(model)
        for batch in _batches():
            _loss(net, model, _share(batch, rank)).backward()
            optimizer.step()
            optimizer.zero_grad()
        adapter = gather_adapter(model) if mode == "fsdp" else molex.adapter_state_dict(model)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in adapter.items()}, out)
    except BaseException:
        dist.destroy_process_group()
        raise
    # Exit with `net` alive and no teardown: freeing DDP's reducer and its gloo group joins gloo's thread
    # with the GIL held, while that thread may be freeing a finished work and waiting for the GIL (a
    # deadlock seen once here with torch 2.13).
    os._exit(0)


def _single_process(router: str) -> dict[str, torch.Tensor]:
    model = _model(router)
    optimizer = _optimizer(model)
    for batch in _batches():
        loss = sum(_loss(model, model, _share(batch, r)) for r in range(WORLD)) / WORLD
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return molex.adapter_state_dict(model)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_two_processes_train_the_adapter_one_process_trains(tmp_path: Path, router: str, mode: str) -> None:
    out = tmp_path / "adapter.pt"
    workers = mp.start_processes(
        _worker, args=(mode, router, str(tmp_path / "init"), str(out)), nprocs=WORLD, start_method="fork", join=False
    )
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not workers.join(timeout=5):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish in {JOIN_TIMEOUT} s")
    got, expected = torch.load(out, weights_only=True), _single_process(router)
    assert got.keys() == expected.keys()
    worst = max((got[k] - v).abs().max().item() for k, v in expected.items())
    print(f"{mode} {router}: max abs difference from one process {worst:.3e}")
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
    trained = [k for k in expected if "lora_B" in k or "router" in k]
    assert any(expected[k].abs().max() > 0 for k in trained)  # it did train
