"""Plain-torch implementation of the grouped ops (see :mod:`molex.kernels.grouped_ops`).

One host sync per call (``offsets.tolist()``) instead of one per expert as in the reference
loop, and one gather of ``x`` in sorted order; each expert then runs one GEMM on a contiguous
slice. On CPU this is as fast as ``torch.nn.functional.grouped_mm`` (which loops internally) and
has none of its restrictions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _groups(offsets: Tensor) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every non-empty group."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends, strict=True)) if t > s]


def sum_slots(rows: Tensor, order: Tensor, top_k: int) -> Tensor:
    """Sorted per-slot rows ``[N, d]`` -> per-token sums ``[N / k, d]`` in one pass over ``rows``."""
    tokens = rows.new_empty(order.shape[0] // top_k, rows.shape[-1])
    if top_k == 1:  # every token has exactly one slot
        return tokens.index_copy_(0, order, rows)
    return tokens.zero_().index_add_(0, order // top_k, rows)


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products, accumulated in at least float32."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dtype) * b.to(dtype)).sum(-1)


def shrink(x: Tensor, A: Tensor, order: Tensor, offsets: Tensor, top_k: int) -> Tensor:
    xs = x.index_select(0, order // top_k)
    h = x.new_empty(order.shape[0], A.shape[1])
    for e, s, t in _groups(offsets):
        torch.mm(xs[s:t], A[e].t(), out=h[s:t])
    return h


def shrink_backward(
    grad_h: Tensor, x: Tensor, A: Tensor, order: Tensor, offsets: Tensor, top_k: int
) -> tuple[Tensor, Tensor]:
    xs = x.index_select(0, order // top_k)
    grad_xs = x.new_empty(order.shape[0], x.shape[1])
    grad_A = torch.zeros_like(A)
    for e, s, t in _groups(offsets):
        torch.mm(grad_h[s:t], A[e], out=grad_xs[s:t])
        torch.mm(grad_h[s:t].t(), xs[s:t], out=grad_A[e])
    return sum_slots(grad_xs, order, top_k), grad_A


def expand(h: Tensor, B: Tensor, weight: Tensor, order: Tensor, offsets: Tensor, top_k: int) -> Tensor:
    hw = h * weight.unsqueeze(-1)
    y = h.new_empty(order.shape[0], B.shape[-1])
    for e, s, t in _groups(offsets):
        torch.mm(hw[s:t], B[e], out=y[s:t])
    return sum_slots(y, order, top_k)


def expand_backward(
    grad_out: Tensor, h: Tensor, B: Tensor, weight: Tensor, order: Tensor, offsets: Tensor, top_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    grad_ys = grad_out.index_select(0, order // top_k)  # [N, out]
    hw = h * weight.unsqueeze(-1)
    g = h.new_empty(h.shape)  # d/d(hw) = grad_y @ B^T
    grad_B = torch.zeros_like(B)
    for e, s, t in _groups(offsets):
        torch.mm(grad_ys[s:t], B[e].t(), out=g[s:t])
        torch.mm(hw[s:t].t(), grad_ys[s:t], out=grad_B[e])
    grad_w = row_dot(g, h).to(weight.dtype)
    return g * weight.unsqueeze(-1), grad_B, grad_w
