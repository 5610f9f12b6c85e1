"""Configuration of a mixture of LoRA experts: :class:`MoLEConfig`.

Layer-wise allocation (:class:`~molex.allocation.plan.AllocationConfig`, re-exported here) lives with
its schedules in :mod:`molex.allocation.plan`. The router setting is the router's own config
dataclass (``molex.routers.<name>``, e.g. ``router=TopKConfig(top_k=2)``); the name form
(``router="topk", top_k=2, router_options={...}``) is turned into that dataclass once, when the config
is made. ``top_k`` and ``router_options`` are then read-only views of the dataclass, so they cannot drift.

``to_dict()`` writes the router as ``{"name": ..., "options": {...}}``; :func:`migrate_mole_dict` turns the
flat form of molex 0.1 (``router: "<name>"``, ``router_options``, ``top_k``) into it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import re
import types
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from molex.allocation.plan import SCHEDULES, AllocationConfig
from molex.kernels import registered_backends
from molex.routers.base import Router, RouterConfig, Scope, available_routers, get_router_class, make_router_config

__all__ = [
    "SCHEDULES",
    "AllocationConfig",
    "MoLEConfig",
    "check_module_patterns",
    "flat_router_dict",
    "migrate_mole_dict",
]

#: the old keys the flat router form of molex 0.1 stored beside ``router: "<name>"``
_FLAT_ROUTER_KEYS = ("top_k", "router_options")


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


def _router_floor(config: MoLEConfig, cls: type[Router]) -> int:
    """The fewest experts a layer's router can be built with (its top-k, DynMoLE's keep_top_k, ...).

    Found by building the router on a 1-wide input for 1, 2, ... experts: the routers validate that
    themselves, so any router's rule is covered. The global random stream is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        for experts in range(1, 65):
            try:
                cls(in_features=1, num_experts=experts, config=config.router)
            except ValueError:
                continue
            return experts
    raise ValueError(f"router {config.router_name!r} cannot be built with 1 to 64 experts per layer")


def _resolve_auto(alloc: AllocationConfig, config: MoLEConfig, cls: type[Router]) -> AllocationConfig:
    """``schedule="auto"`` with ``min_experts`` filled in (the router's need by default) and checked."""
    if cls.scope is not Scope.LINEAR or cls.fixed_num_experts(config.router) is not None:
        raise ValueError(
            f"allocation schedule='auto' sets each layer's experts for its own router; router "
            f"{config.router_name!r} ({cls.scope.value} scope) does not take per-layer expert counts: "
            "choose another schedule"
        )
    floor = _router_floor(config, cls)
    if alloc.min_experts is not None and alloc.min_experts < floor:
        raise ValueError(
            f"allocation min_experts={alloc.min_experts} is below the {floor} experts router "
            f"{config.router_name!r} needs "
            f"per layer (its top-k); set min_experts >= {floor}"
        )
    return dataclasses.replace(alloc, min_experts=alloc.min_experts or floor)


def _declaring_router(router: RouterConfig) -> str:
    """The name of the registered router whose class declares ``type(router)`` as its ``config_class``.

    A router that inherits another's config class (without declaring its own) is reached by name only.
    """
    names = [n for n in available_routers() if get_router_class(n).__dict__.get("config_class") is type(router)]
    if len(names) == 1:
        return names[0]
    kind = type(router).__qualname__
    if not names:
        raise ValueError(
            f"router={kind}(...) is the config of no registered router; register its router "
            "(molex.routers.register_router) or pass router='<name>' with router_options"
        )
    raise ValueError(f"router={kind}(...) is declared by routers {names}; pass router='<name>' with router_options")


def _router_from_name(name: Any, top_k: int | None, options: Mapping[str, Any] | None) -> RouterConfig:
    """The name form (``router="topk", top_k=2, router_options={...}``) as the router's config dataclass."""
    if not isinstance(name, str):
        raise TypeError(
            f"router must be a router config dataclass (e.g. molex.routers.TopKConfig(top_k=2)) or a router name "
            f"({', '.join(available_routers())}), got {name!r}"
        )
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"router_options must be a dict of router options, got {options!r}")
    options = dict(options or {})
    cls = get_router_class(name)
    valid = sorted(f.name for f in dataclasses.fields(cls.config_class))
    if top_k is not None:
        _check_count("top_k", top_k)
        if "top_k" not in valid:
            raise ValueError(f"router {name!r} has no top_k option (leave top_k=None); its options: {valid}")
        if "top_k" in options and options["top_k"] != top_k:
            raise ValueError(f"top_k={top_k} and router_options top_k={options['top_k']} disagree; give top_k once")
        options["top_k"] = top_k
    return make_router_config(name, options)


def _check_agrees(router: RouterConfig, top_k: int | None, options: Mapping[str, Any] | None) -> None:
    """Beside a router config dataclass, ``top_k`` / ``router_options`` may only repeat what it holds (as
    ``dataclasses.replace`` passes them back from the views); anything else would be silently lost."""
    held = dataclasses.asdict(router)
    given = {**dict(options or {}), **({} if top_k is None else {"top_k": top_k})}
    differ = {k: v for k, v in given.items() if k not in held or held[k] != v}
    if differ:
        kind = type(router).__name__
        raise ValueError(
            f"router={kind}(...) already holds the router's options, so {differ} (top_k / router_options) cannot "
            f"be added; put them in {kind}(...), or pass router='<name>' with top_k / router_options"
        )


