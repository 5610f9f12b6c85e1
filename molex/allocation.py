"""MoLA layer-wise allocation: module paths -> (experts, rank) per MoLE layer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from molex.config import AllocationConfig, MoLEConfig

__all__ = ["LayerPlan", "layer_index", "plan_allocation", "group_of_layer"]

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class LayerPlan:
    """What one MoLE layer gets."""

    name: str
    layer_index: int | None
    num_experts: int
    rank: int


def layer_index(module_name: str) -> int | None:
    """The decoder-layer index in a module path: the first integer path component."""
    match = _INDEX.search(module_name)
    return int(match.group(1)) if match else None


def group_of_layer(index: int, num_layers: int, num_groups: int) -> int:
    """Which of ``num_groups`` equal, contiguous groups layer ``index`` falls in (bottom = 0)."""
    return min(index * num_groups // max(num_layers, 1), num_groups - 1)


def _experts_for(index: int | None, num_layers: int, alloc: AllocationConfig, default: int) -> int:
    if index is None:
        return default
    if alloc.per_layer is not None:
        if len(alloc.per_layer) != num_layers:
            raise ValueError(
                f"allocation per_layer has {len(alloc.per_layer)} entries but the model has {num_layers} layers"
            )
        return int(alloc.per_layer[index])
    pattern = alloc.group_pattern()
    if pattern is None:
        return alloc.num_experts or default
    return int(pattern[group_of_layer(index, num_layers, len(pattern))])


def _first_override(name: str, overrides: dict[str, int]) -> int | None:
    for regex, value in overrides.items():
        if re.search(regex, name):
            return int(value)
    return None


def plan_allocation(module_names: Sequence[str], config: MoLEConfig, num_layers: int | None = None) -> list[LayerPlan]:
    """Experts and rank for each targeted module.

    ``num_layers`` defaults to one more than the largest layer index found in ``module_names``;
    pass the model's ``num_hidden_layers`` when only some layers are targeted.
    """
    alloc = config.allocation or AllocationConfig(num_experts=config.num_experts)
    indices = [layer_index(n) for n in module_names]
    known = [i for i in indices if i is not None]
    if num_layers is None:
        num_layers = max(known) + 1 if known else 1
    plans = []
    for name, index in zip(module_names, indices, strict=True):
        if index is not None and index >= num_layers:
            raise ValueError(f"module {name!r} has layer index {index} but the model has {num_layers} layers")
        experts = _experts_for(index, num_layers, alloc, config.num_experts)
        experts = _first_override(name, alloc.overrides) or experts
        rank = config.rank
        if alloc.rank_per_layer is not None and index is not None:
            if len(alloc.rank_per_layer) != num_layers:
                raise ValueError(
                    f"allocation rank_per_layer has {len(alloc.rank_per_layer)} entries but the model has "
                    f"{num_layers} layers"
                )
            rank = int(alloc.rank_per_layer[index])
        rank = _first_override(name, alloc.rank_overrides) or rank
        plans.append(LayerPlan(name=name, layer_index=index, num_experts=experts, rank=rank))
    return plans
