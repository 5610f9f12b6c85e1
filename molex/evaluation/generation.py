"""Evaluation: exact-match accuracy by greedy generation, token loss, multiple-choice log-likelihood scoring.

All functions take a Hugging Face causal LM (plain or molex-injected) and its tokenizer. For an injected
model, the molex routing inputs (``prompt_mask [B, S]`` and, given ``task_names``, ``task_ids [B]``) reach
the routers: through the call for forward passes, and through :func:`molex.routing_inputs` for
``generate()``, which rejects unknown keyword arguments.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from molex.core.tables import format_table
from molex.data.collate import pad_collate
from molex.data.templates import IGNORE_INDEX, encode_answer, encode_prompt, resolve_template
from molex.layer.context import ROUTING_KWARGS
from molex.layer.context import routing_inputs as pin_routing_inputs
from molex.layer.inject import is_injected

__all__ = [
    "PRECISIONS",
    "eval_autocast",
    "evaluate_generation",
    "evaluate_loss",
    "format_table",
    "normalize_answer",
    "score_multiple_choice",
]

#: evaluation precisions: float32 as the model is, or bfloat16 autocast (weights stay as they are)
PRECISIONS = ("float32", "bf16")


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: lowercase, surrounding whitespace stripped, inner whitespace collapsed."""
    return " ".join(str(text).lower().split())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def eval_autocast(model: nn.Module, precision: str) -> contextlib.AbstractContextManager:
    """The context an evaluation forward runs in: nothing for ``"float32"``; for ``"bf16"``, autocast
    to bfloat16 on the model's device (matrix products in bfloat16, softmax and losses in float32).

    bf16 is a speed option for accelerators and CPUs with native bfloat16 units; on a CPU without
    them (AVX2 only) emulated bfloat16 matrix products are several times slower than float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(model).type, dtype=torch.bfloat16)


def _task_ids(examples: Sequence[Mapping[str, Any]], task_names: Sequence[str] | None) -> Tensor | None:
    if task_names is None:
        return None
    index = {name: i for i, name in enumerate(task_names)}
    unknown = sorted({str(ex.get("task")) for ex in examples} - set(index))
    if unknown:
        raise ValueError(f"examples have task(s) {unknown} that are not in task_names {list(task_names)}")
    return torch.tensor([index[str(ex.get("task"))] for ex in examples], dtype=torch.long)


def _feature_ids(
    examples: Sequence[Mapping[str, Any]], feature_values: Mapping[str, Sequence[str]] | None
) -> dict[str, Tensor] | None:
    """``{feature: ids [B]}`` from each example's ``features`` values (see ``InstructionDataModule.feature_values``)."""
    if not feature_values:
        return None
    ids: dict[str, list[int]] = {name: [] for name in feature_values}
    for ex in examples:
        values = list(ex.get("features") or [])
        if len(values) != len(feature_values):
            raise ValueError(f"an example has feature values {values}, expected one per feature {list(feature_values)}")
        for (name, known), value in zip(feature_values.items(), values, strict=True):
            if value not in known:
                raise ValueError(f"feature {name!r} has value {value!r}, not one of {list(known)}")
            ids[name].append(list(known).index(value))
    return {name: torch.tensor(v, dtype=torch.long) for name, v in ids.items()}


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _task_of(example: Mapping[str, Any]) -> str:
    return str(example.get("task") or "default")


def _summarise(tasks: Sequence[str], correct: Sequence[bool]) -> dict[str, Any]:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for task, ok in zip(tasks, correct, strict=True):
        per_task[task].append(ok)
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "per_task": {task: sum(v) / len(v) for task, v in per_task.items()},
        "counts": {task: len(v) for task, v in per_task.items()},
        "num_examples": len(correct),
    }


@torch.no_grad()
def evaluate_generation(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    template: str = "chat",
    system_prompt: str | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    routing_inputs: bool | None = None,
    task_names: Sequence[str] | None = None,
    feature_values: Mapping[str, Sequence[str]] | None = None,
    precision: str = "float32",
) -> dict[str, Any]:
    """Greedy-decode an answer for every example and score exact match against ``example["output"]``.

    Prompts are left-padded so a batch decodes together with the KV cache; answers are compared after
    :func:`normalize_answer`. ``routing_inputs``: pass ``prompt_mask`` (and ``task_ids`` when
    ``task_names`` is given, ``features`` when ``feature_values`` is given) to the routers; ``None``
    means "if the model is molex-injected".
    ``precision``: ``"float32"`` or ``"bf16"`` (autocast, see :func:`eval_autocast`).

    Returns ``{"accuracy", "per_task": {task: acc}, "counts": {task: n}, "num_examples", "predictions"}``,
    ``predictions`` being ``[{"task", "prediction", "target", "correct"}]`` in input order.
    """
    if not examples:
        raise ValueError("evaluate_generation got no examples")
    autocast = eval_autocast(model, precision)  # checks the value before any work
    template = resolve_template(tokenizer, template)
    use_routing = is_injected(model) if routing_inputs is None else routing_inputs
    device = _device(model)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    examples = list(examples)
    prompts = [encode_prompt(tokenizer, ex, template, system_prompt) for ex in examples]
    # batch prompts of similar length together (less padding); results go back to input order
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    predictions: list[dict[str, Any]] = [{} for _ in examples]
    try:
        for chunk in _batches(order, batch_size):
            features = [
                {"input_ids": prompts[i], "labels": prompts[i], "prompt_mask": [1] * len(prompts[i])} for i in chunk
            ]
            batch = pad_collate(features, pad_token_id=pad, padding_side="left")
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            pinned = {}
            if use_routing:
                pinned["prompt_mask"] = attention_mask
                ids = _task_ids([examples[i] for i in chunk], task_names)
                if ids is not None:
                    pinned["task_ids"] = ids.to(device)
                chunk_features = _feature_ids([examples[i] for i in chunk], feature_values)
                if chunk_features is not None:
                    pinned["features"] = {name: v.to(device) for name, v in chunk_features.items()}
            pin = pin_routing_inputs(model, **pinned) if use_routing else contextlib.nullcontext()
            with pin, autocast:
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
            for i, row in zip(chunk, out[:, input_ids.shape[1] :], strict=True):
                text = tokenizer.decode(row, skip_special_tokens=True)
                target = str(examples[i].get("output", ""))
                predictions[i] = {
                    "task": _task_of(examples[i]),
                    "prediction": text.strip(),
                    "target": target,
                    "correct": normalize_answer(text) == normalize_answer(target),
                }
    finally:
        model.train(was_training)
    result = _summarise([p["task"] for p in predictions], [p["correct"] for p in predictions])
    result["predictions"] = predictions
    return result


