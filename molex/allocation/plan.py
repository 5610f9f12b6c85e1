"""MoLA layer-wise allocation: module paths -> (experts, rank) per MoLE layer.

A *schedule* gives the experts of one decoder layer from its index; schedules are registered by
name (:func:`register_schedule`), so a new one is one more registration, and
:class:`AllocationConfig` validates its ``schedule`` against the registry.

``schedule="auto"`` decides the counts from the model and the data: it holds the even split of
``total_experts`` until a short warm-up has measured each layer (:mod:`molex.allocation.auto`), which
then records its decision as ``per_layer``. Imports nothing of molex at run time but the pure
:mod:`molex.allocation.budget`: :mod:`molex.layer.config` builds on it.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from molex.allocation.budget import apportion
from molex.core.registry import Registry

__all__ = [
    "AUTO_MAX_EXPERTS",
    "AUTO_WARMUP_STEPS",
    "SCHEDULES",
    "AllocationConfig",
    "LayerPlan",
    "Schedule",
    "auto_bounds",
    "auto_total",
    "get_schedule",
    "group_of_layer",
    "group_schedule",
    "layer_index",
    "layers_spanned",
    "plan_allocation",
    "register_schedule",
]

#: warm-up steps of ``schedule="auto"`` when ``warmup_steps`` is not given
AUTO_WARMUP_STEPS = 20
#: the most experts ``schedule="auto"`` gives one layer when ``max_experts`` is not given: without a cap a
#: mistyped ``total_experts`` (1_000_000 for 1_000) would build that many experts in every targeted module
AUTO_MAX_EXPERTS = 64

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")

#: ``schedule(layer_index, num_layers, allocation, default) -> experts`` for one decoder layer;
#: ``default`` is ``MoLEConfig.num_experts``
Schedule = Callable[[int, int, "AllocationConfig", int], int]

#: registered schedules by name (use :func:`register_schedule` to add one)
SCHEDULES: Registry[Schedule] = Registry(
    "allocation schedule", how_to_register="Register your own with molex.allocation.plan.register_schedule."
)


def register_schedule(name: str, schedule: Schedule, *, replace: bool = False) -> Schedule:
    """Make ``schedule`` available as ``AllocationConfig(schedule=name)``."""
    return SCHEDULES.register(name, schedule, replace=replace)


def get_schedule(name: str) -> Schedule:
    return SCHEDULES.get_or_raise(name)


def group_of_layer(index: int, num_layers: int, num_groups: int) -> int:
    """Which of ``num_groups`` equal, contiguous groups layer ``index`` falls in (bottom = 0)."""
    return min(index * num_groups // max(num_layers, 1), num_groups - 1)


def group_schedule(*experts: int) -> Schedule:
    """Schedule giving ``experts[g]`` experts to the ``g``-th of ``len(experts)`` equal groups of layers."""

    def schedule(index: int, num_layers: int, alloc: AllocationConfig, default: int) -> int:
        return int(experts[group_of_layer(index, num_layers, len(experts))])

    return schedule


def _uniform(index: int, num_layers: int, alloc: AllocationConfig, default: int) -> int:
    return alloc.num_experts or default


def _pattern(index: int, num_layers: int, alloc: AllocationConfig, default: int) -> int:
    return group_schedule(*alloc.pattern)(index, num_layers, alloc, default)


def auto_total(num_layers: int, alloc: AllocationConfig, default: int) -> int:
    """The experts ``schedule="auto"`` shares among ``num_layers`` layers: ``total_experts``, or the total of
    ``budget_schedule`` on a model of ``num_layers`` layers."""
    if alloc.total_experts is not None:
        return alloc.total_experts
    return sum(_budget_counts(num_layers, alloc, default))


def auto_bounds(num_layers: int, alloc: AllocationConfig, default: int) -> tuple[int, int, int]:
    """``(total, low, high)`` of ``schedule="auto"`` on ``num_layers`` layers; a clear error when the budget
    cannot be split within the bounds.

    The layer count is known only here (at injection), so this is where a total beyond
    ``max_experts * num_layers`` (``max_experts`` defaulting to :data:`AUTO_MAX_EXPERTS`, or to the most a
    layer of ``budget_schedule`` gets when that is more) or below ``min_experts * num_layers`` is refused.
    """
    total = auto_total(num_layers, alloc, default)
    low = alloc.min_experts or 1
    if alloc.max_experts is not None:
        high, cap = alloc.max_experts, f"max_experts={alloc.max_experts}"
    else:
        high = max(AUTO_MAX_EXPERTS, low, *_budget_counts(num_layers, alloc, default))
        cap = f"max_experts={high} (the default when max_experts is not given; set max_experts= to allow more)"
    if not low * num_layers <= total <= high * num_layers:
        what = f"total_experts={total}"
        if alloc.total_experts is None:
            what = f"the {total} experts of budget_schedule {alloc.budget_schedule!r}"
        raise ValueError(
            f"allocation schedule='auto': {what} cannot be split among the model's "
            f"{num_layers} layers with min_experts={low} and {cap}: the total must be between {low * num_layers} "
            f"and {high * num_layers}; change total_experts or the bounds"
        )
    return total, low, high


def _budget_counts(num_layers: int, alloc: AllocationConfig, default: int) -> list[int]:
    """Each layer's experts under ``budget_schedule`` (none without one)."""
    if alloc.total_experts is not None or alloc.budget_schedule is None:
        return []
    budget = get_schedule(alloc.budget_schedule)
    return [int(budget(i, num_layers, alloc, default)) for i in range(num_layers)]


