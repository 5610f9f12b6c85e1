"""LoraHub: a gradient-free search of one mixing weight per LoRA adapter, on a few labelled examples.

The model mixes the adapters through :func:`molex.fuse_adapters` with the ``fixed`` router (the
``cat`` merge, exact) while CMA-ES tries weight vectors; the best one can be written as a merged
PEFT adapter (:func:`molex.merge_adapters`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molex.core.model_argument import takes_model
from molex.hub.fuse import AdapterSource, fuse_adapters, load_adapters, set_adapter_weights
from molex.hub.merge import check_merge_output, merge_adapters
from molex.layer.inject import unload

__all__ = ["LoraHubResult", "lorahub_search"]


@dataclass
class LoraHubResult:
    """Outcome of :func:`lorahub_search`: the best weights (one per adapter) and their objective."""

    names: list[str]
    weights: list[float]
    objective: float
    loss: float
    evaluations: int
    history: list[float] = field(default_factory=list)
    out_dir: Path | None = None


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: Sequence[Mapping[str, Any]]) -> float:
    losses = [float(model(**{k: v for k, v in b.items() if k != "task_ids"}).loss) for b in batches]
    return sum(losses) / len(losses)


@takes_model
def lorahub_search(
    model: nn.Module,
    adapters: Mapping[str, AdapterSource],
    batches: Iterable[Mapping[str, Any]],
    *,
    max_evals: int = 60,
    l1: float = 0.05,
    bound: float = 1.5,
    sigma0: float = 0.3,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> LoraHubResult:
    """LoraHub: gradient-free search (CMA-ES, the ``cma`` package) of one weight per adapter.

    Minimises ``mean LM loss on batches + l1 * sum_i |w_i|`` over ``w`` in ``[-bound, bound]^A``,
    starting from the uniform average ``w_i = 1 / A``. The model mixes the adapters as
    ``delta = sum_i w_i delta_i`` (``fixed`` router: the ``cat`` merge, exact) during the search and
    is restored afterwards. With ``out_dir``, the best weights are written as a merged PEFT adapter
    (as :func:`molex.merge_adapters` writes it: crash-safe; ``overwrite`` as there).
    Each batch needs ``input_ids`` and ``labels`` (and ``attention_mask``).
    """
    try:
        import cma
    except ImportError:
        raise ImportError("lorahub_search needs the `cma` package: pip install 'molex-lora[hub]'") from None
    batches = list(batches)
    if not batches:
        raise ValueError("lorahub_search needs at least one batch of examples")
    loaded = load_adapters(adapters)
    if len(loaded) < 2:
        raise ValueError("lorahub_search needs at least two adapters (with one there is nothing to weigh)")
    if out_dir is not None:  # a bad out_dir fails now, not after the search
        check_merge_output(loaded, out_dir, overwrite=overwrite)
    names = [a.name for a in loaded]
    fuse_adapters(model, dict(zip(names, loaded, strict=True)), router="fixed")
    was_training = model.training
    model.eval()
    history: list[float] = []

    def objective(w: Sequence[float]) -> float:
        set_adapter_weights(model, list(w))
        value = _mean_loss(model, batches) + l1 * sum(abs(x) for x in w)
        history.append(value)
        return value

    try:
        options = {"bounds": [-bound, bound], "maxfevals": max_evals, "seed": seed + 1, "verbose": -9}
        es = cma.CMAEvolutionStrategy([1.0 / len(loaded)] * len(loaded), sigma0, options)
        while not es.stop():
            candidates = es.ask()
            es.tell(candidates, [objective(c) for c in candidates])
        best = [float(x) for x in es.result.xbest]
        set_adapter_weights(model, best)
        loss = _mean_loss(model, batches)
    finally:
        unload(model)
        model.train(was_training)
    written = None
    if out_dir is not None:
        written = merge_adapters(dict(zip(names, loaded, strict=True)), best, "cat", out_dir, overwrite=overwrite)
    return LoraHubResult(
        names=names,
        weights=best,
        objective=loss + l1 * sum(abs(x) for x in best),
        loss=loss,
        evaluations=len(history),
        history=history,
        out_dir=written,
    )
