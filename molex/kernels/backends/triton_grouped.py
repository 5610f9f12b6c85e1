"""Triton backend: the grouped algorithm with Triton shrink / expand kernels and backward kernels.

Same sort-and-offset step and custom ops as :mod:`molex.kernels.backends.grouped` (so
``torch.compile(fullgraph=True)`` traces it), with ``impl="triton"``: the kernels in
:mod:`molex.kernels.triton_kernels` read token rows in place through the sorted index and apply
the routing weight in the expand epilogue. Runs on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1`` (for tests; far too slow for real use). Importing this module does not
import triton.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from molex.core.decision import RoutingDecision
from molex.kernels.backends.grouped import run_grouped
from molex.kernels.cost import Workload
from molex.kernels.registry import Backend, installed, register_backend


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


def triton_cost(w: Workload) -> float:
    """Active FLOPs; ``N d + T out + E r d`` elements (token rows read in place); 8 ops, no sync.
    CUDA only (the interpreter on CPU is for tests)."""
    if not w.on_cuda:
        return math.inf
    elems = w.slots * w.d + w.tokens * w.out_features + w.weights
    return w.hardware.seconds(w.active_flops, elems, 8, 0)


register_backend(
    Backend(
        "triton",
        triton_delta,
        "Triton grouped shrink/expand kernels reading token rows in place, with backward kernels",
        is_available=is_available,
        unavailable_reason=unavailable_reason(),
        cost=triton_cost,
        env_vars=("TRITON_INTERPRET",),
    )
)
