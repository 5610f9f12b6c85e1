"""Placing shared routers in a model: one router per decoder block (MiLoRA) or per model (DLP-LoRA).

:func:`place` builds the routers of a block- or model-scoped router class for the MoLE layers about
to be injected, registers each on its owner (the block, or the root model) as ``mole_router``,
hooks blocks so that their routers see the block input, and gives every layer its
:class:`~molex.routers.sequence.SharedRouterView`. :func:`remove` undoes it. Used by
:mod:`molex.inject`; the routers themselves live in :mod:`molex.routers.sequence`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from molex.routers.base import RouterConfig, Scope
from molex.routers.sequence import ROUTER_ATTR, SharedRouter, SharedRouterView

if TYPE_CHECKING:
    from molex.allocation.plan import LayerPlan
    from molex.layer.context import RoutingContext

__all__ = ["Placement", "place", "remove"]


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
    if router_cls.scope is Scope.MODEL:
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
        if router_cls.scope is Scope.BLOCK:
            placement.hooks.append(owner.register_forward_pre_hook(_block_input_hook(router), with_kwargs=True))
        for i, name in enumerate(names):
            placement.views[name] = SharedRouterView(
                router,
                module_index=i if router_cls.scope is Scope.BLOCK else None,
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
