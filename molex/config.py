"""Configuration dataclasses: :class:`MoLEConfig` and :class:`AllocationConfig`.

Router options live in each router's own config dataclass (``molex.routers.<name>``) and are
passed here through ``top_k`` / ``router_options``; they are validated when the config is made.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from molex.routers.base import get_router_class, make_router_config

__all__ = ["MoLEConfig", "AllocationConfig", "SCHEDULES"]

#: group patterns of the named MoLA schedules: experts per quarter of the layers, bottom to top
SCHEDULES: dict[str, tuple[int, ...] | None] = {
    "uniform": None,  # num_experts everywhere
    "mola-increasing": (2, 4, 6, 8),
    "mola-decreasing": (8, 6, 4, 2),
    "mola-hourglass": (8, 2, 2, 8),
    "mola-diamond": (2, 8, 8, 2),
    "mola-uniform": (5, 5, 5, 5),
}


@dataclass
class AllocationConfig:
    """How many experts (and which rank) each layer gets (MoLA layer-wise allocation).

    Precedence, lowest to highest: ``schedule`` / ``pattern``, ``per_layer``, ``overrides``.
    Layer indices come from the first integer in a module's path (``model.layers.3.mlp`` -> 3);
    modules without one get ``num_experts``.
    """

    schedule: str = field(default="uniform", metadata={"help": f"one of {sorted(SCHEDULES)} or 'pattern'"})
    num_experts: int | None = field(default=None, metadata={"help": "experts per layer for 'uniform'"})
    pattern: list[int] | None = field(
        default=None, metadata={"help": "experts per equal group of layers, bottom to top (any number of groups)"}
    )
    per_layer: list[int] | None = field(default=None, metadata={"help": "explicit experts for every layer index"})
    overrides: dict[str, int] = field(default_factory=dict, metadata={"help": "{module regex: experts}"})
    rank_per_layer: list[int] | None = field(default=None, metadata={"help": "explicit rank for every layer index"})
    rank_overrides: dict[str, int] = field(default_factory=dict, metadata={"help": "{module regex: rank}"})

    def __post_init__(self) -> None:
        if self.pattern is not None:
            self.pattern = list(self.pattern)
            if self.schedule == "uniform":
                self.schedule = "pattern"
        if self.schedule not in SCHEDULES and self.schedule != "pattern":
            raise ValueError(f"unknown allocation schedule {self.schedule!r}; known: {sorted(SCHEDULES)} or 'pattern'")
        if self.schedule == "pattern" and not self.pattern:
            raise ValueError("schedule='pattern' needs pattern=[experts per group, ...]")
        for name, values in (("pattern", self.pattern), ("per_layer", self.per_layer)):
            if values is not None and any(int(v) < 1 for v in values):
                raise ValueError(f"allocation {name} must hold experts >= 1, got {values}")
        if self.rank_per_layer is not None and any(int(v) < 1 for v in self.rank_per_layer):
            raise ValueError(f"rank_per_layer must hold ranks >= 1, got {self.rank_per_layer}")
        for mapping, what in ((self.overrides, "experts"), (self.rank_overrides, "rank")):
            for regex, value in mapping.items():
                re.compile(regex)
                if int(value) < 1:
                    raise ValueError(f"override {regex!r}: {what} must be >= 1, got {value}")
        self.overrides = dict(self.overrides)
        self.rank_overrides = dict(self.rank_overrides)

    def group_pattern(self) -> tuple[int, ...] | None:
        return tuple(self.pattern) if self.schedule == "pattern" else SCHEDULES[self.schedule]


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
        if isinstance(self.allocation, dict):
            self.allocation = AllocationConfig(**self.allocation)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.router_options = dict(self.router_options)
        self.router_config()  # validates router name and options now, not at inject time

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
