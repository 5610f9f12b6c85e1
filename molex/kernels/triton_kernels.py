"""Triton implementation of the grouped ops (see :mod:`molex.kernels.grouped_ops`). Imports triton.

Two kernels cover forward and backward:

* ``_gather_mm``: ``y[dst(m)] = scale[m] * x[src(m)] @ W[e]`` over row blocks that each lie in
  one expert's group. Token rows are read in place through the sorted index (no gathered copy
  of ``x``), the routing weight is applied in the epilogue, and results are written straight to
  their slot row (no scatter pass). Shrink, expand, grad-h and grad-x are all this kernel with
  different operands: ``W`` is addressed through strides, so ``A^T`` / ``B^T`` cost nothing.
* ``_group_outer``: ``G[e] = sum over the group's slots m of (scale[m] * a[src_a(m)])^T b[src_b(m)]``,
  the weight gradients ``grad_A`` and ``grad_B``; an empty group stores zeros.

Ranks below 16 (``tl.dot`` needs tiles of at least 16) are handled by masked 16-wide tiles.
Accumulation is float32. fp32 inputs follow ``torch.backends.cuda.matmul.allow_tf32``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from molex.kernels.grouped_torch import row_dot


@triton.jit
def _gather_mm(
    x_ptr,
    w_ptr,
    y_ptr,
    src_ptr,
    dst_ptr,
    scale_ptr,
    block_expert_ptr,
    block_start_ptr,
    block_end_ptr,
    K,
    N,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_ym,
    stride_yn,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    start = tl.load(block_start_ptr + pid_m)
    end = tl.load(block_end_ptr + pid_m)  # == start for padding blocks: everything masked
    offs_m = start + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < end
    if GATHER:
        rows_in = tl.load(src_ptr + offs_m, mask=mask_m, other=0)
    else:
        rows_in = offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            x_ptr + rows_in[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc += tl.dot(a, b, input_precision=PRECISION)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
    if SCATTER:
        rows_out = tl.load(dst_ptr + offs_m, mask=mask_m, other=0)
    else:
        rows_out = offs_m
    tl.store(
        y_ptr + rows_out[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _group_outer(
    a_ptr,
    b_ptr,
    g_ptr,
    src_a_ptr,
    src_b_ptr,
    scale_ptr,
    group_start_ptr,
    group_end_ptr,
    P,
    Q,
    stride_am,
    stride_ap,
    stride_bm,
    stride_bq,
    stride_ge,
    stride_gp,
    stride_gq,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    start = tl.load(group_start_ptr + expert)
    end = tl.load(group_end_ptr + expert)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < end
        if GATHER_A:
            rows_a = tl.load(src_a_ptr + offs_m, mask=mask_m, other=0)
        else:
            rows_a = offs_m
        if GATHER_B:
            rows_b = tl.load(src_b_ptr + offs_m, mask=mask_m, other=0)
        else:
            rows_b = offs_m
        a = tl.load(
            a_ptr + rows_a[:, None] * stride_am + offs_p[None, :] * stride_ap,
            mask=mask_m[:, None] & mask_p[None, :],
            other=0.0,
        )
        if HAS_SCALE:
            scale = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[:, None]).to(a.dtype)
        b = tl.load(
            b_ptr + rows_b[:, None] * stride_bm + offs_q[None, :] * stride_bq,
            mask=mask_m[:, None] & mask_q[None, :],
            other=0.0,
        )
        acc += tl.dot(tl.trans(a), b, input_precision=PRECISION)
    tl.store(
        g_ptr + expert * stride_ge + offs_p[:, None] * stride_gp + offs_q[None, :] * stride_gq,
        acc.to(g_ptr.dtype.element_ty),
        mask=mask_p[:, None] & mask_q[None, :],
    )


def _tile(n: int, cap: int) -> int:
    """Smallest power-of-two tile >= ``n`` within ``[16, cap]`` (``tl.dot`` needs >= 16)."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _config(device: torch.device) -> dict[str, int]:
    # one fixed configuration per device class (autotuning over several fails in the interpreter)
    if device.type == "cuda":
        return {"m": 64, "n": 128, "k": 64}
    return {"m": 32, "n": 32, "k": 32}


def _precision(dtype: torch.dtype) -> str:
    # only fp32 inputs have a choice; 16-bit inputs keep tl.dot's default
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _group_bounds(offsets: Tensor) -> tuple[Tensor, Tensor]:
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])
    return starts, offsets


