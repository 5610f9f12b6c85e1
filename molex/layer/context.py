"""Routing context: what routers may know beyond the hidden states of one linear layer.

``inject`` installs one forward pre-hook (with kwargs) on the root model. Before every forward
the hook

* records the batch layout ``[B, S]`` of the current step and the attention mask, so token-level
  routers can ignore padding in their losses and statistics;
* pops molex-only keyword arguments (``prompt_mask=``, ``task_ids=``, ``route_text=``,
  ``sentence_embeddings=``, ``features=``) so the wrapped model never sees them;
* decides prefill vs decode from the KV cache: a forward with no cache, or an empty one,
  starts a new generation (``generation`` is incremented) and sequence-level routers recompute
  their decision; decode steps reuse it;
* checks the molex inputs where they enter (:mod:`molex.layer.routing_checks`): an empty batch, and at
  each prefill the ``task_ids`` / ``prompt_mask`` that a router of the model reads, fail with one
  clear error; a ``route_text`` or ``sentence_embeddings`` that no router reads gives one warning.

``transformers.generate`` refuses keyword arguments that the model's forward does not declare,
so for generation pass molex inputs through :func:`routing_inputs` (or :func:`molex.generate`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from molex.core.model_argument import takes_model
from molex.core.refs import get_unregistered, pop_unregistered, set_unregistered
from molex.layer.routing_checks import check_routing_inputs

__all__ = ["ROUTING_KWARGS", "RoutingContext", "generate", "get_context", "routing_inputs"]

#: keyword arguments molex takes out of the model's forward call
ROUTING_KWARGS = ("prompt_mask", "task_ids", "route_text", "sentence_embeddings", "features")
_CONTEXT_ATTR = "_molex_routing_context"
_HOOK_ATTR = "_molex_context_hook"


@dataclass
class RoutingContext:
    """Shared, per-model state that routers read. One instance per injected model."""

    attention_mask: Tensor | None = None  # [B, S_total] (1 = real token), covers cached tokens too
    input_ids: Tensor | None = None  # [B, S] tokens of the current step
    batch_size: int | None = None
    seq_len: int | None = None  # tokens of the current step per sequence
    is_prefill: bool = True
    generation: int = 0  # incremented at every prefill; sequence-level routers cache by it
    inputs: dict[str, Any] = field(default_factory=dict)  # per-call molex kwargs (prompt_mask, ...)
    pinned: dict[str, Any] = field(default_factory=dict)  # set by `routing_inputs`, outlive calls
    #: routing input -> names of the model's routers that read it (set by ``molex.inject``)
    readers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: task ids index experts: the fewest experts among the routers that read ``task_ids``
    task_id_limit: int | None = None
    #: names of all the model's routers (for messages)
    router_names: tuple[str, ...] = ()
    warned: set[str] = field(default_factory=set, repr=False)  # inputs already warned about (warn once)
    _token_mask: Tensor | None = field(default=None, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        """A molex input (``prompt_mask``, ``task_ids``, ...) from the call or ``routing_inputs``."""
        if key in self.inputs:
            return self.inputs[key]
        return self.pinned.get(key, default)

    def require(self, key: str, router: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(
                f"router {router!r} needs `{key}`: pass it to the model call (model(..., {key}=...)) "
                f"or, for generate(), wrap the call in `with molex.routing_inputs(model, {key}=...)`"
            )
        return value

    @property
    def layout_known(self) -> bool:
        return self.batch_size is not None and self.seq_len is not None

    def matches(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` flattened tokens have the ``[B, S]`` layout of this step."""
        return self.layout_known and num_tokens == self.batch_size * self.seq_len

    def token_mask(self, num_tokens: int) -> Tensor | None:
        """Bool ``[T]`` mask of real (non-padding) tokens of this step, or ``None`` if unknown."""
        if self.attention_mask is None or not self.matches(num_tokens):
            return None
        if self._token_mask is None:
            mask = self.attention_mask
            if mask.dim() != 2:
                return None
            self._token_mask = mask[:, -self.seq_len :].reshape(-1).bool()
        return self._token_mask

    def sequence_mask(self, key: str = "prompt_mask") -> Tensor | None:
        """Bool ``[B, S]`` mask of tokens that define a sequence-level decision.

        The attention mask of this step, intersected with ``prompt_mask`` when given.
        """
        mask = None
        if self.attention_mask is not None and self.attention_mask.dim() == 2 and self.seq_len:
            mask = self.attention_mask[:, -self.seq_len :].bool()
        prompt = self.get(key)
        if prompt is not None:
            prompt = prompt.bool()
            if prompt.shape[1] != (self.seq_len or prompt.shape[1]):
                prompt = prompt[:, : self.seq_len] if prompt.shape[1] > self.seq_len else None
            if prompt is not None:
                mask = prompt if mask is None else (mask & prompt.to(mask.device))
        return mask

    def reset(self) -> None:
        self.attention_mask = self.input_ids = None
        self.batch_size = self.seq_len = None
        self.inputs = {}
        self._token_mask = None
        self.is_prefill = True


