"""The router contract: the ``Router`` base class and the registry.

A router maps hidden states ``x [T, d]`` (plus a :class:`~molex.layer.context.RoutingContext`) to a
:class:`~molex.core.decision.RoutingDecision` (defined below routers and kernels, re-exported here).
Routers register by name; :func:`build_router` validates options against the router's config
dataclass so that typos fail loudly.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from molex.core.decision import RoutingDecision
from molex.core.losses import contrastive_loss, expert_outputs
from molex.core.registry import Registry
from molex.routers.inputs import router_input

if TYPE_CHECKING:
    from molex.layer.context import RoutingContext

__all__ = [
    "ContrastiveOptions",
    "Router",
    "RouterConfig",
    "RoutingDecision",
    "Scope",
    "available_routers",
    "build_router",
    "float32_logits",
    "get_router_class",
    "make_router_config",
    "register_router",
]


@dataclass
class RouterConfig:
    """Options shared by every router. Subclasses add their own fields."""

    def __post_init__(self) -> None:
        return None


@dataclass
class ContrastiveOptions(RouterConfig):
    """Mixin for token-level routers: the MoELoRA contrastive loss between the experts' outputs.

    Attributes:
        contrastive_coef: weight of :func:`molex.core.losses.contrastive_loss` (0 disables it). The
            loss needs every expert's output, ``E`` times the LoRA work of the layer, so it is
            computed only while training.
        contrastive_temperature: InfoNCE temperature ``> 0``.
    """

    contrastive_coef: float = 0.0
    contrastive_temperature: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.contrastive_coef < 0:
            raise ValueError(f"contrastive_coef must be >= 0, got {self.contrastive_coef}")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")


class Scope(str, enum.Enum):
    """Where a router lives (see :class:`Router`); a ``str`` so that reports and JSON show ``"linear"`` etc."""

    LINEAR = "linear"
    BLOCK = "block"
    MODEL = "model"

    def __str__(self) -> str:
        return self.value


def _coerce_scope(cls: type) -> None:
    """A router class that declares ``scope`` as a string (written before :class:`Scope`) gets the member."""
    declared = cls.__dict__.get("scope")
    if declared is None or isinstance(declared, Scope):
        return
    try:
        cls.scope = Scope(declared)
    except ValueError:
        raise ValueError(
            f"router {cls.__qualname__} declares scope={declared!r}; use one of "
            f"{', '.join(f'Scope.{s.name}' for s in Scope)} (molex.routers.base.Scope)"
        ) from None


class Router(nn.Module, abc.ABC):
    """Base class. Subclasses set ``name``, ``config_class`` and implement :meth:`forward`.

    ``scope`` (a :class:`Scope`) says where the router lives: ``Scope.LINEAR`` routers sit on each MoLE
    layer and choose among that layer's experts; ``Scope.BLOCK`` routers sit on a decoder block and
    choose among the block's MoLE layers (MiLoRA); ``Scope.MODEL`` routers sit on the root model and
    make one decision that every MoLE layer applies to its own experts (DLP-LoRA). A subclass that
    still declares the string (``"block"``) gets the member when the class is created.
    ``emits`` names the auxiliary losses the router can put in ``RoutingDecision.aux_losses``: the
    keys a training log or a loss weighting may expect from it (tests hold every router to it).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[RouterConfig]] = RouterConfig
    scope: ClassVar[Scope] = Scope.LINEAR
    #: names of the auxiliary losses this router may emit (keys of ``RoutingDecision.aux_losses``)
    emits: ClassVar[tuple[str, ...]] = ()
    #: the rule needs a pool whose experts share one down-projection (``lora_A [1, r, in]``, MTL-LoRA)
    needs_shared_a: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _coerce_scope(cls)

    @classmethod
    def fixed_num_experts(cls, config: RouterConfig) -> int | None:
        """Experts per layer that the router's rule itself fixes (FLix: one per feature value).

        ``None`` (the default) leaves the count to the allocation; otherwise every layer gets this
        many experts whatever the allocation says.
        """
        return None

    def __init__(self, *, in_features: int, num_experts: int, config: RouterConfig) -> None:
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"router in_features must be positive, got {in_features}")
        if num_experts <= 0:
            raise ValueError(f"router num_experts must be positive, got {num_experts}")
        self.in_features = in_features
        self.num_experts = num_experts
        self.config = config

    @abc.abstractmethod
    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        """Route ``x [T, in_features]``; ``context`` carries masks and sequence-level inputs."""

    @property
    def input_width(self) -> int:
        """Width ``d`` of the ``x [T, d]`` that :meth:`forward` takes (``in_features`` unless a router says)."""
        return self.in_features

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> RoutingDecision:
        # shape metadata only (no host sync): a wrong width fails here, naming the router, not in a matmul
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.input_width:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"router {self.name!r} takes inputs [tokens, {self.input_width}], got {shape}; flatten the tokens "
                f"to 2-D, or build the router with in_features equal to your inputs' last dimension"
            )
        if self.scope is not Scope.LINEAR and x.shape[0] == 0:
            raise ValueError(
                f"router {self.name!r} decides from each sequence's tokens but got none (x of shape {tuple(x.shape)}); "
                "pass at least one token"
            )
        return super().__call__(x, *args, **kwargs)

    def routing_inputs_read(self) -> frozenset[str]:
        """The routing inputs (``task_ids``, ``prompt_mask``, ``route_text``, ``sentence_embeddings``) this
        router reads with its options: the routing context checks those where they enter the model call and
        warns about ones no router reads."""
        return frozenset()

    def decides_per_sequence(self) -> bool:
        """Whether every token of a sequence gets one and the same decision (in the router's current mode).

        Such a router applies one fixed weighted set of experts to a whole sequence, which is one
        ordinary LoRA per route (:func:`molex.export.export_routes`); token-level routers return ``False``.
        """
        return False

    def expert_losses(self, x: Tensor, experts: nn.Module, decision: RoutingDecision) -> dict[str, Tensor]:
        """Losses that need the experts themselves (``x [T, in]`` is the experts' input).

        The MoLE layer calls this after routing; by default it adds the contrastive loss when the
        config has ``contrastive_coef > 0`` and the router is training.
        """
        coef = getattr(self.config, "contrastive_coef", 0.0)
        if coef <= 0 or not self.training:
            return {}
        outputs = expert_outputs(x, experts.lora_A, experts.lora_B, experts.scaling)
        loss = contrastive_loss(outputs, decision.token_mask, temperature=self.config.contrastive_temperature)
        return {"contrastive": coef * loss}

    def bind_pool(self, experts: nn.Module) -> None:
        """Called once by the MoLE layer that owns this router, with its expert pool. Routers whose
        parameters depend on the pool's shape (MTL-LoRA's ``r x r`` task transforms) create them here."""
        return None

    def kernel_inputs(
        self, experts: nn.Module, decision: RoutingDecision, context: RoutingContext | None = None
    ) -> tuple[Tensor, Tensor, Tensor, RoutingDecision]:
        """``(A, B, scaling, decision)`` for the expert op, from the layer's pool and this router's decision.

        By default the pool's own factors and the decision itself. A router whose rule is not a
        weighted sum of the pool's experts presents derived factors and a decision over them
        (AdaMix's averaged LoRA at inference, MTL-LoRA's per-task ``Lambda_t A``); the decision it
        returned from :meth:`forward` stays in the pool's terms (statistics, losses).
        """
        return experts.lora_A, experts.lora_B, experts.scaling, decision

    def extra_repr(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"in_features={self.in_features}, num_experts={self.num_experts}, {opts}"


#: every router by name; installed packages add theirs through the ``molex.routers`` entry-point group
ROUTERS: Registry[type[Router]] = Registry(
    "router", entry_point_group="molex.routers", how_to_register="Register your own with molex.routers.register_router."
)


def register_router(cls: type[Router] | None = None, *, replace: bool = False) -> Any:
    """Class decorator: make a router available by its ``name`` (``@register_router`` or
    ``@register_router(replace=True)`` to replace a registered router of the same name)."""
    if cls is None:
        return lambda target: register_router(target, replace=replace)
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        raise TypeError(f"register_router takes a molex.routers.Router subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} must set a non-empty `name` to be registered")
    return ROUTERS.register(cls.name, cls, replace=replace)


def available_routers() -> list[str]:
    """Names of the registered routers (plug-ins included), sorted."""
    return ROUTERS.names()


def get_router_class(name: str) -> type[Router]:
    """The router class registered as ``name``; a ``ValueError`` listing the known routers if none."""
    return ROUTERS.get_or_raise(name)


def make_router_config(name: str, options: dict[str, Any]) -> RouterConfig:
    """Validate ``options`` for router ``name`` and return its config dataclass."""
    cls = get_router_class(name)
    valid = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for router {name!r}; valid options: {sorted(valid) or 'none'}")
    config = cls.config_class(**options)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"router {name!r} option {f.name}=nan is not a number; give a finite value")
    return config


def build_router(name: str, *, in_features: int, num_experts: int, **options: Any) -> Router:
    """Build router ``name`` for ``num_experts`` experts over ``in_features``-dim inputs."""
    config = make_router_config(name, options)
    return get_router_class(name)(in_features=in_features, num_experts=num_experts, config=config)


def float32_logits(gate: nn.Linear, x: Tensor, *, input_norm: str = "none", temperature: float = 1.0) -> Tensor:
    """``gate(router_input(x, input_norm)) / temperature`` computed in float32 whatever the model dtype
    (routers run in fp32). A unit-length input gives logits of at most ``||w_e||``; the temperature
    (0.1 for ``topk``, as cosine routers use) lets them reach a decisive range at the usual router rate."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = router_input(x, input_norm)
        logits = nn.functional.linear(x, gate.weight.float(), None if gate.bias is None else gate.bias.float())
        return logits / temperature if temperature != 1.0 else logits
