"""Inputs the bad-input tests share (here, since no test module imports another): a small injected model,
its batch, and files and configs that are wrong in one way each."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import molex
from tests.helpers.models import tiny_llama

__all__ = ["BATCH", "IDS", "auto", "export", "injected", "latin1", "raised"]

IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])  # [B=2, S=5]
BATCH = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}


def injected(router: str = "topk", **options: Any) -> torch.nn.Module:
    """A 2-layer tiny Llama with MoLE on q_proj and v_proj (4 experts per layer)."""
    model = tiny_llama(num_layers=2)
    config = molex.MoLEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, router=router, router_options=options)
    return molex.inject(model, config)


def raised(run: Callable[[], Any], message: str) -> Any:
    """``run()`` with the warning starting ``message`` raised as an error, so a table row can assert it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=message)
        return run()


def auto(**allocation: Any) -> molex.MoLEConfig:
    """A config with ``AllocationConfig(schedule="auto", **allocation)``."""
    return molex.MoLEConfig(
        target_modules=["q_proj", "v_proj"], allocation=molex.AllocationConfig(schedule="auto", **allocation)
    )


def latin1(tmp_path: Path, suffix: str = ".jsonl") -> Path:
    """A data file written in Latin-1: its first non-ASCII byte, the 0xe9 of "cafe" with an accent, sits at
    offset 20 of line 1 (.jsonl), 21 of line 1 (.json) or 40 of line 2 (.csv)."""
    texts = {
        ".jsonl": '{"instruction": "caf\u00e9", "output": "x"}\n',
        ".json": '[{"instruction": "caf\u00e9", "output": "x"}]',
        ".csv": "output,instruction\nxxxxxxxxxxxxxxxxx,caf\u00e9\n",
    }
    path = tmp_path / f"train{suffix}"
    path.write_bytes(texts[suffix].encode("latin-1"))
    return path


def export(tmp_path: Path, batches: Any) -> Any:
    """``export_single`` of an injected tiny Llama (its experts' B made non-zero, as if trained) over ``batches``."""
    model = injected()
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.02)
    return molex.export_single(model, tmp_path / "single", batches, rank=2)