def _auto(index: int, num_layers: int, alloc: AllocationConfig, default: int) -> int:
    # before the warm-up has decided (per_layer), the budget split evenly: what the warm-up trains
    total, low, high = auto_bounds(num_layers, alloc, default)
    return apportion([1.0] * num_layers, total, low=low, high=high)[index]


register_schedule("uniform", _uniform)  # num_experts everywhere
register_schedule("pattern", _pattern)  # AllocationConfig.pattern: experts per group, bottom to top
# the MoLA schedules: experts per quarter of the layers, bottom to top
register_schedule("mola-increasing", group_schedule(2, 4, 6, 8))
register_schedule("mola-decreasing", group_schedule(8, 6, 4, 2))
register_schedule("mola-hourglass", group_schedule(8, 2, 2, 8))
register_schedule("mola-diamond", group_schedule(2, 8, 8, 2))
register_schedule("mola-uniform", group_schedule(5, 5, 5, 5))
# decided from the model and the data after a warm-up: see molex.allocation.auto
register_schedule("auto", _auto)


@dataclass
class AllocationConfig:
    """How many experts (and which rank) each layer gets (MoLA layer-wise allocation).

    Precedence, lowest to highest: ``schedule`` / ``pattern``, ``per_layer``, ``overrides``.
    Layer indices come from the first integer in a module's path (``model.layers.3.mlp`` -> 3);
    modules without one get ``num_experts``.

    ``schedule="auto"`` shares ``total_experts`` (or ``budget_schedule``'s total on the model) among the
    layers from a signal measured after ``warmup_steps`` of training on the even split, each layer
    getting ``min_experts`` to ``max_experts`` (default :data:`AUTO_MAX_EXPERTS`; see
    :mod:`molex.allocation.auto`); the decision is then stored here as ``per_layer``, so a saved adapter
    rebuilds the same pools without a warm-up. A total the bounds cannot meet on the model's layers is
    refused at injection, where the layer count is known.
    """

    schedule: str = field(default="uniform", metadata={"help": f"one of {sorted(SCHEDULES)}"})
    num_experts: int | None = field(default=None, metadata={"help": "experts per layer for 'uniform'"})
    pattern: list[int] | None = field(
        default=None, metadata={"help": "experts per equal group of layers, bottom to top (any number of groups)"}
    )
    per_layer: list[int] | None = field(default=None, metadata={"help": "explicit experts for every layer index"})
    overrides: dict[str, int] = field(default_factory=dict, metadata={"help": "{module regex: experts}"})
    rank_per_layer: list[int] | None = field(default=None, metadata={"help": "explicit rank for every layer index"})
    rank_overrides: dict[str, int] = field(default_factory=dict, metadata={"help": "{module regex: rank}"})
    total_experts: int | None = field(
        default=None, metadata={"help": "'auto': experts shared among the layers (the parameter budget)"}
    )
    budget_schedule: str | None = field(
        default=None, metadata={"help": "'auto' without total_experts: share this schedule's total on the model"}
    )
    min_experts: int | None = field(
        default=None, metadata={"help": "'auto': fewest experts per layer (default: 1, or what the router needs)"}
    )
    max_experts: int | None = field(
        default=None, metadata={"help": f"'auto': most experts per layer (default: {AUTO_MAX_EXPERTS})"}
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": f"'auto': training steps before deciding (default {AUTO_WARMUP_STEPS})"}
    )

    def __post_init__(self) -> None:
        if self.pattern is not None:
            self.pattern = list(self.pattern)
            if self.schedule == "uniform":
                self.schedule = "pattern"
        get_schedule(self.schedule)  # a clear error for an unknown name
        if self.schedule == "pattern" and not self.pattern:
            raise ValueError("schedule='pattern' needs pattern=[experts per group, ...]")
        for name, values in (("pattern", self.pattern), ("per_layer", self.per_layer)):
            if values is not None and any(int(v) < 1 for v in values):
                raise ValueError(f"allocation {name} must hold experts >= 1, got {values}")
        if self.rank_per_layer is not None and any(int(v) < 1 for v in self.rank_per_layer):
            raise ValueError(f"rank_per_layer must hold ranks >= 1, got {self.rank_per_layer}")
        pairs = ((self.overrides, "overrides", "experts"), (self.rank_overrides, "rank_overrides", "rank"))
        for mapping, name, what in pairs:
            for regex, value in mapping.items():
                try:
                    re.compile(regex)
                except re.error as err:
                    raise ValueError(
                        f"allocation {name} key {regex!r} is not a valid regular expression ({err}); "
                        "escape special characters, e.g. {r'layers\\.0\\.': 2}"
                    ) from None
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                    raise ValueError(f"allocation {name} {regex!r}: {what} must be an integer >= 1, got {value!r}")
        self.overrides = dict(self.overrides)
        self.rank_overrides = dict(self.rank_overrides)
        self._check_auto()

    def _check_auto(self) -> None:
        auto_fields = ("total_experts", "budget_schedule", "min_experts", "max_experts", "warmup_steps")
        if self.schedule != "auto":
            given = [name for name in auto_fields if getattr(self, name) is not None]
            if given:
                raise ValueError(f"allocation {given} apply to schedule='auto' only; got schedule={self.schedule!r}")
            return
        if self.total_experts is None and self.budget_schedule is None:
            raise ValueError(
                "allocation schedule='auto' needs total_experts=N (the experts to share among the layers, e.g. "
                "the total of the schedule it is compared with) or budget_schedule=<schedule name>"
            )
        unused = [name for name in ("num_experts", "pattern") if getattr(self, name) is not None]
        if unused or self.overrides:
            raise ValueError(
                f"allocation schedule='auto' decides every layer's experts itself: drop {unused or ['overrides']} "
                "(overrides would change the budget)"
            )
        if self.budget_schedule is not None and self.budget_schedule in ("auto", "pattern"):
            raise ValueError(f"budget_schedule must be a fixed named schedule, got {self.budget_schedule!r}")
        if self.budget_schedule is not None:
            get_schedule(self.budget_schedule)
        for name in ("total_experts", "min_experts", "max_experts", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"allocation {name} must be an integer >= 1, got {value!r}")
        if self.warmup_steps is None:
            self.warmup_steps = AUTO_WARMUP_STEPS
        low, high = self.min_experts or 1, self.max_experts
        if high is not None and high < low:
            raise ValueError(f"allocation max_experts={high} is below min_experts={low}")
        if self.total_experts is not None and self.total_experts < low:
            raise ValueError(f"allocation total_experts={self.total_experts} is below min_experts={low}")
        if self.per_layer:  # a decision already taken (or given): it must respect the budget
            counts = [int(v) for v in self.per_layer]
            if self.total_experts is not None and sum(counts) != self.total_experts:
                raise ValueError(
                    f"allocation per_layer {counts} holds {sum(counts)} experts but total_experts={self.total_experts}"
                )
            if min(counts) < low or (high is not None and max(counts) > high):
                raise ValueError(f"allocation per_layer {counts} leaves the bounds [{low}, {high}]")


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


