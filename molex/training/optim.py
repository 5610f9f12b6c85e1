"""Optimizer, learning-rate schedule and gradient clipping: one definition for every way molex trains.

``MoLEModule.configure_optimizers`` (Lightning), :func:`molex.training.train_steps` (in-memory jobs:
:func:`molex.train_router`, :func:`molex.training.train_dlp_classifier`) build both from
:class:`OptimSettings`, so an AdamW step, its warm-up/cosine schedule and its clipping mean the same
everywhere. Pure torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["OptimSettings", "build_optimizer", "build_scheduler", "clip_gradients", "warmup_cosine"]


@dataclass(frozen=True, kw_only=True)
class OptimSettings:
    """How trainable parameters are updated; every value is checked once, here.

    Attributes:
        lr: peak AdamW learning rate (> 0).
        weight_decay: AdamW weight decay (>= 0).
        betas: AdamW betas, two numbers in [0, 1).
        warmup_steps: linear warm-up steps before the cosine decay (>= 0).
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at the last step; ``1.0`` keeps the
            learning rate constant after the warm-up.
        max_grad_norm: clip the global gradient norm to this value before each step (``None``: no
            clipping). Under Lightning the trainer's ``gradient_clip_val`` plays this role, with the
            same norm clipping (``torch.nn.utils.clip_grad_norm_`` after unscaling).
        router_lr_scale: the routers' learning rate is ``lr * router_lr_scale`` (warm-up and decay
            apply to both); ``1.0`` trains routers and experts at one rate. Anything else needs
            :func:`build_optimizer`'s ``router_params``.

    Each message starts with the field's name, so a config front end can prefix its own path
    (``optim.lr: ...``).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    max_grad_norm: float | None = None
    router_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "min_lr_ratio", "router_lr_scale"):
            _require_number(name, getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"lr: the learning rate must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: need a whole number warmup_steps >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must satisfy 0 <= min_lr_ratio <= 1, got {self.min_lr_ratio}")
        if self.max_grad_norm is not None:
            _require_number("max_grad_norm", self.max_grad_norm)
            if not self.max_grad_norm > 0:
                raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {self.max_grad_norm}")
        if not (math.isfinite(self.router_lr_scale) and self.router_lr_scale > 0):
            raise ValueError(
                f"router_lr_scale must be a finite number > 0 (1.0: the experts' rate), got {self.router_lr_scale}"
            )
        betas = tuple(self.betas) if isinstance(self.betas, Sequence) and not isinstance(self.betas, str) else ()
        if len(betas) != 2 or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))  # a config list becomes the tuple


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require_number(name: str, value: object) -> None:
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up from ``1/(warmup+1)`` to 1, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    params: Iterable[nn.Parameter], settings: OptimSettings, *, router_params: Iterable[nn.Parameter] | None = None
) -> torch.optim.AdamW:
    """AdamW over ``params`` (the trainable ones: experts, routers); raises when there are none.

    ``router_params`` (the routers' parameters; those among ``params`` form a second group at
    ``lr * settings.router_lr_scale``) must be given when that scale is not 1. A model whose routers have
    no trainable parameters (``fixed``, ``features``) gets one group whatever the scale.
    """
    params = list(params)
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to optimise")
    options = {"lr": settings.lr, "weight_decay": settings.weight_decay, "betas": tuple(settings.betas)}
    if settings.router_lr_scale == 1.0:
        return torch.optim.AdamW(params, **options)
    if router_params is None:
        raise ValueError(
            f"router_lr_scale={settings.router_lr_scale} needs router_params (the routers' parameters), "
            "or leave router_lr_scale at 1.0"
        )
    routers = {id(p) for p in router_params}
    groups = [
        {"params": [p for p in params if id(p) not in routers]},
        {"params": [p for p in params if id(p) in routers], "lr": settings.lr * settings.router_lr_scale},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], **options)


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: OptimSettings, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step :func:`warmup_cosine` schedule over ``total_steps`` optimizer steps; call ``step()`` after each."""
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    schedule = functools.partial(
        warmup_cosine,
        warmup_steps=settings.warmup_steps,
        total_steps=int(total_steps),
        min_lr_ratio=settings.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def clip_gradients(params: Iterable[nn.Parameter], settings: OptimSettings) -> Tensor | None:
    """Clip the global gradient norm of ``params`` to ``settings.max_grad_norm``; returns the norm before
    clipping (``None`` when clipping is off)."""
    if settings.max_grad_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_(list(params), settings.max_grad_norm)