def _row_blocks(offsets: Tensor, num_slots: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split every group into ``block_m``-row blocks on the device, without a host sync.

    The grid has the host-known upper bound ``ceil(N / block_m) + E`` blocks; blocks past the
    real ones get ``start == end`` and store nothing.
    """
    starts, ends = _group_bounds(offsets)
    num_experts = offsets.shape[0]
    nblocks = (ends - starts + block_m - 1) // block_m
    block_ends = torch.cumsum(nblocks, 0)
    ids = torch.arange(triton.cdiv(num_slots, block_m) + num_experts, device=offsets.device)
    expert = torch.searchsorted(block_ends, ids, right=True)
    valid = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    start = starts[expert] + (ids - (block_ends[expert] - nblocks[expert])) * block_m
    end = ends[expert]
    zero = torch.zeros_like(start)
    return expert, torch.where(valid, start, zero), torch.where(valid, end, zero)


def _gather_matmul(
    x: Tensor,
    w: Tensor,
    w_strides: tuple[int, int, int],
    k_dim: int,
    n_dim: int,
    offsets: Tensor,
    num_rows: int,
    *,
    src: Tensor | None = None,
    dst: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """``y [num_rows, n_dim]`` with ``y[dst(m)] = scale[m] * x[src(m)] @ W[e(m)]``; ``W[e]`` is
    ``[k_dim, n_dim]`` at ``w`` with strides ``w_strides`` (expert, k, n)."""
    y = x.new_empty(num_rows, n_dim)
    if num_rows == 0:
        return y
    cfg = _config(x.device)
    block_n, block_k = _tile(n_dim, cfg["n"]), _tile(k_dim, cfg["k"])
    expert, start, end = _row_blocks(offsets, num_rows, cfg["m"])
    dummy = offsets
    grid = (expert.shape[0], triton.cdiv(n_dim, block_n))
    _gather_mm[grid](
        x,
        w,
        y,
        src if src is not None else dummy,
        dst if dst is not None else dummy,
        scale if scale is not None else dummy,
        expert,
        start,
        end,
        k_dim,
        n_dim,
        x.stride(0),
        x.stride(1),
        *w_strides,
        y.stride(0),
        y.stride(1),
        GATHER=src is not None,
        SCATTER=dst is not None,
        HAS_SCALE=scale is not None,
        PRECISION=_precision(x.dtype),
        BLOCK_M=cfg["m"],
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y


def _outer(
    a: Tensor,
    b: Tensor,
    offsets: Tensor,
    out_shape: torch.Size,
    *,
    src_a: Tensor | None = None,
    src_b: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """``G [E, P, Q]``, ``G[e] = sum_m (scale[m] a[src_a(m)])^T b[src_b(m)]`` over group ``e``."""
    num_experts, p_dim, q_dim = out_shape
    g = a.new_empty(out_shape)
    if g.numel() == 0:
        return g
    cfg = _config(a.device)
    # weight-gradient tiles stay at 64 so three pipeline stages of fp32 fit in shared memory
    cap = min(64, cfg["n"])
    block_p, block_q = _tile(p_dim, cap), _tile(q_dim, cap)
    starts, ends = _group_bounds(offsets)
    dummy = offsets
    grid = (num_experts, triton.cdiv(p_dim, block_p), triton.cdiv(q_dim, block_q))
    _group_outer[grid](
        a,
        b,
        g,
        src_a if src_a is not None else dummy,
        src_b if src_b is not None else dummy,
        scale if scale is not None else dummy,
        starts,
        ends,
        p_dim,
        q_dim,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        g.stride(0),
        g.stride(1),
        g.stride(2),
        GATHER_A=src_a is not None,
        GATHER_B=src_b is not None,
        HAS_SCALE=scale is not None,
        PRECISION=_precision(a.dtype),
        BLOCK_M=cfg["m"],
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
    )
    return g


def shrink(x: Tensor, A: Tensor, order: Tensor, offsets: Tensor, top_k: int) -> Tensor:
    # W[e] = A[e]^T: [in, r]
    strides = (A.stride(0), A.stride(2), A.stride(1))
    return _gather_matmul(x, A, strides, A.shape[2], A.shape[1], offsets, order.shape[0], src=order // top_k)


def shrink_backward(
    grad_h: Tensor, x: Tensor, A: Tensor, order: Tensor, offsets: Tensor, top_k: int
) -> tuple[Tensor, Tensor]:
    rank, in_features = A.shape[1], A.shape[2]
    # grad of each slot's token row, written straight to its slot row, then summed over k
    grad_slots = _gather_matmul(grad_h, A, A.stride(), rank, in_features, offsets, order.shape[0], dst=order)
    grad_x = grad_slots.view(-1, top_k, in_features).sum(1) if top_k > 1 else grad_slots
    grad_A = _outer(grad_h, x, offsets, A.shape, src_b=order // top_k)
    return grad_x, grad_A


def expand(h: Tensor, B: Tensor, weight: Tensor, order: Tensor, offsets: Tensor, top_k: int) -> Tensor:
    rank, out_features = B.shape[1], B.shape[2]
    y = _gather_matmul(h, B, B.stride(), rank, out_features, offsets, order.shape[0], dst=order, scale=weight)
    return y.view(-1, top_k, out_features).sum(1) if top_k > 1 else y


def expand_backward(
    grad_out: Tensor, h: Tensor, B: Tensor, weight: Tensor, order: Tensor, offsets: Tensor, top_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    rank, out_features = B.shape[1], B.shape[2]
    src = order // top_k
    # g = grad_y @ B^T, read from grad_out's token rows in place; W[e] = B[e]^T: [out, r]
    strides = (B.stride(0), B.stride(2), B.stride(1))
    g = _gather_matmul(grad_out, B, strides, out_features, rank, offsets, order.shape[0], src=src)
    grad_B = _outer(h, grad_out, offsets, B.shape, src_b=src, scale=weight)
    grad_w = row_dot(g, h).to(weight.dtype)
    return g * weight.unsqueeze(-1), grad_B, grad_w


__all__ = ["expand", "expand_backward", "shrink", "shrink_backward"]
