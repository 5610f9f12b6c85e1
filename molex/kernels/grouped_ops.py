"""Grouped shrink / expand as ``torch.library`` custom ops with autograd and fake implementations.

The ``T * k`` (token, expert) slots are sorted by expert once (:func:`molex.kernels.backends.grouped.sort_slots`):

* ``order [N]`` (``N = T * k``): the flat slot id ``t * k + j`` of each sorted slot, so the
  slot reads token row ``order // k`` and its result belongs to row ``order`` of a ``[T * k, ...]``
  buffer in the original layout (summing that buffer over ``k`` adds a token's experts up with no
  atomics and no ``index_add``).
* ``offsets [E]`` (int64): cumulative end of each expert's group in the sorted order.

Two forward ops share that layout, with an implementation chosen by name (``impl``): ``"torch"``
(a loop over groups, :mod:`molex.kernels.grouped_torch`) or ``"triton"``
(:mod:`molex.kernels.triton_kernels`). Their backward passes are custom ops too, so
``torch.compile(fullgraph=True)`` traces forward and backward without graph breaks.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from molex.core.registry import Registry

__all__ = ["IMPLS", "grouped_expand", "grouped_expand_backward", "grouped_shrink", "grouped_shrink_backward"]

#: implementation name -> the module (imported on first use) defining shrink, expand and their backwards
IMPLS: Registry[str] = Registry("grouped implementation")
IMPLS.register("torch", "molex.kernels.grouped_torch")
IMPLS.register("triton", "molex.kernels.triton_kernels")


def _impl(name: str) -> ModuleType:
    try:
        module = IMPLS[name]
    except KeyError:
        raise ValueError(f"unknown grouped implementation {name!r}; known: {IMPLS.names()}") from None
    return importlib.import_module(module)


@torch.library.custom_op("molex::grouped_shrink", mutates_args=())
def grouped_shrink(x: Tensor, A: Tensor, order: Tensor, offsets: Tensor, top_k: int, impl: str) -> Tensor:
    """``h [N, r]``: ``h[n] = A[e(n)] @ x[order[n] // k]`` for the sorted slots ``n``."""
    return _impl(impl).shrink(x, A, order, offsets, top_k)


@grouped_shrink.register_fake
def _(x, A, order, offsets, top_k, impl):
    return x.new_empty(order.shape[0], A.shape[1])


@torch.library.custom_op("molex::grouped_shrink_backward", mutates_args=())
def grouped_shrink_backward(
    grad_h: Tensor, x: Tensor, A: Tensor, order: Tensor, offsets: Tensor, top_k: int, impl: str
) -> tuple[Tensor, Tensor]:
    """``(grad_x [T, in], grad_A [E, r, in])`` of :func:`grouped_shrink`; empty experts get zeros."""
    return _impl(impl).shrink_backward(grad_h, x, A, order, offsets, top_k)


@grouped_shrink_backward.register_fake
def _(grad_h, x, A, order, offsets, top_k, impl):
    return x.new_empty(x.shape), A.new_empty(A.shape)


def _shrink_setup(ctx, inputs, output):
    x, A, order, offsets, top_k, impl = inputs
    ctx.save_for_backward(x, A, order, offsets)
    ctx.top_k, ctx.impl = top_k, impl


def _shrink_backward(ctx, grad_h):
    x, A, order, offsets = ctx.saved_tensors
    grad_x, grad_A = grouped_shrink_backward(grad_h.contiguous(), x, A, order, offsets, ctx.top_k, ctx.impl)
    return grad_x, grad_A, None, None, None, None


grouped_shrink.register_autograd(_shrink_backward, setup_context=_shrink_setup)


@torch.library.custom_op("molex::grouped_expand", mutates_args=())
def grouped_expand(
    h: Tensor, B: Tensor, weight: Tensor, order: Tensor, offsets: Tensor, top_k: int, impl: str
) -> Tensor:
    """``out [T, out]``: ``out[t] = sum over slots n of token t of weight[n] * h[n] @ B[e(n)]``."""
    return _impl(impl).expand(h, B, weight, order, offsets, top_k)


@grouped_expand.register_fake
def _(h, B, weight, order, offsets, top_k, impl):
    return h.new_empty(order.shape[0] // top_k, B.shape[-1])


@torch.library.custom_op("molex::grouped_expand_backward", mutates_args=())
def grouped_expand_backward(
    grad_out: Tensor, h: Tensor, B: Tensor, weight: Tensor, order: Tensor, offsets: Tensor, top_k: int, impl: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_h [N, r], grad_B [E, r, out], grad_weight [N])`` of :func:`grouped_expand`."""
    return _impl(impl).expand_backward(grad_out, h, B, weight, order, offsets, top_k)


@grouped_expand_backward.register_fake
def _(grad_out, h, B, weight, order, offsets, top_k, impl):
    return h.new_empty(h.shape), B.new_empty(B.shape), weight.new_empty(weight.shape)


def _expand_setup(ctx, inputs, output):
    h, B, weight, order, offsets, top_k, impl = inputs
    ctx.save_for_backward(h, B, weight, order, offsets)
    ctx.top_k, ctx.impl = top_k, impl


def _expand_backward(ctx, grad_out):
    h, B, weight, order, offsets = ctx.saved_tensors
    grad_h, grad_B, grad_w = grouped_expand_backward(
        grad_out.contiguous(), h, B, weight, order, offsets, ctx.top_k, ctx.impl
    )
    return grad_h, grad_B, grad_w, None, None, None, None


grouped_expand.register_autograd(_expand_backward, setup_context=_expand_setup)