def migrate_mole_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """A :meth:`MoLEConfig.to_dict` mapping in the current form: the flat router form of molex 0.1
    (``router: "<name>"``, ``router_options: {...}``, ``top_k``) becomes ``router: {"name", "options"}``.
    A mapping already in the current form is returned as a copy."""
    data = dict(data)
    router = data.get("router", "topk")
    if isinstance(router, Mapping):
        stray = [key for key in _FLAT_ROUTER_KEYS if key in data]
        if stray:
            raise ValueError(
                f"mole config holds router={{'name': ..., 'options': ...}} and also {stray}; "
                "put every router option in router['options']"
            )
        return data
    options = dict(data.pop("router_options", None) or {})
    top_k = data.pop("top_k", None)
    if top_k is not None:
        options["top_k"] = top_k
    data["router"] = {"name": router, "options": options}
    return data


def fill_saved_before(data: Mapping[str, Any], format_version: int) -> dict[str, Any]:
    """A current-form mole config mapping read from an adapter of ``format_version``, with every router
    option the router gained after that version set to the value it routed with then (its config class's
    ``SAVED_BEFORE``: ``{option: (first format version with it, value before)}``); options present stay."""
    data = dict(data)
    router = dict(data.get("router") or {})
    try:
        config_class = get_router_class(router.get("name")).config_class
    except (KeyError, ValueError, TypeError):
        return data  # an unknown router fails with its own message when the config is built
    options = dict(router.get("options") or {})
    for option, (since, value) in getattr(config_class, "SAVED_BEFORE", {}).items():
        if format_version < since:
            options.setdefault(option, value)
    data["router"] = {**router, "options": options}
    return data


def flat_router_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """A :meth:`MoLEConfig.to_dict` mapping (either form) with the router as flat fields, for comparing
    settings one by one: ``router`` (the name), ``top_k`` and ``router_options`` (the other options)."""
    data = migrate_mole_dict(data)
    router = data.pop("router")
    if not isinstance(router, Mapping):
        raise ValueError(f"mole config router must be {{'name': ..., 'options': {{...}}}}, got {router!r}")
    options = dict(router.get("options") or {})
    return {**data, "router": router.get("name"), "top_k": options.pop("top_k", None), "router_options": options}


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
    router: RouterConfig | str = field(
        default="topk",
        metadata={"help": "the router's config dataclass (molex.routers.TopKConfig(...)), or a router name"},
    )
    #: name form only: experts per token, for routers that take it (then a read-only view, see below)
    top_k: InitVar[int | None] = None
    #: name form only: the router's options (then a read-only view, see below)
    router_options: InitVar[Mapping[str, Any] | None] = None
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

    def __post_init__(self, top_k: int | None, router_options: Mapping[str, Any] | None) -> None:
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
        # the router setting becomes its config dataclass here, once; everything after reads that
        if isinstance(self.router, RouterConfig):
            _check_agrees(self.router, top_k, router_options)
            self._router_name = _declaring_router(self.router)
            cls = get_router_class(self._router_name)
            make_router_config(self._router_name, dataclasses.asdict(self.router))  # the checks the name form gets
        else:
            self._router_name = self.router
            self.router = _router_from_name(self.router, top_k, router_options)
            cls = get_router_class(self._router_name)
        self._router_config_type = type(self.router)
        if self.allocation is not None and self.allocation.schedule == "auto":
            self.allocation = _resolve_auto(self.allocation, self, cls)

    @property
    def router_name(self) -> str:
        """The registered name of the router ``self.router`` configures."""
        name = getattr(self, "_router_name", None)
        if name is None or type(self.router) is not getattr(self, "_router_config_type", None):
            # ``router`` was reassigned after construction: name the router that declares its config class
            name = self._router_name = _declaring_router(self.router)
            self._router_config_type = type(self.router)
        return name

    def router_class(self) -> type[Router]:
        """The router class, looked up once in the registry."""
        return get_router_class(self.router_name)

    def router_kwargs(self) -> dict[str, Any]:
        """Every option of the router's config dataclass (``top_k`` included where it has one)."""
        return dataclasses.asdict(self.router)

    def router_config(self) -> RouterConfig:
        """The router's config dataclass (the ``router`` field itself)."""
        return self.router

    def scaling_for(self, rank: int) -> float:
        return self.alpha / (rank**0.5 if self.use_rslora else rank)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready); the router as ``{"name": <router name>, "options": {every option}}``."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in data.items()}
        data["router"] = {"name": self.router_name, "options": dataclasses.asdict(self.router)}
        return copy.deepcopy(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoLEConfig:
        """The config of :meth:`to_dict`'s mapping; the flat router form of molex 0.1 is migrated first."""
        data = migrate_mole_dict(data)
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown MoLEConfig field(s) {unknown}; valid fields: {sorted(valid)}")
        router = data.pop("router")
        if set(router) != {"name", "options"}:
            raise ValueError(f"mole config router must be {{'name': ..., 'options': {{...}}}}, got {router!r}")
        return cls(**data, router=router["name"], router_options=router["options"])


def _top_k_view(self: MoLEConfig) -> int | None:
    """The router's ``top_k`` (``None`` for routers without one); set it in the router config."""
    return getattr(self.router, "top_k", None)


def _router_options_view(self: MoLEConfig) -> Mapping[str, Any]:
    """The router's options other than ``top_k``, read-only; set them in the router config."""
    return types.MappingProxyType({k: v for k, v in dataclasses.asdict(self.router).items() if k != "top_k"})


# after @dataclass has read the InitVar defaults: reading them gives views of the router config
MoLEConfig.top_k = property(_top_k_view)  # type: ignore[assignment]
MoLEConfig.router_options = property(_router_options_view)  # type: ignore[assignment]
