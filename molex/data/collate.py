"""Batch tokenised examples: padding collation and (optional) packing of several examples per row.

A feature is a dict with lists ``input_ids``, ``labels``, ``prompt_mask`` and an int ``task_id``.
Batches are ready for ``model(**batch)`` on a molex-injected model (whose routing hook takes
``prompt_mask`` and ``task_ids`` out of the call):

* padded: ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and padding), ``prompt_mask``, all
  ``[B, S]``; ``task_ids [B]``.
* packed: the same without ``attention_mask`` and with ``position_ids [B, S]`` that restart at 0 for every
  example; ``transformers`` then builds a block-diagonal causal mask, so packed examples do not attend to
  each other. It does so only when the forward has no KV cache, so packed batches also carry
  ``use_cache=False`` (a bool, not a tensor). A packed row only holds examples of one task, so ``task_ids``
  stays exact.

Features that carry ``feature_ids`` (one int per feature, FLix's ``features`` router) give
``features = {name: ids [B]}`` when the collate function is told the feature names; packed rows then
only hold examples that share every feature value too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from molex.data.templates import IGNORE_INDEX

__all__ = ["pack_features", "packed_collate", "pad_collate"]


def _pad(rows: Sequence[Sequence[int]], value: int, length: int, left: bool) -> Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, length - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _feature_ids(features: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Tensor]:
    """``{name: ids [B]}`` from each feature's ``feature_ids`` (one id per name, in order)."""
    rows = [list(f["feature_ids"]) for f in features]
    if any(len(row) != len(names) for row in rows):
        raise ValueError(f"every example needs one feature id per feature {list(names)}")
    return {name: torch.tensor([row[i] for row in rows], dtype=torch.long) for i, name in enumerate(names)}


def pad_collate(
    features: Sequence[dict[str, Any]],
    *,
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
    feature_names: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Pad a list of features to the longest one (right padding for training, left for generation).

    ``feature_names``: names of the ids in each feature's ``feature_ids``; the batch then holds
    ``features = {name: ids [B]}``.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not features:
        raise ValueError("cannot collate an empty batch")
    length = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    left = padding_side == "left"
    ids = [f["input_ids"] for f in features]
    batch = {
        "input_ids": _pad(ids, pad_token_id, length, left),
        "attention_mask": _pad([[1] * len(x) for x in ids], 0, length, left),
        "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length, left),
        "prompt_mask": _pad([f["prompt_mask"] for f in features], 0, length, left),
    }
    if all("task_id" in f for f in features):
        batch["task_ids"] = torch.tensor([int(f["task_id"]) for f in features], dtype=torch.long)
    if feature_names:
        batch["features"] = _feature_ids(features, feature_names)
    return batch


def pack_features(features: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Greedy first-fit packing of same-task features into rows of at most ``max_length`` tokens.

    Deterministic: features are visited in order; each goes into the first open row of its task with
    room left, else starts a new row. Every feature must already fit in ``max_length``.
    """
    rows: list[dict[str, Any]] = []
    open_rows: dict[tuple, list[int]] = {}  # (task id, feature ids) -> indices of rows that still have room
    for feature in features:
        n = len(feature["input_ids"])
        if n > max_length:
            raise ValueError(f"a feature of {n} tokens does not fit max_length={max_length}; truncate it first")
        task = int(feature.get("task_id", 0))
        ids = list(feature.get("feature_ids") or [])
        candidates = open_rows.setdefault((task, *ids), [])
        row = next((rows[i] for i in candidates if len(rows[i]["input_ids"]) + n <= max_length), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "prompt_mask": [], "position_ids": [], "task_id": task}
            if "feature_ids" in feature:
                row["feature_ids"] = ids
            candidates.append(len(rows))
            rows.append(row)
        row["input_ids"] += feature["input_ids"]
        row["labels"] += feature["labels"]
        row["prompt_mask"] += feature["prompt_mask"]
        row["position_ids"] += list(range(n))
    return rows


def packed_collate(
    features: Sequence[dict[str, Any]],
    *,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    feature_names: Sequence[str] = (),
) -> dict[str, Any]:
    """Right-pad packed rows; the padding forms its own position segment (0, 1, ...) and has no labels."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    length = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    positions = [list(f["position_ids"]) + list(range(length - len(f["position_ids"]))) for f in features]
    batch = {
        "input_ids": _pad([f["input_ids"] for f in features], pad_token_id, length, False),
        "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length, False),
        "prompt_mask": _pad([f["prompt_mask"] for f in features], 0, length, False),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "task_ids": torch.tensor([int(f["task_id"]) for f in features], dtype=torch.long),
        "use_cache": False,  # with a cache, transformers ignores the packing and attends across examples
    }
    if feature_names:
        batch["features"] = _feature_ids(features, feature_names)
    return batch