def _model_kwargs(model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
    """Model inputs of a collated batch; molex routing inputs only for an injected model."""
    keep = {"input_ids", "attention_mask", "position_ids"}
    if is_injected(model):
        keep |= set(ROUTING_KWARGS)
    return {k: v.to(device) for k, v in batch.items() if k in keep}


def _token_logprobs(model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> tuple[Tensor, Tensor]:
    """Log-probability of each label token and its mask, both ``[B, S-1]``, computed in float32."""
    logits = model(**_model_kwargs(model, batch, device), use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    mask = labels != IGNORE_INDEX
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logprobs * mask, mask


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataloader: Iterable[Mapping[str, Any]], *, precision: str = "float32") -> float:
    """Mean cross-entropy per label token over the whole dataloader (not a mean of batch means); no
    auxiliary losses. ``precision``: ``"float32"`` or ``"bf16"`` (autocast, see :func:`eval_autocast`;
    the log-softmax is taken in float32 either way)."""
    autocast = eval_autocast(model, precision)
    device = _device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in dataloader:
            with autocast:
                logprobs, mask = _token_logprobs(model, batch, device)
            total -= float(logprobs.sum(dtype=torch.float64))
            count += int(mask.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_loss found no label tokens (every label is -100); is the dataloader empty?")
    return total / count


def _answer_index(example: Mapping[str, Any], choices: Sequence[str]) -> int:
    if "answer" in example and isinstance(example["answer"], int) and not isinstance(example["answer"], bool):
        index = example["answer"]
        if not 0 <= index < len(choices):
            raise ValueError(f"answer index {index} is out of range for {len(choices)} choices")
        return index
    target = normalize_answer(str(example.get("output", "")))
    matches = [i for i, choice in enumerate(choices) if normalize_answer(choice) == target]
    if not matches:
        raise ValueError(
            f"the answer {example.get('output')!r} is not one of the choices {list(choices)}; "
            "give 'output' equal to a choice or an integer 'answer' index"
        )
    return matches[0]


@torch.no_grad()
def score_multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    examples_with_choices: Sequence[Mapping[str, Any]],
    *,
    template: str = "chat",
    system_prompt: str | None = None,
    batch_size: int = 16,
    length_normalize: bool = False,
    task_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Pick, per example, the choice with the highest log-likelihood given the prompt.

    Each example has ``choices`` (list of strings) and the correct one as ``output`` (equal to a choice)
    or as an integer ``answer`` index. A choice's score is the sum of its tokens' log-probabilities
    (their mean with ``length_normalize=True``); the closing EOS token is not scored.

    Returns ``{"accuracy", "per_task", "counts", "num_examples", "predictions": [int], "scores": [[float]]}``.
    """
    if not examples_with_choices:
        raise ValueError("score_multiple_choice got no examples")
    template = resolve_template(tokenizer, template)
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    injected = is_injected(model)
    features, owners, answers = [], [], []
    for i, ex in enumerate(examples_with_choices):
        choices = [str(c) for c in ex.get("choices") or []]
        if len(choices) < 2:
            raise ValueError(f"example {i} needs a 'choices' list of at least 2 strings, got {ex.get('choices')!r}")
        answers.append(_answer_index(ex, choices))
        prompt = encode_prompt(tokenizer, ex, template, system_prompt)
        ids = _task_ids([ex], task_names) if injected else None
        for choice in choices:
            answer = encode_answer(tokenizer, choice, add_eos=False)
            if not answer:
                raise ValueError(f"example {i} has an empty choice; every choice needs at least one token")
            feature = {
                "input_ids": prompt + answer,
                "labels": [IGNORE_INDEX] * len(prompt) + answer,
                "prompt_mask": [1] * len(prompt) + [0] * len(answer),
            }
            if ids is not None:
                feature["task_id"] = int(ids[0])
            features.append(feature)
            owners.append(i)
    was_training = model.training
    model.eval()
    flat: list[float] = []
    try:
        for chunk in _batches(features, batch_size):
            batch = pad_collate(chunk, pad_token_id=pad, padding_side="right")
            logprobs, mask = _token_logprobs(model, batch, device)
            sums = logprobs.sum(-1, dtype=torch.float64)
            flat += (sums / mask.sum(-1) if length_normalize else sums).tolist()
    finally:
        model.train(was_training)
    scores: list[list[float]] = [[] for _ in examples_with_choices]
    for owner, score in zip(owners, flat, strict=True):
        scores[owner].append(score)
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = [p == a for p, a in zip(predictions, answers, strict=True)]
    result = _summarise([_task_of(ex) for ex in examples_with_choices], correct)
    result.update(predictions=predictions, scores=scores)
    return result
