"""The training objective of a MoLE model: LM loss + the routers' weighted auxiliary losses + extra terms.

Every way molex trains (Lightning's ``MoLEModule``, :func:`molex.train_router`) computes its loss
here, so the terms and their order are the same everywhere. This module needs :mod:`molex.inject`;
the rest of :mod:`molex.training` is pure torch (routers may use it), which is why it is not
re-exported by the package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from molex.layer.inject import total_aux_loss
from molex.training.consistency import consistency_loss

__all__ = ["MoLELoss", "mole_objective"]


@dataclass(frozen=True)
class MoLELoss:
    """The loss of one forward and its parts (each a scalar tensor).

    Attributes:
        total: what is minimised: ``lm + aux + sum(extra.values())`` over the parts present.
        lm: the model's language-modelling loss (``None`` when the forward returned none).
        aux: the routers' weighted auxiliary losses of the forward, as :func:`molex.total_aux_loss` combines
            them: each kind averaged over the layers that emit it, the kinds added (``None`` when none).
        extra: caller-specific terms, already weighted (e.g. routing supervision).
    """

    total: Tensor
    lm: Tensor | None
    aux: Tensor | None
    extra: dict[str, Tensor] = field(default_factory=dict)


def mole_objective(
    model: nn.Module,
    outputs: Any,
    *,
    extra: Mapping[str, Tensor] | None = None,
    rerun: Callable[[], Any] | None = None,
) -> MoLELoss:
    """Combine the loss of the forward that produced ``outputs`` (``outputs.loss``, the model's LM loss)
    with the auxiliary losses the MoLE layers of ``model`` recorded during that forward, and ``extra``.

    ``rerun``: runs the same forward again. When given, routers that ask for a consistency term
    (AdaMix's ``stochastic`` router with ``consistency_coef > 0``) add ``extra["consistency"]``, see
    :mod:`molex.training.consistency`; the second pass is run only then.

    The auxiliary losses are cast to the LM loss's dtype (under autocast the LM loss may be float32
    while a router's loss is not, or the reverse).
    """
    lm = getattr(outputs, "loss", None)
    aux = total_aux_loss(model)  # read before a second pass overwrites the layers' last decisions
    extra = dict(extra or {})
    if rerun is not None:
        consistency = consistency_loss(model, outputs, rerun)
        if consistency is not None:
            extra["consistency"] = consistency
    total = lm
    for term in ([aux] if aux is not None else []) + list(extra.values()):
        total = term if total is None else total + term.to(total.dtype)
    if total is None:
        raise ValueError(
            "nothing to train on: the model returned no loss (pass `labels`), no router recorded an auxiliary "
            "loss and no extra term was given"
        )
    return MoLELoss(total=total, lm=lm, aux=aux, extra=extra)
