"""Triton backend: the grouped algorithm with Triton shrink / expand kernels and backward kernels.

Same sort-and-offset step and custom ops as :mod:`molex.kernels.grouped` (so
``torch.compile(fullgraph=True)`` traces it), with ``impl="triton"``: the kernels in
:mod:`molex.kernels.triton_kernels` read token rows in place through the sorted index and apply
the routing weight in the expand epilogue. Runs on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1`` (for tests; far too slow for real use). Importing this module does not
import triton.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from molex.kernels.grouped import run_grouped
from molex.kernels.registry import installed
from molex.routers.base import RoutingDecision


def is_available() -> bool:
    if not installed("triton"):
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason() -> str:
    if not installed("triton"):
        return "triton is not installed (pip install triton)"
    return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly, for testing)"


def triton_delta(x: Tensor, A: Tensor, B: Tensor, decision: RoutingDecision, scaling: float | Tensor) -> Tensor:
    """Shapes: ``x [T, in]``, ``A [E, r, in]``, ``B [E, r, out]`` -> ``[T, out]``."""
    return run_grouped(x, A, B, decision, scaling, impl="triton")
