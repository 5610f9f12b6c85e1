"""Train and evaluate a fused LoRA hub on instruction examples labelled by task (= adapter name).

Shared by ``molex-fuse`` and ``benchmarks/demo_hub.py``. Examples are dicts ``{"instruction",
"input", "output", "task"}`` (the built-in multi-task set's format); an example's ``task`` names the
adapter that should handle it. Needs :mod:`molex.data` and :mod:`molex.evaluation.generation` (torch only).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from molex.data.collate import pad_collate
from molex.data.templates import encode_example, encode_prompt, format_prompt, resolve_template
from molex.evaluation.generation import evaluate_generation
from molex.hub.fuse import adapter_names, fuse_adapters, routing_accuracy
from molex.hub.train import train_router
from molex.layer.inject import get_config, unload
from molex.training import get_text_fitter

__all__ = ["evaluate_fused", "evaluate_single_adapters", "fit_router", "prompt_batches", "task_batches"]


def _task_index(example: Mapping[str, Any], names: Sequence[str]) -> int:
    task = example.get("task")
    if task not in names:
        raise ValueError(f"example task {task!r} is not one of the adapters {list(names)}; label examples by adapter")
    return names.index(task)


def _collate(tokenizer, features: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    return [
        pad_collate(features[i : i + batch_size], pad_token_id=tokenizer.pad_token_id)
        for i in range(0, len(features), batch_size)
    ]


def task_batches(
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    *,
    template: str = "chat",
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Shuffled, right-padded training batches: ``input_ids``, ``attention_mask``, ``labels`` (answer
    tokens only), ``prompt_mask`` and ``task_ids`` (adapter index of each example)."""
    template = resolve_template(tokenizer, template)
    features = []
    for ex in examples:
        enc = encode_example(tokenizer, ex, template)
        features.append(
            {
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "prompt_mask": enc.prompt_mask,
                "task_id": _task_index(ex, names),
            }
        )
    random.Random(seed).shuffle(features)
    return _collate(tokenizer, features, batch_size)


def prompt_batches(
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    *,
    template: str = "chat",
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Prompts only (no answers) with ``prompt_mask`` and ``task_ids``, for :func:`molex.routing_accuracy`."""
    template = resolve_template(tokenizer, template)
    features = []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex, template)
        features.append(
            {"input_ids": ids, "labels": ids, "prompt_mask": [1] * len(ids), "task_id": _task_index(ex, names)}
        )
    return _collate(tokenizer, features, batch_size)


def fit_router(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    *,
    template: str = "chat",
    steps: int = 100,
    lr: float = 5e-3,
    task_loss_coef: float = 10.0,
    dlp_epochs: int = 60,
    batch_size: int = 8,
    seed: int = 0,
) -> list[float]:
    """Train the router of a fused model on labelled examples; returns the loss history.

    A router with a text fitter (:func:`molex.training.get_text_fitter`, e.g. ``dlp``'s sentence
    classifier) is fitted on the prompt texts with their adapter labels for ``dlp_epochs`` epochs.
    Other routers: :func:`molex.train_router` with the LM loss on answers plus
    ``task_loss_coef`` * cross-entropy to the example's adapter (MeteoRA-style supervision).
    """
    names = adapter_names(model)
    fit_texts = get_text_fitter(get_config(model).router_name)
    if fit_texts is not None:
        resolved = resolve_template(tokenizer, template)
        texts = [format_prompt(tokenizer, ex, resolved) for ex in examples]
        labels = [_task_index(ex, names) for ex in examples]
        return fit_texts(model, texts, labels, tokenizer=tokenizer, epochs=dlp_epochs, lr=lr, seed=seed)
    batches = task_batches(tokenizer, examples, names, template=template, batch_size=batch_size, seed=seed)
    return train_router(model, batches, steps=steps, lr=lr, task_loss_coef=task_loss_coef)


def evaluate_single_adapters(
    model: nn.Module,
    tokenizer,
    adapters: Mapping[str, str | Path],
    examples: Sequence[Mapping[str, Any]],
    *,
    template: str = "chat",
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> dict[str, float]:
    """Exact-match accuracy of each adapter alone on its own task's examples: ``{adapter: accuracy}``.

    Each adapter is applied through ``fuse_adapters(..., router="fixed", weights=[1.0])``, which
    equals the plain LoRA model (tested against PEFT); ``model`` is restored after each one.
    """
    scores = {}
    for name, path in adapters.items():
        own = [ex for ex in examples if ex.get("task") == name]
        if not own:
            continue
        single = fuse_adapters(model, {name: path}, router="fixed", weights=[1.0])
        try:
            result = evaluate_generation(
                single, tokenizer, own, template=template, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
        finally:
            unload(single)
        scores[name] = result["accuracy"]
    return scores


def evaluate_fused(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    *,
    template: str = "chat",
    max_new_tokens: int = 16,
    batch_size: int = 16,
    generation: bool = True,
) -> dict[str, Any]:
    """Routing accuracy on task identity (prompts only) and per-task exact-match accuracy of a fused model.

    The routers see only the prompt: no ``task_ids`` are passed at inference.
    """
    names = adapter_names(model)
    prompts = prompt_batches(tokenizer, examples, names, template=template, batch_size=batch_size)
    result: dict[str, Any] = {"routing_accuracy": routing_accuracy(model, prompts), "per_task": {}}
    if generation:
        evaluation = evaluate_generation(
            model, tokenizer, examples, template=template, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        result["per_task"] = evaluation["per_task"]
        result["accuracy"] = evaluation["accuracy"]
    return result
