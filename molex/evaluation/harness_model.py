"""lm-evaluation-harness's Hugging Face wrapper, fed the molex routing inputs: :class:`MolexHFLM`.

lm-eval's ``HFLM`` calls a causal LM with token ids only: ``model(input_ids)`` on right-padded rows
(zeros) for log-likelihoods, ``model.generate(input_ids, attention_mask)`` for generation. The routers
of a molex model may read more, so this subclass adds, per batch, what :mod:`molex.evaluation.generation` passes too:

* ``task_ids [B]`` (all ``task_id``) and ``features {name: ids [B]}``: one task / feature value for the
  whole run, for ``mtl``, ``features`` and task-supervised ``gate``/``dlp`` routers;
* ``prompt_mask [B, S]``: for log-likelihoods the context tokens of each request (1) and not its
  continuation (0), as :func:`molex.evaluation.generation.score_multiple_choice` marks them, so sequence-level routers
  decide from the prompt alone and never see the answer being scored (the context's trailing whitespace,
  which lm-eval scores as part of the continuation, counts as prompt, as in molex's templates); for
  generation the prompt;
* ``route_text`` (only when a router reads it, ``dlp`` with an external encoder): each request's
  context string (for generation, the decoded prompt);
* the attention mask of the right padding, so padding is no token of any sequence (the logits of the
  real tokens of a causal LM do not change: padding comes after them).

A log-likelihood row is matched back to its request by its tokens: lm-eval builds row ``i`` as
``(context + continuation)[-(max_length + 1):][:-1]`` and pads it with zeros. Two requests whose rows hold
the same tokens but split them differently between context and continuation get the shorter prompt.
Rows that match no request (lm-eval's batch-size probe) count as all prompt, no padding.

Imports ``lm_eval`` at the top: import this module only where lm-eval is wanted (:mod:`molex.evaluation.harness`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from torch import Tensor

from molex.layer.context import find_context, routing_inputs

__all__ = ["MolexHFLM"]


class MolexHFLM(HFLM):
    """``HFLM`` over an in-memory (molex-injected or plain) causal LM that passes molex routing inputs.

    Args:
        pretrained: the model object (``HFLM`` keeps it as it is; no copy, no dtype or device change).
        tokenizer: its tokenizer.
        task_id: the task id of every sequence (``task_ids [B]``), or ``None`` to pass none.
        features: ``{feature name: value id}`` for every sequence, or ``None``.
        **kwargs: ``HFLM`` options (``batch_size``, ``max_length``, ...).
    """

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any,
        *,
        task_id: int | None = None,
        features: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        self.routing_context = find_context(pretrained)
        self.task_id = task_id
        self.features = dict(features or {})
        self._rows: dict[tuple[int, ...], tuple[int, str | None]] = {}
        self._row_lengths: list[int] = []

    # ------------------------------------------------------------------ log-likelihoods
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        rows: dict[tuple[int, ...], tuple[int, str | None]] = {}
        for request_str, context_enc, continuation_enc in requests:
            inp = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
            if request_str is None:  # a rolling window (perplexity): no prompt, the window is the text
                prompt_len, text = len(inp), None
            else:  # the last continuation token is predicted, never fed
                moved = self._moved_whitespace(request_str[0], continuation_enc)
                prompt_len, text = min(len(inp) - len(continuation_enc) + 1 + moved, len(inp)), request_str[0]
            key = tuple(inp)
            known = rows.get(key)
            rows[key] = (prompt_len, text) if known is None else (min(known[0], prompt_len), known[1])
        self._rows, self._row_lengths = rows, sorted({len(key) for key in rows}, reverse=True)
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._rows, self._row_lengths = {}, []

    def _moved_whitespace(self, context: str, continuation_enc: list[int]) -> int:
        """How many leading continuation tokens are the context's trailing whitespace: lm-eval moves it into
        the continuation for tokenisation; molex's prompt (a template ending in a newline) keeps it."""
        spaces = len(context) - len(context.rstrip())
        if spaces == 0:
            return 0
        tokens = self.tok_encode(context[-spaces:], add_special_tokens=False)
        return len(tokens) if tokens and continuation_enc[: len(tokens)] == tokens else 0

    def _match(self, row: list[int]) -> tuple[int, int, str | None]:
        """``(real length, prompt length, context text)`` of one zero-padded row."""
        for length in self._row_lengths:
            if length <= len(row) and not any(row[length:]):
                found = self._rows.get(tuple(row[:length]))
                if found is not None:
                    return length, found[0], found[1]
        return len(row), len(row), None

    def _model_call(self, inps: Tensor, attn_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """Logits ``[B, S, V]`` of the right-padded rows ``inps [B, S]``, with the routing inputs."""
        if self.backend != "causal" or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        attention = torch.ones_like(inps)
        prompt = torch.ones_like(inps)
        texts: list[str] = []
        for i, row in enumerate(inps.tolist()):
            length, prompt_len, text = self._match(row)
            attention[i, length:] = 0
            prompt[i, prompt_len:] = 0
            texts.append(text if text is not None else self.tokenizer.decode(row[:length], skip_special_tokens=True))
        autocast = torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        )
        with torch.no_grad(), autocast, self._routing(inps.shape[0], prompt, texts):
            return self.model(inps, attention_mask=attention).logits

    # ------------------------------------------------------------------ generation
    def _model_generate(self, context: Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> Tensor:
        """``generate`` on the left-padded prompts ``context [B, S]``, with the routing inputs pinned."""
        mask = generation_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(context)
        texts = [
            self.tokenizer.decode(row[keep.bool()].tolist(), skip_special_tokens=True)
            for row, keep in zip(context, mask, strict=True)
        ]
        with self._routing(context.shape[0], mask, texts):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # ------------------------------------------------------------------ routing inputs
    def _routing(self, batch: int, prompt: Tensor, texts: Sequence[str]) -> contextlib.AbstractContextManager:
        """Pin this batch's routing inputs on the model (nothing for a model without molex layers)."""
        ctx = self.routing_context
        if ctx is None:
            return contextlib.nullcontext()
        device = prompt.device
        inputs: dict[str, Any] = {"prompt_mask": prompt}
        if self.task_id is not None:
            inputs["task_ids"] = torch.full((batch,), self.task_id, dtype=torch.long, device=device)
        if self.features:
            inputs["features"] = {
                name: torch.full((batch,), value, dtype=torch.long, device=device)
                for name, value in self.features.items()
            }
        if "route_text" in ctx.readers:
            inputs["route_text"] = list(texts)
        return routing_inputs(self.model, **inputs)
