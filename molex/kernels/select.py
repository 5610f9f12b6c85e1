"""Backend selection: an explicit choice wins, then ``MOLEX_KERNEL_BACKEND``, then the cost model.

The cost model asks every available automatic backend for its own estimate (the ``cost`` it
registered, see :mod:`molex.kernels.cost`) and takes the cheapest; ties go to the first name in
sorted order. Picks are cached per shape: every MoLE layer asks at every step.
"""

from __future__ import annotations

import functools
import math
import os

from torch import Tensor

from molex.core.decision import RoutingDecision
from molex.kernels.cost import Workload
from molex.kernels.registry import auto_candidates, find_backend, get_backend

__all__ = ["ENV_VAR", "estimate_cost", "resolve_backend"]

ENV_VAR = "MOLEX_KERNEL_BACKEND"


def estimate_cost(
    backend: str,
    *,
    tokens: int,
    in_features: int,
    out_features: int,
    num_experts: int,
    rank: int,
    top_k: int,
    device_type: str,
    num_sequences: int | None = None,
    element_size: int = 4,
    shared_a: bool = False,
) -> float:
    """Estimated seconds for one forward of ``backend`` (only relative values matter; ``inf`` for
    an unknown backend or one that is never chosen for this workload).

    ``num_sequences``: the number of sequences of a per-sequence decision (``None`` for a
    per-token decision, for which ``per_seq`` is not a candidate). ``element_size``: bytes per
    element of ``x`` (decides whether the slot buffers fit in cache). ``shared_a``: the experts
    share one down-projection.
    """
    found = find_backend(backend)
    if found is None:
        return math.inf
    workload = Workload(
        tokens=tokens,
        in_features=in_features,
        out_features=out_features,
        num_experts=num_experts,
        rank=rank,
        top_k=top_k,
        device_type=device_type,
        num_sequences=num_sequences,
        element_size=element_size,
        shared_a=shared_a,
    )
    return found.cost(workload)


def resolve_backend(requested: str | None, x: Tensor, A: Tensor, B: Tensor, decision: RoutingDecision) -> str:
    """The backend name to run for this call (``requested`` may be ``None`` or ``"auto"``)."""
    name = requested or "auto"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name != "auto":
        get_backend(name)  # validates the name and availability with a clear message
        return name
    num_experts, rank, out_features = B.shape
    in_features = A.shape[-1]
    return _cheapest(
        auto_candidates(),
        tokens=x.shape[0],
        in_features=in_features,
        out_features=out_features,
        num_experts=num_experts,
        rank=rank,
        top_k=decision.top_k,
        device_type=x.device.type,
        num_sequences=decision.indices.shape[0] if decision.is_per_sequence else None,
        element_size=x.element_size(),
        shared_a=A.shape[0] != num_experts,
    )


@functools.lru_cache(maxsize=4096)
def _cheapest(candidates: tuple[str, ...], **dims) -> str:
    # cached: every MoLE layer asks at every step (decode steps repeat the same few shapes)
    return min(candidates, key=lambda b: estimate_cost(b, **dims))
