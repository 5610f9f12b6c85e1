"""megablocks backend (CUDA, ``pip install molex-lora[gpu]``): megablocks' gather / scatter and
grouped_gemm's ``gmm`` for the shrink and expand.

Slots are sorted by expert exactly as in :mod:`molex.kernels.backends.grouped`; megablocks' ``gather``
copies token rows into expert order, ``gmm`` runs the per-expert GEMMs (it needs the group sizes
on the host: one sync), and ``scatter`` applies the routing weights while summing each token's
slots back. All three carry their own autograd. Neither package is imported until this backend
is selected, explicitly or by the cost model on CUDA.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from molex.core.decision import RoutingDecision
from molex.kernels.backends.grouped import sort_slots
from molex.kernels.common import expert_scaled_weights
from molex.kernels.cost import Workload
from molex.kernels.registry import Backend, installed, register_backend

INSTALL_HINT = "pip install molex-lora[gpu]  (installs megablocks and grouped_gemm; needs a CUDA toolchain)"


def is_available() -> bool:
    if not torch.cuda.is_available():
        return False
    return all(installed(name) for name in ("megablocks", "grouped_gemm"))


def unavailable_reason() -> str:
    if not torch.cuda.is_available():
        return "megablocks kernels need a CUDA device"
    missing = [name for name in ("megablocks", "grouped_gemm") if not installed(name)]
    return f"missing {', '.join(missing)}: {INSTALL_HINT}"


def _import():
    try:
        from grouped_gemm.ops import gmm
        from megablocks import ops
    except ImportError as err:
        raise ImportError(f"the megablocks kernel backend needs megablocks and grouped_gemm: {INSTALL_HINT}") from err
    return ops, gmm


def megablocks_delta(x: Tensor, A: Tensor, B: Tensor, decision: RoutingDecision, scaling: float | Tensor) -> Tensor:
    """Shapes: ``x [T, in]``, ``A [E, r, in]``, ``B [E, r, out]`` -> ``[T, out]`` (CUDA tensors)."""
    ops, gmm = _import()
    indices, weights = expert_scaled_weights(decision, scaling)
    top_k = indices.shape[1]
    if indices.numel() == 0:  # megablocks' kernels do not take empty launches
        return x.new_zeros(x.shape[0], B.shape[-1])
    order, offsets = sort_slots(indices, A.shape[0])
    # megablocks' kernels index with int32: slot ids, their expert ids and the cumulative bin ends
    slot_ids = order.to(torch.int32)
    bin_ids = indices.reshape(-1)[order].to(torch.int32)
    bins = offsets.to(torch.int32)
    group_sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).cpu()  # gmm wants host sizes
    xs = ops.gather(x.contiguous(), slot_ids, bin_ids, bins, top_k)  # [N, in], expert order
    h = gmm(xs, A.contiguous(), group_sizes, trans_b=True)  # [N, r]
    y = gmm(h, B.contiguous(), group_sizes)  # [N, out]
    # scatter weights are indexed by the original flat slot id
    return ops.scatter(y, slot_ids, bin_ids, weights.reshape(-1).to(x.dtype), bins, top_k)


def megablocks_cost(w: Workload) -> float:
    """Active FLOPs; ``3 N d c + E r d`` elements; 8 ops, one sync (host group sizes). CUDA only."""
    if not w.on_cuda:
        return math.inf
    return w.hardware.seconds(w.active_flops, 3 * w.slots * w.d * w.spill + w.weights, 8, 1)


register_backend(
    Backend(
        "megablocks",
        megablocks_delta,
        "megablocks gather/scatter + grouped_gemm gmm (CUDA, the gpu extra)",
        is_available=is_available,
        unavailable_reason=unavailable_reason(),
        cost=megablocks_cost,
    )
)
