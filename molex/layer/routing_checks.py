"""Checks of the molex routing inputs where they enter the model call, so bad ones fail with one clear line.

The routing context's forward pre-hook (:mod:`molex.layer.context`) calls :func:`check_routing_inputs` once per
model call, before any layer runs:

* an empty batch (``input_ids [2, 0]`` or ``[0, 5]``) fails at once, naming its shape (every
  ``transformers`` model fails on it too, with a reshape error from deep inside its attention);
* at each prefill, ``task_ids`` and ``prompt_mask`` are checked when a router of the model reads them
  (:meth:`molex.routers.Router.routing_inputs_read`): ``task_ids`` must be ``[B]`` or ``[B, S]`` with
  ids of existing experts (or ``-100``, ignored); ``prompt_mask`` must cover the step's ``[B, S]``
  tokens and select at least one real token of every sequence;
* ``route_text`` / ``sentence_embeddings`` that no router reads give one warning per model.

The value checks look at the tensors' contents (one host sync per prefill, none per layer) and run only
for models whose routers read those inputs, so token-level routers stay free of host syncs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Protocol

import torch

__all__ = ["IGNORE_TASK_ID", "check_routing_inputs", "declare_readers"]

#: the task id of tokens or sequences left out of a router's task loss
IGNORE_TASK_ID = -100


class RoutingContext(Protocol):
    """What the checks read and record on :class:`molex.layer.context.RoutingContext` (which calls them), so
    this module needs no import of it."""

    batch_size: int | None
    seq_len: int | None
    is_prefill: bool
    readers: dict[str, tuple[str, ...]]
    task_id_limit: int | None
    router_names: tuple[str, ...]
    warned: set[str]

    @property
    def layout_known(self) -> bool: ...

    def get(self, key: str, default: Any = None) -> Any: ...

    def sequence_mask(self, key: str = "prompt_mask") -> torch.Tensor | None: ...


#: routing inputs that only some routers read: passing them to another router does nothing
_OPTIONAL_INPUTS = ("route_text", "sentence_embeddings")


def declare_readers(context: RoutingContext, routers: Iterable[Any]) -> None:
    """Record on ``context`` which of ``routers`` read which routing input, and how many experts
    ``task_ids`` may index (the fewest experts among the routers that read them)."""
    readers: dict[str, list[str]] = {}
    limits: list[int] = []
    names: list[str] = []
    for router in routers:
        name = getattr(router, "name", type(router).__name__)
        names.append(name)
        read = router.routing_inputs_read() if hasattr(router, "routing_inputs_read") else frozenset()
        for key in read:
            readers.setdefault(key, [])
            if name not in readers[key]:
                readers[key].append(name)
        if "task_ids" in read:
            limits.append(int(router.num_experts))
    context.readers = {key: tuple(value) for key, value in readers.items()}
    context.task_id_limit = min(limits) if limits else None
    context.router_names = tuple(dict.fromkeys(names))


def _router_names(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(repr(n) for n in names) if names else "none"


def check_routing_inputs(context: RoutingContext, source: str) -> None:
    """Check this call's routing inputs (see the module docstring); ``source`` names the tensor that gave
    the ``[B, S]`` layout (``input_ids`` or ``inputs_embeds``)."""
    if context.layout_known and context.batch_size * context.seq_len == 0:
        raise ValueError(
            f"empty batch: {source} has shape ({context.batch_size}, {context.seq_len}), i.e. no tokens; "
            "pass at least one sequence of at least one token"
        )
    for key in _OPTIONAL_INPUTS:
        if context.get(key) is not None and key not in context.readers and key not in context.warned:
            context.warned.add(key)
            use = "with embedding_source='encoder'" if key == "route_text" else "in place of its own embeddings"
            warnings.warn(
                f"{key} is ignored: no router of this model reads it (its routers: "
                f"{_router_names(context.router_names)}); only router 'dlp' uses it ({use}); "
                "this warning is given once per model",
                UserWarning,
                stacklevel=4,
            )
    if not context.is_prefill or not context.layout_known:
        return
    task_ids = context.get("task_ids")
    if task_ids is not None and "task_ids" in context.readers:
        _check_task_ids(context, torch.as_tensor(task_ids))
    if "prompt_mask" in context.readers:
        _check_prompt_tokens(context)


def _check_task_ids(context: RoutingContext, task_ids: torch.Tensor) -> None:
    batch, seq = context.batch_size, context.seq_len
    routers = _router_names(context.readers["task_ids"])
    shape = tuple(task_ids.shape)
    if not ((task_ids.dim() == 1 and shape[0] == batch) or (task_ids.dim() == 2 and shape == (batch, seq))):
        raise ValueError(
            f"task_ids of shape {shape} does not fit this batch of {batch} sequences of {seq} tokens: router "
            f"{routers} needs one task per sequence [{batch}] or one per token [{batch}, {seq}]"
        )
    if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.dtype == torch.bool:
        raise ValueError(f"task_ids must hold integer task ids, got dtype {task_ids.dtype}")
    limit = context.task_id_limit
    if limit is None:
        return
    bad = (task_ids != IGNORE_TASK_ID) & ((task_ids < 0) | (task_ids >= limit))
    if bool(bad.any()):
        value = int(task_ids[bad][0])
        raise ValueError(
            f"task_ids holds {value}, outside [0, {limit - 1}]: router {routers} trains task t towards expert t "
            f"and has {limit} experts (in its smallest layer); use ids 0 to {limit - 1}, or {IGNORE_TASK_ID} "
            "to leave a sequence or token out of the task loss"
        )


def _check_prompt_tokens(context: RoutingContext) -> None:
    batch, seq = context.batch_size, context.seq_len
    routers = _router_names(context.readers["prompt_mask"])
    prompt = context.get("prompt_mask")
    if prompt is not None:
        prompt = torch.as_tensor(prompt)
        if prompt.dim() != 2 or prompt.shape[0] != batch or prompt.shape[1] < seq:
            raise ValueError(
                f"prompt_mask of shape {tuple(prompt.shape)} does not cover this batch of {batch} sequences of "
                f"{seq} tokens: router {routers} pools the prompt tokens, so give prompt_mask as [{batch}, {seq}] "
                "(1 = prompt token), padded like input_ids"
            )
    mask = context.sequence_mask()  # [B, S]: attention mask of this step & prompt_mask
    if mask is None:
        return
    empty = (~mask.bool().any(dim=1)).nonzero().flatten().tolist()
    if empty:
        if prompt is not None:
            what, fix = "prompt_mask (with the attention mask)", "mark at least one real prompt token of each with 1"
        else:
            what, fix = "the attention mask", "leave fully padded sequences out of the batch"
        raise ValueError(
            f"{what} selects no token of sequence(s) {empty}: router {routers} decides from the mean of each "
            f"sequence's prompt tokens; {fix}"
        )
