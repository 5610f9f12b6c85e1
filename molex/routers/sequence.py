"""Routers shared by several MoLE layers, deciding once per sequence (MiLoRA, DLP-LoRA).

A shared router is one module with one decision per input sequence:

* ``scope = "block"`` (MiLoRA): one router per decoder block, registered on the block as
  ``mole_router``; its experts are the block's MoLE layers. A forward pre-hook on the block shows
  it the block input, from which it decides at prefill.
* ``scope = "model"`` (DLP-LoRA): one router for the whole model, registered on the root as
  ``mole_router``; every MoLE layer applies the same decision to its own experts.

The decision is computed once per generation (``RoutingContext.generation``, incremented at each
prefill) and reused by every decode step, so ``generate()`` pays the scoring cost once. Each MoLE
layer reads it through a :class:`SharedRouterView` (its ``router_view``): the layer code has one
path whatever the router's scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from molex.routers.base import Router, RouterConfig, RoutingDecision

if TYPE_CHECKING:
    from molex.allocation import LayerPlan
    from molex.context import RoutingContext

__all__ = ["SharedRouter", "SharedRouterView", "ROUTER_ATTR", "pool_sequences", "sequence_layout", "place"]

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
    values = x.float().view(batch, seq, -1)
    mask = context.sequence_mask() if context is not None and context.matches(x.shape[0]) else None
    if mask is None:
        return values.mean(1)
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class SharedRouter(Router):
    """Base class of block- and model-scoped routers: a per-sequence decision cached per generation.

    ``forward(x, context)`` returns the decision for the current sequences (``indices/weights
    [B, k]``, ``tokens_per_sequence`` set). :meth:`decision_for` returns the cached one, computing
    it at a prefill through :meth:`prefill_decision`.
    """

    sequence_level = True

    def __init__(self, *, in_features: int, num_experts: int, config: RouterConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        self.context: RoutingContext | None = None  # set when placed in a model
        self._cache: tuple[int, RoutingDecision, Tensor | None] | None = None

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
        if self.scope == "block":  # [B, M]: gate of every module, gathered once per generation
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

    def __init__(self, router: SharedRouter, *, module_index: int | None, num_experts: int, report_losses: bool):
        super().__init__()
        self._router = [router]  # not a submodule: the router's weights belong to its block / the root
        self.module_index = module_index
        self.num_experts = num_experts
        self.report_losses = report_losses
        self._last: tuple[RoutingDecision, int, RoutingDecision] | None = None

    @property
    def router(self) -> SharedRouter:
        return self._router[0]

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

    def extra_repr(self) -> str:
        return f"router={self.name!r}, module_index={self.module_index}"


@dataclass
class Placement:
    """What placing shared routers did, so that ``unload`` can undo it."""

    views: dict[str, SharedRouterView]
    owners: list[nn.Module]  # modules that got a ``mole_router`` attribute
    hooks: list[Any]  # removable hook handles


def _common_parent(names: list[str]) -> str:
    parents = [name.split(".")[:-1] for name in names]
    common: list[str] = []
    for parts in zip(*parents, strict=False):  # stop at the shortest path
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _hidden_size(model: nn.Module, in_features: list[int]) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return max(set(in_features), key=in_features.count)


def _block_input_hook(router: SharedRouter):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
        router.observe(hidden)

    return hook


def place(
    model: nn.Module,
    router_cls: type[SharedRouter],
    plans: list[LayerPlan],
    config: RouterConfig,
    in_features: dict[str, int],
    context: RoutingContext,
) -> Placement:
    """Build the shared routers of ``router_cls.scope`` for the MoLE layers ``plans`` (not yet
    injected), register them and their hooks, and return each layer's view."""
    modules = dict(model.named_modules())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if router_cls.scope == "model":
        counts = sorted({plan.num_experts for plan in plans})
        if len(counts) != 1:
            raise ValueError(
                f"router {router_cls.name!r} makes one choice among the same experts in every layer, but the "
                f"allocation gives layers {counts} experts; use a uniform num_experts"
            )
        hidden = _hidden_size(model, list(in_features.values()))
        router = router_cls(in_features=hidden, num_experts=counts[0], config=config)
        attach = getattr(router, "attach", None)
        if attach is not None:  # routers that read the model itself (e.g. its input embeddings)
            attach(model)
        groups = {"": ([plan.name for plan in plans], router)}
    else:
        by_index: dict[int | None, list[str]] = {}
        for plan in plans:
            by_index.setdefault(plan.layer_index, []).append(plan.name)
        groups = {}
        for names in by_index.values():
            block = _common_parent(names)
            if not block or block in groups:
                raise ValueError(
                    f"router {router_cls.name!r} routes among the MoLE layers of one decoder block, but {names} have "
                    "no common block (numbered decoder layer) of their own; target linear layers inside decoder blocks"
                )
            hidden = _hidden_size(model, [in_features[n] for n in names])
            try:
                router = router_cls(in_features=hidden, num_experts=len(names), config=config)
            except ValueError as err:
                raise ValueError(f"block {block!r} ({len(names)} MoLE modules: {names}): {err}") from None
            groups[block] = (names, router)
    for owner_name in groups:  # validate everything before changing the model
        if hasattr(modules[owner_name], ROUTER_ATTR):
            raise ValueError(f"module {owner_name or type(model).__name__!r} already has a {ROUTER_ATTR!r} attribute")
    placement = Placement(views={}, owners=[], hooks=[])
    num_experts = {plan.name: plan.num_experts for plan in plans}
    for owner_name, (names, router) in groups.items():
        owner = modules[owner_name]
        router.to(device=device, dtype=torch.float32)
        router.context = context
        owner.add_module(ROUTER_ATTR, router)
        placement.owners.append(owner)
        if router_cls.scope == "block":
            placement.hooks.append(owner.register_forward_pre_hook(_block_input_hook(router), with_kwargs=True))
        for i, name in enumerate(names):
            placement.views[name] = SharedRouterView(
                router,
                module_index=i if router_cls.scope == "block" else None,
                num_experts=num_experts[name],
                report_losses=i == 0,
            )
    return placement


def remove(placement: Placement) -> None:
    """Undo :func:`place`: hooks and ``mole_router`` attributes go."""
    for handle in placement.hooks:
        handle.remove()
    for owner in placement.owners:
        delattr(owner, ROUTER_ATTR)
