"""The router contract: ``RoutingDecision``, the ``Router`` base class and the registry.

A router maps hidden states ``x [T, d]`` (plus a :class:`~molex.context.RoutingContext`) to a
:class:`RoutingDecision`. Routers register by name; :func:`build_router` validates options
against the router's config dataclass so that typos fail loudly.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from molex.context import RoutingContext

__all__ = [
    "RoutingDecision",
    "Router",
    "RouterConfig",
    "ContrastiveOptions",
    "register_router",
    "build_router",
    "available_routers",
    "get_router_class",
]


@dataclass
class RoutingDecision:
    """Which experts each token uses, and with what weight.

    Token-level decisions hold ``indices [T, k]`` (int64) and ``weights [T, k]`` (float). A
    per-sequence decision (prompt- or sentence-level routers) holds ``indices [B, k]`` and
    ``weights [B, k]`` with ``tokens_per_sequence = S``; its tokens are laid out ``[B, S]``.
    :meth:`token_indices` / :meth:`token_weights` always give the per-token view ``[T, k]``.

    ``aux_losses`` are already multiplied by their coefficients: the training loss adds their sum.
    A weight of zero means "no contribution" (e.g. a token dropped by a capacity limit).
    Repeated expert ids within a row are allowed: their contributions add up.
    """

    indices: Tensor
    weights: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    tokens_per_sequence: int | None = None
    #: full router distribution ``[rows, E]`` (float32) when the router has one; for statistics
    probs: Tensor | None = None
    #: bool ``[T]`` mask of real tokens this decision was computed with; for statistics
    token_mask: Tensor | None = None
    _dense: tuple[int, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.indices.shape != self.weights.shape or self.indices.dim() != 2:
            raise ValueError(
                f"RoutingDecision needs indices and weights of one shape [rows, k]; got "
                f"{tuple(self.indices.shape)} and {tuple(self.weights.shape)}"
            )

    @property
    def is_per_sequence(self) -> bool:
        return self.tokens_per_sequence is not None

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]

    @property
    def num_tokens(self) -> int:
        rows = self.indices.shape[0]
        return rows * self.tokens_per_sequence if self.is_per_sequence else rows

    def token_indices(self) -> Tensor:
        """``[T, k]`` expert ids per token."""
        if not self.is_per_sequence:
            return self.indices
        return _repeat_rows(self.indices, self.tokens_per_sequence)

    def token_weights(self) -> Tensor:
        """``[T, k]`` routing weights per token."""
        if not self.is_per_sequence:
            return self.weights
        return _repeat_rows(self.weights, self.tokens_per_sequence)

    def to_dense(self, num_experts: int) -> Tensor:
        """``[T, E]`` gate matrix (repeated ids add up); differentiable in the weights.

        Without autograd the result is kept: a decision reused for many decode steps (sequence-level
        routers) then builds its gate once.
        """
        cached = self._dense
        if cached is not None and cached[0] == num_experts:
            return cached[1]
        idx, w = self.indices, self.weights
        dense = w.new_zeros(idx.shape[0], num_experts).scatter_add(1, idx, w)
        if self.is_per_sequence:
            dense = _repeat_rows(dense, self.tokens_per_sequence)
        if not (torch.is_grad_enabled() and w.requires_grad):
            self._dense = (num_experts, dense)
        return dense

    def per_token(self) -> RoutingDecision:
        """The same decision expressed per token."""
        if not self.is_per_sequence:
            return self
        probs = None if self.probs is None else _repeat_rows(self.probs, self.tokens_per_sequence)
        return RoutingDecision(
            self.token_indices(), self.token_weights(), self.aux_losses, None, probs, self.token_mask
        )


def _repeat_rows(values: Tensor, times: int) -> Tensor:
    """Each row ``times`` times in a row (``repeat_interleave`` on dim 0, without its cost at ``times = 1``)."""
    if times == 1:
        return values
    rows = values.shape[0]
    return values.unsqueeze(1).expand(rows, times, *values.shape[1:]).reshape(rows * times, *values.shape[1:])


@dataclass
class RouterConfig:
    """Options shared by every router. Subclasses add their own fields."""

    def __post_init__(self) -> None:
        return None


@dataclass
class ContrastiveOptions(RouterConfig):
    """Mixin for token-level routers: the MoELoRA contrastive loss between the experts' outputs.

    Attributes:
        contrastive_coef: weight of :func:`molex.losses.contrastive_loss` (0 disables it). The
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