def _experts_for(index: int | None, num_layers: int, alloc: AllocationConfig, default: int) -> int:
    if index is None:
        return default
    if alloc.per_layer is not None:
        if len(alloc.per_layer) != num_layers:
            raise ValueError(
                f"allocation per_layer has {len(alloc.per_layer)} entries but the model has {num_layers} layers"
            )
        return int(alloc.per_layer[index])
    return get_schedule(alloc.schedule)(index, num_layers, alloc, default)


def _first_override(name: str, overrides: dict[str, int]) -> int | None:
    for regex, value in overrides.items():
        if re.search(regex, name):
            return int(value)
    return None


def layers_spanned(indices: Iterable[int | None]) -> int:
    """One more than the largest known layer index (1 when none is known): the layer count assumed
    when the model's config states none."""
    known = [i for i in indices if i is not None]
    return max(known) + 1 if known else 1


def plan_allocation(
    module_names: Sequence[str],
    allocation: AllocationConfig | Any = None,
    num_layers: int | None = None,
    *,
    num_experts: int = 4,
    rank: int = 8,
) -> list[LayerPlan]:
    """Experts and rank for each targeted module.

    ``allocation`` (``None``: ``num_experts`` everywhere) with the pool defaults ``num_experts`` and
    ``rank``. A :class:`~molex.MoLEConfig` in its place (the earlier call form) brings all three.
    ``num_layers`` defaults to one more than the largest layer index found in ``module_names``;
    pass the model's ``num_hidden_layers`` when only some layers are targeted.
    """
    if allocation is not None and not isinstance(allocation, AllocationConfig):
        if not all(hasattr(allocation, a) for a in ("allocation", "num_experts", "rank")):
            raise TypeError(
                f"plan_allocation takes an AllocationConfig (or a MoLEConfig), got {type(allocation).__name__}"
            )
        allocation, num_experts, rank = allocation.allocation, allocation.num_experts, allocation.rank
    default_rank = rank
    alloc = allocation or AllocationConfig(num_experts=num_experts)
    indices = [layer_index(n) for n in module_names]
    if num_layers is None:
        num_layers = layers_spanned(indices)
    plans = []
    for name, index in zip(module_names, indices, strict=True):
        if index is not None and index >= num_layers:
            raise ValueError(f"module {name!r} has layer index {index} but the model has {num_layers} layers")
        experts = _experts_for(index, num_layers, alloc, num_experts)
        experts = _first_override(name, alloc.overrides) or experts
        rank = default_rank
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
