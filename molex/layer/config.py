"""Configuration of a mixture of LoRA experts: :class:`MoLEConfig`.

Layer-wise allocation (:class:`~molex.allocation.plan.AllocationConfig`, re-exported here) lives with
its schedules in :mod:`molex.allocation.plan`. Router options live in each router's own config
dataclass (``molex.routers.<name>``) and are passed here through ``top_k`` / ``router_options``;
they are validated when the config is made.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from molex.allocation.plan import SCHEDULES, AllocationConfig
from molex.kernels import registered_backends
from molex.routers.base import get_router_class, make_router_config

__all__ = ["MoLEConfig", "AllocationConfig", "SCHEDULES", "check_module_patterns"]


def check_module_patterns(name: str, patterns: list[str] | str | None) -> None:
    """A string ``patterns`` is one regex (full match): it must compile. Lists hold plain module names."""
    if not isinstance(patterns, str):
        return
    try:
        re.compile(patterns)
    except re.error as err:
        raise ValueError(
            f"{name}={patterns!r} is not a valid regular expression ({err}); escape special characters "
            f"(re.escape) or pass a list of module names such as ['q_proj', 'v_proj']"
        ) from None


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be >= 1 (an integer), got {value!r}")


def _router_floor(config: MoLEConfig) -> int:
    """The fewest experts a layer's router can be built with (its top-k, DynMoLE's keep_top_k, ...).

    Found by building the router on a 1-wide input for 1, 2, ... experts: the routers validate that
    themselves, so any router's rule is covered. The global random stream is left as it was.
    """
    cls, router_config = get_router_class(config.router), config.router_config()
    with torch.random.fork_rng(devices=[]):
        for experts in range(1, 65):
            try:
                cls(in_features=1, num_experts=experts, config=router_config)
            except ValueError:
                continue
            return experts
    raise ValueError(f"router {config.router!r} cannot be built with 1 to 64 experts per layer")


def _resolve_auto(alloc: AllocationConfig, config: MoLEConfig) -> AllocationConfig:
    """``schedule="auto"`` with ``min_experts`` filled in (the router's need by default) and checked."""
    cls = get_router_class(config.router)
    if cls.scope != "linear" or cls.fixed_num_experts(config.router_config()) is not None:
        raise ValueError(
            f"allocation schedule='auto' sets each layer's experts for its own router; router {config.router!r} "
            f"({cls.scope} scope) does not take per-layer expert counts: choose another schedule"
        )
    floor = _router_floor(config)
    if alloc.min_experts is not None and alloc.min_experts < floor:
        raise ValueError(
            f"allocation min_experts={alloc.min_experts} is below the {floor} experts router {config.router!r} needs "
            f"per layer (its top-k); set min_experts >= {floor}"
        )
    return dataclasses.replace(alloc, min_experts=alloc.min_experts or floor)


@dataclass
class MoLEConfig:
    """Configuration of a mixture of LoRA experts injected into a model.

    ``y = base(x) + sum_{e in S(x)} w_e(x) * scaling * B_e A_e dropout(x)``
    """

    target_modules: list[str] | str = field(
        metadata={"help": "module names (exact or dotted suffix) or one regex (full match), like PEFT"}
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank r of every expert (see allocation for per-layer)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the experts' input"})
    use_rslora: bool = field(default=False, metadata={"help": "scaling = alpha / sqrt(r) (rsLoRA)"})
    num_experts: int = field(default=4, metadata={"help": "experts per layer (unless allocation says otherwise)"})
    allocation: AllocationConfig | None = field(default=None, metadata={"help": "MoLA layer-wise allocation"})
    router: str = field(default="topk", metadata={"help": "router name, see molex.routers.available_routers()"})
    top_k: int | None = field(default=None, metadata={"help": "experts per token, for routers that take it"})
    router_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra router options"})
    share_A: bool = field(  # noqa: N815 - the name users know from HydraLoRA, mole.share_A
        default=False, metadata={"help": "one LoRA A shared by a layer's experts, E B's (HydraLoRA / MTL-LoRA)"}
    )
    kernel_backend: str = field(default="auto", metadata={"help": "expert op backend, or 'auto'"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "names/regex never replaced"})
    autocast_adapter_dtype: bool = field(
        default=True, metadata={"help": "keep experts in float32 when the base is fp16/bf16 (like PEFT)"}
    )
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "recorded at inject time"})
    hub: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "set by molex.fuse_adapters: {'adapters': [names], 'experts': {module: [adapter index per expert]}}"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty: name at least one module (e.g. ['q_proj', 'v_proj'])")
        elif not isinstance(self.target_modules, str):
            raise TypeError(
                f"target_modules must be a list of module names or one regex string, got {self.target_modules!r}"
            )
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = list(self.exclude_modules)
        check_module_patterns("target_modules", self.target_modules)
        check_module_patterns("exclude_modules", self.exclude_modules)
        if isinstance(self.allocation, dict):
            self.allocation = AllocationConfig(**self.allocation)
        _check_count("rank", self.rank)
        _check_count("num_experts", self.num_experts)
        if self.top_k is not None:
            _check_count("top_k", self.top_k)
        if not isinstance(self.alpha, numbers.Real) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(
                f"alpha must be a finite number > 0 (scaling = alpha / rank), got {self.alpha!r}; "
                "the usual choice is alpha = 2 * rank"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        backends = registered_backends()
        if self.kernel_backend != "auto" and self.kernel_backend not in backends:
            raise ValueError(f"unknown kernel_backend {self.kernel_backend!r}; use 'auto' or one of {backends}")
        self.router_options = dict(self.router_options)
        self.router_config()  # validates router name and options now, not at inject time
        if self.allocation is not None and self.allocation.schedule == "auto":
            self.allocation = _resolve_auto(self.allocation, self)

    def router_kwargs(self) -> dict[str, Any]:
        """Router options including ``top_k`` (when set)."""
        options = dict(self.router_options)
        if self.top_k is not None:
            options["top_k"] = self.top_k
        return options

    def router_config(self):
        cls = get_router_class(self.router)
        options = self.router_kwargs()
        valid = sorted(f.name for f in dataclasses.fields(cls.config_class))
        if "top_k" in options and "top_k" not in valid:
            raise ValueError(f"router {self.router!r} has no top_k option (leave top_k=None); its options: {valid}")
        return make_router_config(self.router, options)

    def scaling_for(self, rank: int) -> float:
        return self.alpha / (rank**0.5 if self.use_rslora else rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLEConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown MoLEConfig field(s) {unknown}; valid fields: {sorted(valid)}")
        return cls(**data)
