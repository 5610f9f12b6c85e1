"""Backend selection: an explicit choice wins, then ``MOLEX_KERNEL_BACKEND``, then the cost model.

Cost model: a backend's time ~ ``flops / F + bytes / BW + ops * launch + syncs * sync`` with
per-device-class constants (``F`` sustained GEMM FLOP/s, ``BW`` memory bandwidth, ``launch``
the fixed cost of one op, ``sync`` the cost of one host synchronisation). Per backend, for
``T`` tokens, ``k`` active of ``E`` experts of rank ``r``, ``d = in + out``, ``N = T k`` slots:

=============  =======================  ==============================================  =============
backend        FLOPs                    bytes moved (elements)                          ops / syncs
=============  =======================  ==============================================  =============
``dense``      ``2 T E r d``            ``T d + 2 T E r + E r d``                       5 / 0
``per_seq``    ``2 T k r d``            ``T d + 2 T k r + 2 B k r d`` (weight gather)  6 / 0
``grouped``    ``2 T k r d``            ``3 N d c + E r d`` (gather x, slot buffer, sum) 10 + 4 E / 1
``triton``     ``2 T k r d``            ``N d + T out + E r d`` (rows read in place)    8 / 0
``megablocks`` ``2 T k r d``            ``3 N d c + E r d``                             8 / 1
=============  =======================  ==============================================  =============

``c`` is 1 while the slot buffers fit in the last-level cache and ``spill`` (3 on CPU) beyond.

(the grouped group loop issues 4 GEMMs per expert over forward and backward; on CUDA with
``grouped_mm`` it issues a constant number.) Only relative values matter; backward costs about
twice the forward for every backend, so the forward ratios carry over to training.

**Crossover.** ``dense`` does ``E / k`` times the useful FLOPs but in two large, well-shaped
GEMMs with no sort, no gather and no sync; the grouped backends do only the useful FLOPs but move
``T k`` gathered input rows and ``T k`` output rows. While ``E r`` is a few dozen the skinny
``[T, E r]`` GEMMs are memory bound (their time is reading ``x`` and writing the output, which
every backend pays) and ``dense`` wins; once ``E r`` reaches the thousands (fused hubs of 32-64
adapters of rank 16-64) the wasted ``(E - k) / E`` FLOPs dominate and the grouped backends win.
On the 2-core CPU (``benchmarks/bench_sweep.py --quick``, see ``benchmarks/RESULTS.md``) the
crossover depends on ``T``: while the ``[T k, d]`` slot buffers fit in the 32 MiB L3
(``T k <= 4096`` at ``d = 2048``, fp32) grouped already wins from ``E r = 128`` (``E = 8,
r = 16``); once they spill (``T = 4096, k = 2``) the gathers run ~3x slower and dense is 3.6x
faster than grouped at ``E r = 64``. ``per_seq`` beats both for per-sequence decisions when
sequences are long (the weight gather is amortised over ``S`` tokens). ``triton`` and
``megablocks`` are considered on CUDA only (the Triton interpreter on CPU is for tests).
"""

from __future__ import annotations

import functools
import os

from torch import Tensor

from molex.kernels.registry import available_backends, get_backend
from molex.routers.base import RoutingDecision

ENV_VAR = "MOLEX_KERNEL_BACKEND"

