"""Prompt templates and tokenisation of instruction examples (shared by training data and evaluation).

An example is a dict with ``instruction``, ``input`` (may be empty) and ``output``. Two templates:

* ``"chat"``: the tokenizer's own chat template, one user turn (instruction, blank line, input), then the
  assistant turn; falls back to ``"plain"`` for tokenizers without a chat template.
* ``"plain"``: ``### Instruction:`` / ``### Input:`` / ``### Response:`` sections.

The prompt and the answer are tokenised separately and concatenated, so the boundary between them is
exact: prompt tokens are masked out of the labels, the answer and the closing EOS token are learned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "EncodedExample",
    "encode_answer",
    "encode_example",
    "encode_prompt",
    "format_prompt",
    "resolve_template",
]

logger = logging.getLogger(__name__)

TEMPLATES = ("chat", "plain")
IGNORE_INDEX = -100


def resolve_template(tokenizer: Any, template: str) -> str:
    """Validate ``template``; ``"chat"`` becomes ``"plain"`` (with a log line) for a tokenizer without one."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; use one of {list(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        logger.info("tokenizer has no chat template; using the plain prompt template")
        return "plain"
    return template


def _user_text(example: Mapping[str, Any]) -> str:
    instruction = str(example.get("instruction") or "").strip()
    given = str(example.get("input") or "").strip()
    return f"{instruction}\n\n{given}" if given else instruction


def format_prompt(tokenizer: Any, example: Mapping[str, Any], template: str, system_prompt: str | None = None) -> str:
    """The prompt text up to where the answer starts. ``template`` must already be resolved."""
    if template == "chat":
        messages = [{"role": "user", "content": _user_text(example)}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [f"### Instruction:\n{str(example.get('instruction') or '').strip()}\n\n"]
    if system_prompt:
        parts.insert(0, f"{system_prompt}\n\n")
    given = str(example.get("input") or "").strip()
    if given:
        parts.append(f"### Input:\n{given}\n\n")
    parts.append("### Response:\n")
    return "".join(parts)


def encode_prompt(
    tokenizer: Any, example: Mapping[str, Any], template: str, system_prompt: str | None = None
) -> list[int]:
    """Token ids of the prompt. Chat templates carry their own special tokens; the plain one gets the tokenizer's."""
    text = format_prompt(tokenizer, example, template, system_prompt)
    return tokenizer(text, add_special_tokens=template == "plain")["input_ids"]


def encode_answer(tokenizer: Any, answer: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else ids


@dataclass
class EncodedExample:
    """One tokenised example. ``input_ids``, ``labels`` and ``prompt_mask`` have the same length."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX (-100) on prompt tokens
    prompt_mask: list[int]  # 1 on prompt tokens, 0 on answer tokens
    truncated: bool  # cut to max_length
    answer_tokens: int  # answer tokens (EOS included) that survived truncation


def encode_example(
    tokenizer: Any,
    example: Mapping[str, Any],
    template: str,
    max_length: int | None = None,
    system_prompt: str | None = None,
) -> EncodedExample:
    """Tokenise prompt + answer (+ EOS), mask the prompt from the labels, cut the end beyond ``max_length``."""
    prompt = encode_prompt(tokenizer, example, template, system_prompt)
    answer = encode_answer(tokenizer, str(example.get("output") or "").strip())
    ids = prompt + answer
    labels = [IGNORE_INDEX] * len(prompt) + answer
    prompt_mask = [1] * len(prompt) + [0] * len(answer)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels, prompt_mask = ids[:max_length], labels[:max_length], prompt_mask[:max_length]
    return EncodedExample(ids, labels, prompt_mask, truncated, sum(1 for x in labels if x != IGNORE_INDEX))
