"""The in-memory training loop: a fixed number of optimizer steps over batches held in memory.

Used by jobs small enough not to need a trainer (router fitting on a fused hub, the DLP
classifier); long runs with checkpoints, logging and mixed precision go through Lightning's
``MoLEModule``, which builds its optimizer, schedule and loss from the same pieces. Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from torch import Tensor, nn

from molex.routers.balance import update_balance_biases
from molex.training.optim import OptimSettings, build_optimizer, build_scheduler, clip_gradients

__all__ = ["train_steps"]

Batch = TypeVar("Batch")


def train_steps(
    module: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[Batch], Tensor],
    *,
    steps: int,
    settings: OptimSettings,
    params: Sequence[nn.Parameter] | None = None,
    name: str = "train_steps",
) -> list[float]:
    """Run ``steps`` AdamW updates of ``loss_fn(batch)``; returns the loss of every step.

    Args:
        module: put in train mode for the run and restored to its mode afterwards.
        batches: cycled (iterated again from the start) until ``steps`` updates are done; an
            iterable that yields nothing on a pass raises.
        loss_fn: the scalar loss of one batch (forward included).
        steps: number of optimizer updates (0 returns ``[]``).
        settings: optimizer, schedule (over ``steps``) and gradient clipping.
        params: the parameters to update (default: every parameter of ``module`` with ``requires_grad``).
        name: the caller's name, used in error messages.

    Each step: ``zero_grad``, ``backward``, clip (when ``settings.max_grad_norm``), ``optimizer.step``,
    ``scheduler.step`` — the order Lightning uses — then the loss-free balance update of routers with
    ``balance="bias"`` (:func:`molex.update_balance_biases`).
    """
    if steps < 0:
        raise ValueError(f"{name}: steps must be >= 0, got {steps}")
    params = [p for p in module.parameters() if p.requires_grad] if params is None else list(params)
    optimizer = build_optimizer(params, settings)
    scheduler = build_scheduler(optimizer, settings, steps)
    was_training = module.training
    module.train()
    history: list[float] = []
    try:
        while len(history) < steps:
            seen = False
            for batch in batches:
                seen = True
                loss = loss_fn(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip_gradients(params, settings)
                optimizer.step()
                scheduler.step()
                update_balance_biases(module)
                history.append(float(loss.detach()))
                if len(history) >= steps:
                    break
            if not seen:
                raise ValueError(f"{name} got no batches")
    finally:
        module.train(was_training)
    return history