#: per device class: FLOP/s, element bandwidth (elements/s), seconds per op and per host sync, the
#: last-level cache size (bytes) and how much slower gathered/scattered slot buffers move once
#: they spill out of it (random row access defeats the prefetcher). CPU values calibrated on a
#: 2-core AMD EPYC (32 MiB L3) with ``benchmarks/bench_sweep.py --quick --threads 1`` (fp32);
#: CUDA values for an H100/H200-class device (bf16 matmul ~790 TFLOP/s, ~4.3 TB/s copy).
HARDWARE = {
    "cpu": {"flops": 6.0e10, "elems": 2.0e9, "launch": 2.0e-5, "sync": 0.0, "cache": 32 << 20, "spill": 3.0},
    "cuda": {"flops": 5.0e14, "elems": 1.0e12, "launch": 5.0e-6, "sync": 2.0e-5, "cache": 50 << 20, "spill": 1.0},
}


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
) -> float:
    """Estimated seconds for one forward of ``backend`` (only relative values matter).

    ``num_sequences``: the number of sequences of a per-sequence decision (``None`` for a
    per-token decision, for which ``per_seq`` is not a candidate). ``element_size``: bytes per
    element of ``x`` (decides whether the slot buffers fit in cache).
    """
    hw = HARDWARE["cuda" if device_type == "cuda" else "cpu"]
    d = in_features + out_features
    slots = tokens * top_k
    active_flops = 2.0 * tokens * top_k * rank * d
    weights = num_experts * rank * d
    # slot buffers ([T k, in] gathered rows, [T k, out] results) that spill out of cache cost more
    spill = hw["spill"] if slots * max(in_features, out_features) * element_size > hw["cache"] else 1.0
    if backend == "dense":
        flops, elems = 2.0 * tokens * num_experts * rank * d, tokens * d + 2 * tokens * num_experts * rank + weights
        ops, syncs = 5, 0
    elif backend == "per_seq":
        if num_sequences is None:
            return float("inf")
        flops, elems = active_flops, tokens * d + 2 * slots * rank + 2 * num_sequences * top_k * rank * d
        ops, syncs = 6, 0
    elif backend == "grouped":
        # only experts that receive a slot are read and looped over (few when T is small: decode)
        used = min(num_experts, slots)
        flops, elems = active_flops, 3 * slots * d * spill + used * rank * d
        ops, syncs = (12, 1) if device_type == "cuda" else (10 + 4 * used, 1)
    elif backend == "triton":
        if device_type != "cuda":
            return float("inf")
        flops, elems, ops, syncs = active_flops, slots * d + tokens * out_features + weights, 8, 0
    elif backend == "megablocks":
        if device_type != "cuda":
            return float("inf")
        flops, elems, ops, syncs = active_flops, 3 * slots * d * spill + weights, 8, 1
    elif backend == "reference":
        flops, elems = active_flops, 3 * slots * d * spill + weights
        ops, syncs = 2 + 6 * num_experts, num_experts
    else:
        return float("inf")
    return flops / hw["flops"] + elems / hw["elems"] + ops * hw["launch"] + syncs * hw["sync"]


def resolve_backend(requested: str | None, x: Tensor, A: Tensor, B: Tensor, decision: RoutingDecision) -> str:
    """The backend name to run for this call (``requested`` may be ``None`` or ``"auto"``)."""
    name = requested or "auto"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name != "auto":
        get_backend(name)  # validates the name and availability with a clear message
        return name
    num_experts, rank, in_features = A.shape
    return _cheapest(
        _auto_candidates(os.environ.get("TRITON_INTERPRET")),
        tokens=x.shape[0],
        in_features=in_features,
        out_features=B.shape[-1],
        num_experts=num_experts,
        rank=rank,
        top_k=decision.top_k,
        device_type=x.device.type,
        num_sequences=decision.indices.shape[0] if decision.is_per_sequence else None,
        element_size=x.element_size(),
    )


@functools.lru_cache(maxsize=8)
def _auto_candidates(triton_interpret: str | None) -> tuple[str, ...]:
    # availability only changes with TRITON_INTERPRET (the key) within a process; the loop is the
    # correctness baseline, never an automatic choice
    return tuple(b for b in available_backends() if b != "reference") or ("reference",)


@functools.lru_cache(maxsize=4096)
def _cheapest(candidates: tuple[str, ...], **dims) -> str:
    # cached: every MoLE layer asks at every step (decode steps repeat the same few shapes)
    return min(candidates, key=lambda b: estimate_cost(b, **dims))
