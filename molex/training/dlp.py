"""Fit the DLP-LoRA classifier on ``(text, label)`` pairs, with molex's shared training loop.

The classifier of a :class:`~molex.routers.dlp.DLPRouter` is trained on its own (cross-entropy on
sentence embeddings), not through the model: the embeddings are computed once, then
:func:`molex.training.train_steps` runs the epochs. Registered as the ``dlp`` router's text fitter,
so :func:`molex.hub.fit_router` uses it for fused models with ``router="dlp"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from molex.routers.dlp import DLPRouter
from molex.training.fitters import register_text_fitter
from molex.training.loop import train_steps
from molex.training.optim import OptimSettings

__all__ = ["train_dlp_classifier"]


def _find_dlp_router(router_or_model: nn.Module) -> DLPRouter:
    if isinstance(router_or_model, DLPRouter):
        return router_or_model
    # a model injected with router="dlp" holds exactly one (shared) DLP router as a submodule
    routers = [m for m in router_or_model.modules() if isinstance(m, DLPRouter)]
    if len(routers) != 1:
        raise ValueError("train_dlp_classifier needs a DLPRouter or a model injected with router='dlp'")
    return routers[0]


def _embed(router: DLPRouter, texts: Sequence[str], tokenizer: Any) -> Tensor:
    """Sentence embeddings ``[N, D]`` of ``texts`` from the router's embedding source."""
    if router.config.embedding_source == "encoder":
        return router.encode_texts(texts)
    if tokenizer is None:
        raise ValueError("with embedding_source='model' the texts are tokenized first: pass tokenizer=")
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    device = router.classifier[0].weight.device
    return router.embed_ids(batch["input_ids"].to(device), batch["attention_mask"].to(device))


def train_dlp_classifier(
    router_or_model: nn.Module,
    texts: Sequence[str],
    labels: Sequence[int] | Tensor,
    *,
    tokenizer: Any = None,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    seed: int = 0,
    max_grad_norm: float | None = None,
) -> list[float]:
    """Fit the DLP classifier with cross-entropy on ``(text, label)`` pairs; returns the loss per epoch.

    ``labels[i]`` is the expert (adapter) index of ``texts[i]``. With ``embedding_source="model"``
    the texts are embedded by the model's input embeddings, which needs its ``tokenizer``. Each
    epoch visits the pairs in a fresh order (seeded by ``seed``) in minibatches of ``batch_size``;
    AdamW at a constant ``lr``, gradient norm clipped to ``max_grad_norm`` when given. Only the
    classifier's parameters change; the router is left in the mode it was in.
    """
    router = _find_dlp_router(router_or_model)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(texts) != labels.shape[0] or len(texts) == 0:
        raise ValueError(
            f"need one label per text and at least one pair; got {len(texts)} texts, {labels.shape[0]} labels"
        )
    if labels.min() < 0 or labels.max() >= router.num_experts:
        raise ValueError(f"labels must be expert indices in [0, {router.num_experts}), got {labels.unique().tolist()}")
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"need batch_size >= 1 and epochs >= 0, got {batch_size}, {epochs}")
    embeddings = _embed(router, texts, tokenizer)
    labels = labels.to(embeddings.device)
    count = len(texts)
    sizes = [min(batch_size, count - start) for start in range(0, count, batch_size)]
    generator = torch.Generator().manual_seed(seed)

    def minibatches() -> Iterator[Tensor]:
        for _ in range(epochs):
            order = torch.randperm(count, generator=generator).to(embeddings.device)
            for start in range(0, count, batch_size):
                yield order[start : start + batch_size]

    def loss_fn(rows: Tensor) -> Tensor:
        return nn.functional.cross_entropy(router.score(embeddings[rows]), labels[rows])

    settings = OptimSettings(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    try:
        losses = train_steps(
            router,
            minibatches(),
            loss_fn,
            steps=epochs * len(sizes),
            settings=settings,
            params=list(router.classifier.parameters()),
            name="train_dlp_classifier",
        )
    finally:
        router.clear()
    history = []
    for epoch in range(epochs):
        total = 0.0
        for loss, size in zip(losses[epoch * len(sizes) : (epoch + 1) * len(sizes)], sizes, strict=True):
            total += loss * size
        history.append(total / count)
    return history


register_text_fitter(DLPRouter.name, train_dlp_classifier)
