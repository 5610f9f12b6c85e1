"""Train the router of a fused LoRA hub end to end: LM loss + routers' auxiliary losses + routing supervision.

The loop, optimizer and loss are :mod:`molex.training`'s, the same ones Lightning's ``MoLEModule``
uses; this module adds the one hub-specific term: a cross-entropy of every layer's router to the
expert holding the sequence's adapter (MeteoRA-style supervision, mapped through
:func:`molex.hub.expert_slots` because a layer may hold only some of the adapters).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from molex.core.model_argument import takes_model
from molex.hub.fuse import adapter_names, expert_slots
from molex.layer.context import get_context
from molex.layer.inject import mole_layers, trainable_parameters
from molex.training import OptimSettings, train_steps
from molex.training.objective import mole_objective

__all__ = ["train_router"]


def _model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch for the model call: ``task_ids`` only when every layer holds every adapter in order
    (then routers' own task losses, e.g. ``gate(task_loss_coef=...)``, read them as expert indices)."""
    num_adapters = len(adapter_names(model))
    if all(slots == list(range(num_adapters)) for slots in expert_slots(model).values()):
        return dict(batch)
    return {k: v for k, v in batch.items() if k != "task_ids"}


def _routing_cross_entropy(model: nn.Module, task_ids: Tensor) -> Tensor:
    """Mean over layers and real tokens of ``-log p(expert of the task's adapter)``; layers the
    task's adapter does not target are skipped. ``task_ids [B]``: adapter index per sequence."""
    ctx = get_context(model)
    slots = expert_slots(model)
    losses = []
    for name, layer in mole_layers(model).items():
        decision = layer.last_decision
        if decision is None or decision.probs is None:
            continue
        slot_of = torch.full((len(adapter_names(model)),), -1, dtype=torch.long)
        slot_of[torch.tensor(slots[name])] = torch.arange(len(slots[name]))
        target = slot_of[task_ids.cpu()].to(decision.probs.device)  # [B]
        probs = decision.probs
        if not decision.is_per_sequence:
            target = target.repeat_interleave(ctx.seq_len)
        valid = target >= 0
        if decision.token_mask is not None and not decision.is_per_sequence:
            valid = valid & decision.token_mask
        if valid.any():
            picked = probs[valid].gather(1, target[valid].unsqueeze(1)).clamp_min(1e-9)
            losses.append(-picked.log().mean())
    if not losses:
        raise ValueError("task_loss_coef > 0 but no layer's router exposes probabilities (router 'fixed'?)")
    return torch.stack(losses).mean()


@takes_model
def train_router(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    steps: int,
    lr: float = 1e-3,
    task_loss_coef: float = 0.0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
) -> list[float]:
    """Train whatever is trainable in ``model`` (the routers of a fused model) with AdamW.

    Each batch is a dict of model inputs (``input_ids [B, S]``, ``attention_mask``, ``labels`` for
    the LM loss) plus optional ``task_ids [B]`` (adapter index per sequence). The loss is the LM
    loss (when ``labels`` are given) + the routers' weighted auxiliary losses +
    ``task_loss_coef`` * cross-entropy of every layer's router to the expert of the sequence's
    adapter (MeteoRA-style supervision, mapped through :func:`expert_slots`). ``batches`` is
    cycled until ``steps`` updates are done; the learning rate is constant and ``max_grad_norm``
    clips the gradient norm (as the Lightning trainer's ``gradient_clip_val``). Returns the loss of
    every step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters (router 'fixed' has none; use gate, soft or topk)")

    def loss_fn(batch: Mapping[str, Any]) -> Tensor:
        if task_loss_coef > 0 and "task_ids" not in batch:
            raise ValueError("task_loss_coef > 0 needs `task_ids` (adapter index per sequence) in each batch")
        outputs = model(**_model_inputs(model, batch))
        extra = {}
        if task_loss_coef > 0:
            extra["task_ce"] = task_loss_coef * _routing_cross_entropy(model, torch.as_tensor(batch["task_ids"]))
        return mole_objective(model, outputs, extra=extra).total

    settings = OptimSettings(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    return train_steps(model, batches, loss_fn, steps=steps, settings=settings, params=params, name="train_router")