class Router(nn.Module, abc.ABC):
    """Base class. Subclasses set ``name``, ``config_class`` and implement :meth:`forward`.

    ``scope`` says where the router lives: ``"linear"`` routers sit on each MoLE layer and
    choose among that layer's experts; ``"block"`` routers sit on a decoder block and choose
    among the block's MoLE layers (MiLoRA); ``"model"`` routers sit on the root model and make
    one decision that every MoLE layer applies to its own experts (DLP-LoRA).
    ``emits`` names the auxiliary losses the router can put in ``RoutingDecision.aux_losses``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[RouterConfig]] = RouterConfig
    scope: ClassVar[str] = "linear"
    #: whether the router needs per-sequence information from the routing context
    sequence_level: ClassVar[bool] = False
    #: names of the auxiliary losses this router may emit (keys of ``RoutingDecision.aux_losses``)
    emits: ClassVar[tuple[str, ...]] = ()

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

    def expert_losses(self, x: Tensor, experts: nn.Module, decision: RoutingDecision) -> dict[str, Tensor]:
        """Losses that need the experts themselves (``x [T, in]`` is the experts' input).

        The MoLE layer calls this after routing; by default it adds the contrastive loss when the
        config has ``contrastive_coef > 0`` and the router is training.
        """
        coef = getattr(self.config, "contrastive_coef", 0.0)
        if coef <= 0 or not self.training:
            return {}
        from molex.losses import contrastive_loss, expert_outputs  # losses imports this module

        outputs = expert_outputs(x, experts.lora_A, experts.lora_B, experts.scaling)
        loss = contrastive_loss(outputs, decision.token_mask, temperature=self.config.contrastive_temperature)
        return {"contrastive": coef * loss}

    def extra_repr(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"in_features={self.in_features}, num_experts={self.num_experts}, {opts}"


_REGISTRY: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make a router available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} must set a non-empty `name` to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a router named {cls.name!r} is already registered ({_REGISTRY[cls.name].__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def available_routers() -> list[str]:
    """Names of the registered routers, sorted."""
    return sorted(_REGISTRY)


def get_router_class(name: str) -> type[Router]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown router {name!r}; known routers: {', '.join(available_routers())}. "
            "Register your own with molex.routers.register_router."
        ) from None


def make_router_config(name: str, options: dict[str, Any]) -> RouterConfig:
    """Validate ``options`` for router ``name`` and return its config dataclass."""
    cls = get_router_class(name)
    valid = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for router {name!r}; valid options: {sorted(valid) or 'none'}")
    return cls.config_class(**options)


def build_router(name: str, *, in_features: int, num_experts: int, **options: Any) -> Router:
    """Build router ``name`` for ``num_experts`` experts over ``in_features``-dim inputs."""
    config = make_router_config(name, options)
    return get_router_class(name)(in_features=in_features, num_experts=num_experts, config=config)


def masked_mean(values: Tensor, token_mask: Tensor | None, dim: int = 0) -> Tensor:
    """Mean over tokens (``dim``) counting only ``token_mask`` (bool ``[T]``) tokens."""
    if token_mask is None:
        return values.mean(dim) if values.shape[dim] else values.sum(dim)
    m = token_mask.to(values.dtype)
    shape = [1] * values.dim()
    shape[dim] = -1
    return (values * m.view(shape)).sum(dim) / m.sum().clamp_min(1.0)


def float32_logits(gate: nn.Linear, x: Tensor) -> Tensor:
    """``gate(x)`` computed in float32 whatever the model dtype (routers run in fp32)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return nn.functional.linear(x.float(), gate.weight.float(), None if gate.bias is None else gate.bias.float())