def _cache_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    get_len = getattr(cache, "get_seq_length", None)
    if get_len is not None:
        return int(get_len())
    with contextlib.suppress(Exception):  # legacy tuple caches: ((k, v), ...) with k [B, H, S, D]
        return int(cache[0][0].shape[-2])
    return 0


def _routing_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    ctx: RoutingContext = get_unregistered(module, _CONTEXT_ATTR)
    ctx.reset()
    ctx.inputs = {k: kwargs.pop(k) for k in ROUTING_KWARGS if k in kwargs}
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], Tensor):
        input_ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    if input_ids is not None and input_ids.dim() == 2:
        ctx.input_ids = input_ids
        ctx.batch_size, ctx.seq_len = input_ids.shape
    elif embeds is not None and embeds.dim() == 3:
        ctx.batch_size, ctx.seq_len = embeds.shape[:2]
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
        mask = args[1]
    ctx.attention_mask = mask if isinstance(mask, Tensor) else None
    ctx.is_prefill = _cache_length(kwargs) == 0
    check_routing_inputs(ctx, "input_ids" if ctx.input_ids is not None else "inputs_embeds")
    if ctx.is_prefill:
        ctx.generation += 1
    return args, kwargs


def install_context(model: nn.Module) -> RoutingContext:
    """Attach a :class:`RoutingContext` and its pre-hook to ``model`` (idempotent)."""
    ctx = get_unregistered(model, _CONTEXT_ATTR)
    if ctx is not None:
        return ctx
    ctx = RoutingContext()
    set_unregistered(model, _CONTEXT_ATTR, ctx)  # per-model state, not in state_dict (see molex.core.refs)
    set_unregistered(model, _HOOK_ATTR, model.register_forward_pre_hook(_routing_pre_hook, with_kwargs=True))
    return ctx


def remove_context(model: nn.Module) -> None:
    handle = pop_unregistered(model, _HOOK_ATTR)
    if handle is not None:
        handle.remove()
    pop_unregistered(model, _CONTEXT_ATTR)


def get_context(model: nn.Module) -> RoutingContext:
    ctx = get_unregistered(model, _CONTEXT_ATTR)
    if ctx is None:
        raise ValueError("this model has no molex routing context; call molex.inject(model, config) first")
    return ctx


@contextlib.contextmanager
@takes_model
def routing_inputs(model: nn.Module, **inputs: Any) -> Iterator[RoutingContext]:
    """Provide molex inputs (``task_ids``, ``prompt_mask``, ...) to every forward inside the block.

    Use it around ``model.generate(...)``, which does not accept unknown keyword arguments::

        with molex.routing_inputs(model, task_ids=torch.tensor([0, 3])):
            out = model.generate(**batch, max_new_tokens=32)
    """
    unknown = sorted(set(inputs) - set(ROUTING_KWARGS))
    if unknown:
        raise ValueError(f"unknown routing input(s) {unknown}; molex understands {list(ROUTING_KWARGS)}")
    ctx = get_context(model)
    previous = dict(ctx.pinned)
    ctx.pinned.update({k: v for k, v in inputs.items() if v is not None})
    try:
        yield ctx
    finally:
        ctx.pinned = previous


def find_context(module: nn.Module) -> RoutingContext | None:
    return get_unregistered(module, _CONTEXT_ATTR)


@takes_model
def generate(model: nn.Module, **kwargs: Any) -> Any:
    """``model.generate(**kwargs)`` that also accepts molex routing inputs (``task_ids=``, ...).

    The routing inputs are pinned on the routing context for the whole generation, since
    ``generate`` itself rejects keyword arguments the model's forward does not declare.
    """
    routing = {k: kwargs.pop(k) for k in ROUTING_KWARGS if k in kwargs}
    with routing_inputs(model, **routing):
        return model.generate(**kwargs)
