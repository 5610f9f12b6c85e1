"""Instruction data: the built-in multi-task set, prompt templates, collation and the Lightning data module.

``molex.data.builtin``, ``templates`` and ``collate`` need only torch; ``InstructionDataModule`` needs
Lightning and ``datasets`` and is imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TASKS", "InstructionDataModule", "make_builtin_dataset"]

_LAZY = {
    "InstructionDataModule": "molex.data.datamodule",
    "TASKS": "molex.data.builtin",
    "make_builtin_dataset": "molex.data.builtin",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'molex.data' has no attribute {name!r}")
