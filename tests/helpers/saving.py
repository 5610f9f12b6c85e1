"""Adapters with distinct random weights, and the worker that saves one over and over, for the tests that
run several real processes writing one folder."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch

from tests.helpers.models import tiny_llama

__all__ = ["CFG", "adapter_model", "adapter_state", "load_state", "matching", "save_rounds", "siblings"]

CFG = dict(target_modules=["q_proj", "v_proj"], rank=4, num_experts=2, top_k=1)


def adapter_model(seed: int) -> torch.nn.Module:
    """A 2-layer tiny Llama with MoLE layers whose every trainable weight is drawn from ``seed``."""
    import molex

    model = molex.inject(tiny_llama(num_layers=2), molex.MoLEConfig(**CFG))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in molex.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import molex

    return {k: v.clone() for k, v in molex.adapter_state_dict(model).items()}


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors ``molex.load_adapter`` reads from ``folder`` into a fresh base."""
    import molex

    return adapter_state(molex.load_adapter(tiny_llama(num_layers=2), folder))


def matching(state: dict[str, torch.Tensor], candidates: dict[str, dict[str, torch.Tensor]]) -> str:
    """The name of the candidate ``state`` equals on every tensor; fails if none does."""
    for name, expected in candidates.items():
        if state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected):
            return name
    raise AssertionError("the folder loads, but as none of the adapters saved into it")


def siblings(target: Path) -> list[str]:
    """The entries beside ``target`` whose names start with ``.<target name>.`` (molex's transient names)."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def save_rounds(folder: str, seed: int, rounds: int, saves: int, barrier: Any, errors: Any) -> None:
    """Run in a spawned process: per round, wait for everyone, save ``adapter_model(seed)`` into ``folder``
    ``saves`` times, wait again. Every exception goes to the ``errors`` queue as a traceback."""
    import molex

    torch.set_num_threads(1)
    model = adapter_model(seed)
    for _ in range(rounds):
        barrier.wait(timeout=120)
        try:
            for _ in range(saves):
                molex.save_adapter(model, folder)
        except BaseException:
            errors.put(f"seed {seed}: {traceback.format_exc()}")
        barrier.wait(timeout=120)
