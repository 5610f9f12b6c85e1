"""Grouped backend: sort the (token, expert) slots by expert once, grouped GEMMs, weighted sum back.

FLOPs ``2 T k r (in + out)`` (only the chosen experts run), plus a gather of ``x`` and a
per-slot output buffer: the right choice once ``E * r`` is large (fused hubs of many adapters)
and dense would waste ``(E - k) / E`` of its work.

The sort-and-offset step (:func:`sort_slots`) runs once and serves both the shrink
(``h = x A_e^T``) and the expand (``w * h B_e``). GEMMs run through
``torch.nn.functional.grouped_mm`` where this torch supports it for the device and dtype (CUDA,
16-bit, 16-byte aligned rows; its native autograd), and otherwise through the
:mod:`molex.kernels.grouped_ops` custom ops (a loop over groups with a hand-written backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from molex.core.decision import RoutingDecision
from molex.kernels.common import expert_scaled_weights
from molex.kernels.cost import Workload
from molex.kernels.grouped_ops import grouped_expand, grouped_shrink
from molex.kernels.registry import Backend, register_backend

__all__ = ["grouped_cost", "grouped_delta", "grouped_mm_supported", "run_grouped", "sort_slots"]


def sort_slots(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Sort the ``T * k`` slots of ``indices [T, k]`` by expert, without a host sync.

    Returns ``order [T*k]`` (flat slot ids ``t * k + j`` in expert order, stable so each group
    keeps token order) and ``offsets [E]`` (int64 cumulative group ends; ``searchsorted`` rather
    than ``bincount`` keeps the output size static for ``torch.compile``).
    """
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts = torch.arange(num_experts, device=indices.device, dtype=flat.dtype)
    offsets = torch.searchsorted(flat[order], experts, right=True)
    return order, offsets


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: Tensor, A: Tensor, B: Tensor) -> bool:
    """Whether ``grouped_mm`` is usable and worth it here.

    Only on CUDA in 16-bit: on CPU it loops internally (no faster than our loop), rejects int64
    offsets, leaves rows after the last offset uninitialised, fails fp32 backward from broadcast
    gradients and fails to compile in fp32. Its kernels need 16-byte aligned row strides.
    """
    if _grouped_mm_fn() is None or x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    align = 16 // x.element_size()
    return all(d % align == 0 for d in (A.shape[1], A.shape[2], B.shape[2]))


def _grouped_mm_delta(x: Tensor, A: Tensor, B: Tensor, weight: Tensor, order: Tensor, offsets: Tensor, top_k: int):
    mm = _grouped_mm_fn()
    offs = offsets.to(torch.int32)
    xs = x.index_select(0, order // top_k)
    h = mm(xs, A.transpose(1, 2), offs=offs)  # [N, r]
    y = mm(h * weight.unsqueeze(-1), B, offs=offs)  # [N, out]
    slots = torch.zeros_like(y).index_copy(0, order, y)
    return slots.view(-1, top_k, B.shape[-1]).sum(1)


def run_grouped(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    decision: RoutingDecision,
    scaling: float | Tensor,
    *,
    impl: str,
    use_grouped_mm: bool = False,
) -> Tensor:
    """Sort once, then shrink and expand with implementation ``impl`` (``"torch"`` or ``"triton"``)."""
    if not (x.dtype == A.dtype == B.dtype):
        raise TypeError(f"x, A and B must share a dtype; got {x.dtype}, {A.dtype}, {B.dtype}")
    indices, weights = expert_scaled_weights(decision, scaling)
    top_k = indices.shape[1]
    order, offsets = sort_slots(indices, A.shape[0])
    weight = weights.reshape(-1)[order].to(x.dtype)
    if use_grouped_mm and order.numel() > 0:
        return _grouped_mm_delta(x, A, B, weight, order, offsets, top_k)
    h = grouped_shrink(x.contiguous(), A.contiguous(), order, offsets, top_k, impl)
    return grouped_expand(h, B.contiguous(), weight, order, offsets, top_k, impl)


def grouped_delta(x: Tensor, A: Tensor, B: Tensor, decision: RoutingDecision, scaling: float | Tensor) -> Tensor:
    """Shapes: ``x [T, in]``, ``A [E, r, in]``, ``B [E, r, out]`` -> ``[T, out]``."""
    return run_grouped(x, A, B, decision, scaling, impl="torch", use_grouped_mm=grouped_mm_supported(x, A, B))


def grouped_cost(w: Workload) -> float:
    """Active FLOPs; ``3 N d c + E' r d`` elements (gather ``x``, slot buffer, sum; ``c`` the cache
    spill, ``E'`` the experts that receive a slot); ``10 + 4 E'`` ops (the group loop issues 4 GEMMs
    per expert over forward and backward; a constant 12 on CUDA with ``grouped_mm``), one sync."""
    # only experts that receive a slot are read and looped over (few when T is small: decode)
    used = min(w.num_experts, w.slots)
    flops, elems = w.active_flops, 3 * w.slots * w.d * w.spill + used * w.rank * w.d
    ops, syncs = (12, 1) if w.on_cuda else (10 + 4 * used, 1)
    return w.hardware.seconds(flops, elems, ops, syncs)


register_backend(
    Backend("grouped", grouped_delta, "sort slots by expert once, grouped GEMM shrink and expand", cost=grouped_cost)
)
