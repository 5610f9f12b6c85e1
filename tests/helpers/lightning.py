"""A small Lightning rig: synthetic task-dependent batches, a MoLEModule on the tiny Llama, a quiet Trainer."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

import molex
from molex.lightning import MoLEModule
from molex.lightning.health import HealthSettings
from molex.training import OptimSettings
from tests.helpers.models import tiny_llama

__all__ = ["TARGETS", "loader", "make_module", "synthetic_batches", "trainer"]

TARGETS = ["q_proj", "v_proj", "down_proj"]


def synthetic_batches(num: int = 16, seq: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Examples whose continuation depends on the task id, with left padding on some rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num):
        task = i % 3
        ids = torch.randint(4, 128, (seq,), generator=gen)
        ids[seq // 2 :] = (ids[: seq - seq // 2] + 7 * (task + 1)) % 124 + 4
        mask = torch.ones(seq, dtype=torch.long)
        if i % 4 == 0:
            ids[:2], mask[:2] = 0, 0
        labels = ids.clone()
        labels[: seq // 2] = -100
        labels[mask == 0] = -100
        prompt = torch.zeros(seq, dtype=torch.bool)
        prompt[: seq // 2] = True
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": labels,
                "task_ids": torch.tensor(task),
                "prompt_mask": prompt & mask.bool(),
            }
        )
    return rows


def loader(batch_size: int = 4, **kw) -> DataLoader:
    return DataLoader(synthetic_batches(**kw), batch_size=batch_size, shuffle=False)


def make_module(router: str = "topk", **options) -> MoLEModule:
    cfg = molex.MoLEConfig(target_modules=TARGETS, rank=4, num_experts=4, router=router, router_options=options)
    return MoLEModule(
        model=lambda: tiny_llama(num_layers=2),
        mole_config=cfg,
        optim=OptimSettings(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1),
        health=HealthSettings(log_every_n_steps=1),
    )


def trainer(tmp_path, **kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    defaults.update(kw)
    return L.Trainer(**defaults)
