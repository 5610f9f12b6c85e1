"""Routers that are fitted as sequence classifiers on ``(text, label)`` pairs, looked up by router name.

Most routers learn end to end through the model (:func:`molex.train_router`). A router whose
decision comes from a separate classifier over whole inputs (``dlp``) is fitted on the prompt texts
and their adapter labels instead. Such a router's own file registers its fitter here; callers
(:func:`molex.hub.fit_router`) ask :func:`get_text_fitter` and need no knowledge of router kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor, nn

from molex.core.registry import Registry

__all__ = ["TextFitter", "get_text_fitter", "register_text_fitter"]


class TextFitter(Protocol):
    """Fit the router of ``model`` on ``texts`` labelled with expert (adapter) indices; returns a loss history."""

    def __call__(
        self,
        model: nn.Module,
        texts: Sequence[str],
        labels: Sequence[int] | Tensor,
        *,
        tokenizer: Any = None,
        epochs: int = ...,
        lr: float = ...,
        seed: int = ...,
    ) -> list[float]: ...


#: router name -> the function that fits it on labelled texts
FITTERS: Registry[TextFitter] = Registry("text fitter")


def register_text_fitter(router: str, fitter: TextFitter, *, replace: bool = False) -> None:
    """Declare that router ``router`` (its registered name) is fitted on labelled texts by ``fitter``."""
    FITTERS.register(router, fitter, replace=replace)


def get_text_fitter(router: str) -> TextFitter | None:
    """The text fitter of router ``router``, or ``None`` when it trains end to end through the model."""
    return FITTERS.get(router)
