"""Routers shared by several MoLE layers, deciding once per sequence (MiLoRA, DLP-LoRA).

A shared router is one module with one decision per input sequence:

* ``scope = Scope.BLOCK`` (MiLoRA): one router per decoder block, registered on the block as
  ``mole_router``; its experts are the block's MoLE layers. A forward pre-hook on the block shows
  it the block input, from which it decides at prefill.
* ``scope = Scope.MODEL`` (DLP-LoRA): one router for the whole model, registered on the root as
  ``mole_router``; every MoLE layer applies the same decision to its own experts.

The decision is computed once per generation (``RoutingContext.generation``, incremented at each
prefill) and reused by every decode step, so ``generate()`` pays the scoring cost once. Each MoLE
layer reads it through a :class:`SharedRouterView` (its ``router_view``): the layer code has one
path whatever the router's scope. :mod:`molex.layer.placement` builds and places them in a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from molex.core.losses import masked_mean
from molex.core.refs import set_unregistered
from molex.routers.base import Router, RouterConfig, RoutingDecision, Scope

if TYPE_CHECKING:
    from molex.layer.context import RoutingContext

__all__ = ["ROUTER_ATTR", "SharedRouter", "SharedRouterView", "pool_sequences", "sequence_layout"]

#: attribute under which a shared router is registered on its block / the root model
ROUTER_ATTR = "mole_router"


def sequence_layout(num_tokens: int, context: RoutingContext | None) -> tuple[int, int]:
    """``(B, S)`` of ``num_tokens`` flattened tokens: the context's layout, else one sequence."""
    if context is not None and context.matches(num_tokens):
        return context.batch_size, context.seq_len
    return 1, num_tokens


def pool_sequences(x: Tensor, context: RoutingContext | None) -> Tensor:
    """Mean of ``x [T, d]`` over each sequence's prompt tokens: ``[B, d]`` (float32).

    Prompt tokens are the attention mask of this step intersected with ``prompt_mask`` when
    given (``RoutingContext.sequence_mask``); without a context ``x`` is one sequence.
    """
    batch, seq = sequence_layout(x.shape[0], context)
    mask = context.sequence_mask() if context is not None and context.matches(x.shape[0]) else None
    return masked_mean(x.float().view(batch, seq, -1), mask, dim=1)


class SharedRouter(Router):
    """Base class of block- and model-scoped routers: a per-sequence decision cached per generation.

    ``forward(x, context)`` returns the decision for the current sequences (``indices/weights
    [B, k]``, ``tokens_per_sequence`` set). :meth:`decision_for` returns the cached one, computing
    it at a prefill through :meth:`prefill_decision`.
    """

    def __init__(self, *, in_features: int, num_experts: int, config: RouterConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        self.context: RoutingContext | None = None  # set when placed in a model
        self._cache: tuple[int, RoutingDecision, Tensor | None] | None = None

    def decides_per_sequence(self) -> bool:
        return True

    def prefill_decision(self, context: RoutingContext) -> RoutingDecision:
        """The decision of a new generation; block routers get it from their block's input instead."""
        raise RuntimeError(
            f"router {self.name!r} decides from its block's input, which it has not seen in this forward; "
            "it must be placed by molex.inject (which hooks the block)"
        )

    def is_stale(self, context: RoutingContext) -> bool:
        return self._cache is None or (context.is_prefill and self._cache[0] != context.generation)

    def store(self, context: RoutingContext, decision: RoutingDecision) -> None:
        gates = None
        if self.scope is Scope.BLOCK:  # [B, M]: gate of every module, gathered once per generation
            gates = decision.weights.new_zeros(decision.indices.shape[0], self.num_experts)
            gates = gates.scatter_add(1, decision.indices, decision.weights)
        self._cache = (context.generation, decision, gates)

    def decision_for(self, num_tokens: int) -> tuple[RoutingDecision, Tensor | None]:
        """The current generation's decision (and module gates for block routers)."""
        context = self.context
        if context is None:
            raise RuntimeError(f"router {self.name!r} is not placed in a model; use molex.inject")
        if self.is_stale(context):
            if not context.is_prefill:
                raise RuntimeError(
                    f"router {self.name!r} decides at the prefill of a generation, but this forward continues a "
                    "KV cache it never saw; start with the prompt (no past_key_values)"
                )
            self.store(context, self.prefill_decision(context))
        _, decision, gates = self._cache
        rows = decision.indices.shape[0]
        if num_tokens % rows or (context.batch_size is not None and context.batch_size != rows):
            raise RuntimeError(
                f"router {self.name!r} decided for {rows} sequences at prefill but this forward has "
                f"{context.batch_size} ({num_tokens} tokens); a changed batch needs a new prefill"
            )
        return decision, gates

    def clear(self) -> None:
        """Forget the cached decision (and the graph it holds)."""
        self._cache = None


class SharedRouterView(nn.Module):
    """What one MoLE layer sees of a shared router: its own per-sequence gate as a decision.

    ``module_index`` is the layer's place among its block's modules (block routers) or ``None``
    (model routers: the layer takes the decision over its own experts as is). With a block router
    every one of the layer's ``num_experts`` experts gets the module's gate (the experts of one
    module together form its LoRA); a module the router did not select gets weight 0.
    ``report_losses``: whether this layer reports the router's auxiliary losses (exactly one does).
    """

    router: SharedRouter  # an unregistered reference (see molex.core.refs)

    def __init__(self, router: SharedRouter, *, module_index: int | None, num_experts: int, report_losses: bool):
        super().__init__()
        # not a submodule: the router's weights belong to its block / the root (see molex.core.refs)
        set_unregistered(self, "router", router)
        self.module_index = module_index
        self.num_experts = num_experts
        self.report_losses = report_losses
        self._last: tuple[RoutingDecision, int, RoutingDecision] | None = None

    @property
    def name(self) -> str:
        return self.router.name

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        """``x [T, in]`` (only ``T`` is used) -> decision ``[B, k]`` with ``tokens_per_sequence = T / B``."""
        num_tokens = x.shape[0]
        decision, gates = self.router.decision_for(num_tokens)
        if self._last is not None and self._last[0] is decision and self._last[1] == num_tokens:
            return self._last[2]  # decode steps: the same view of the same decision, built once
        rows = decision.indices.shape[0]
        if self.module_index is None:
            indices, weights, probs = decision.indices, decision.weights, decision.probs
        else:
            weights = gates[:, self.module_index : self.module_index + 1].expand(rows, self.num_experts)
            indices = torch.arange(self.num_experts, device=weights.device).expand(rows, -1)
            probs = None
        mask = self.router.context.token_mask(num_tokens)
        losses = decision.aux_losses if self.report_losses else {}
        view = RoutingDecision(indices, weights, losses, num_tokens // rows, probs, mask)
        self._last = (decision, num_tokens, view)
        return view

    def last_router_decision(self) -> RoutingDecision | None:
        """The shared router's own decision (over its modules for block routers) as laid over the tokens of
        this view's last forward (``tokens_per_sequence`` and token mask of that forward); for statistics."""
        if self._last is None:
            return None
        decision, _, view = self._last
        return RoutingDecision(
            decision.indices, decision.weights, {}, view.tokens_per_sequence, decision.probs, view.token_mask
        )

    def extra_repr(self) -> str:
        return f"router={self.name!r}, module_index={self.module_index}"
