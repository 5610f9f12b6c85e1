"""Backend selection: an explicit choice wins, then ``MOLEX_KERNEL_BACKEND``, then the cost model.

Cost model (first order): a backend's time ~ FLOPs / throughput + fixed overhead.

* ``dense`` spends ``2 T E r (in + out)`` FLOPs in two large GEMMs and needs no host sync.
* ``reference`` spends ``2 T k r (in + out)`` FLOPs but launches ~4 small ops per expert and
  synchronises with the host once per expert (``nonzero``), so its overhead grows with ``E``.

``dense`` therefore wins while ``E / k`` is small or ``E * r`` is small, and only loses when the
wasted ``(E - k) / E`` share of its FLOPs outweighs the loop's per-expert overhead.
"""

from __future__ import annotations

import os

from torch import Tensor

from molex.kernels.registry import available_backends, get_backend
from molex.routers.base import RoutingDecision

ENV_VAR = "MOLEX_KERNEL_BACKEND"

# Sustained GEMM throughput (FLOP/s) and per-expert fixed overhead (s) of the loop; calibrated on
# a 2-core x86 CPU with benchmarks/bench_layer.py. GPU values: an H100/H200-class device.
_CPU = {"flops": 5.0e10, "loop_overhead": 6.0e-5}
_GPU = {"flops": 4.0e14, "loop_overhead": 4.0e-5}


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
) -> float:
    """Estimated seconds for one forward of ``backend`` (only relative values matter)."""
    hw = _GPU if device_type == "cuda" else _CPU
    if backend == "dense":
        return 2.0 * tokens * num_experts * rank * (in_features + out_features) / hw["flops"]
    if backend == "reference":
        flops = 2.0 * tokens * top_k * rank * (in_features + out_features)
        return flops / (0.5 * hw["flops"]) + num_experts * hw["loop_overhead"]
    return float("inf")


def resolve_backend(requested: str | None, x: Tensor, A: Tensor, B: Tensor, decision: RoutingDecision) -> str:
    """The backend name to run for this call (``requested`` may be ``None`` or ``"auto"``)."""
    name = requested or "auto"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name != "auto":
        get_backend(name)  # validates the name and availability with a clear message
        return name
    num_experts, rank, in_features = A.shape
    dims = dict(
        tokens=x.shape[0],
        in_features=in_features,
        out_features=B.shape[-1],
        num_experts=num_experts,
        rank=rank,
        top_k=decision.top_k,
        device_type=x.device.type,
    )
    # the loop is the correctness baseline, never an automatic choice
    candidates = [b for b in available_backends() if b != "reference"] or ["reference"]
    return min(candidates, key=lambda b: estimate_cost(b, **dims))
