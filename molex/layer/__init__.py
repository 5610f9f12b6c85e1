"""Layer 3, the MoLE layer: its config, expert pool, routing context, injection into a model, adapter files
and routing health. Submodules are imported on use, so the package itself imports nothing."""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    # ``from molex.layer import MoLELinear`` kept working when molex/layer.py became this package
    if name == "MoLELinear":
        return importlib.import_module("molex.layer.linear").MoLELinear
    raise AttributeError(f"module 'molex.layer' has no attribute {name!r}")
