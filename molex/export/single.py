"""One PEFT LoRA approximating a token-level mixture: the expected update on calibration data, truncated by SVD.

A token-level router gives every token its own mixture, which no single LoRA reproduces. The best
single update in expectation is the routing-weighted average of the experts' updates over real
tokens,

    dW = sum_j gbar_j s_j B_j^T A_j,      gbar_j = mean over real calibration tokens of g_tj,

(over the factors the expert op multiplies, see :mod:`molex.export.capture`). Its rank is at most
the sum of the experts' ranks; :func:`export_single` truncates it to ``rank`` by SVD (computed
from the factors through two QR decompositions, never forming ``dW`` when it is large) and reports
per layer the relative Frobenius error ``||dW - dW_rank||_F / ||dW||_F`` of the truncation. That
number says how much of the *expected* update the adapter keeps; how far the expected update is
from the per-token mixture is what an evaluation of the adapter measures.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from molex.core.model_argument import takes_model
from molex.export.capture import LayerFactors, capture_gates, check_model_batch, eval_mode, is_conv1d
from molex.hub.peft_format import check_output_dir, write_peft_adapter
from molex.layer.inject import get_config, mole_layers

__all__ = ["REPORT_NAME", "SingleExport", "calibration_stream", "expected_update_svd", "export_single"]

REPORT_NAME = "export_report.json"


@dataclass
class SingleExport:
    """What :func:`export_single` wrote: the adapter folder, per-layer ranks and relative Frobenius errors."""

    path: Path
    rank: int | None
    ranks: dict[str, int]
    errors: dict[str, float]
    calibration_tokens: int

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0

    def report(self) -> dict[str, Any]:
        return {
            "kind": "expected update over calibration tokens, truncated by SVD",
            "rank": self.rank,
            "ranks": self.ranks,
            "relative_frobenius_error": self.errors,
            "mean_relative_frobenius_error": self.mean_error,
            "calibration_tokens": self.calibration_tokens,
        }


def _factor_stack(factors: LayerFactors, mean_gate: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(B [out, R], A [R, in])`` (float64) with ``dW = B @ A``; ``None`` when every weight is 0."""
    weights = mean_gate.double().cpu() * factors.scaling.double().cpu()
    chosen = [j for j in range(weights.shape[0]) if weights[j] != 0]
    if not chosen:
        return None
    A_all, B_all = factors.A.double().cpu(), factors.B.double().cpu()
    if A_all.shape[0] == 1 and B_all.shape[0] > 1:  # shared A: the B's add up
        return sum(weights[j] * B_all[j] for j in chosen).t(), A_all[0]
    return torch.cat([weights[j] * B_all[j] for j in chosen]).t(), torch.cat([A_all[j] for j in chosen])


def expected_update_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``dW = B @ A`` (``B [out, R]``, ``A [R, in]``) from the factors: ``(U [out, m], S [m], Vh [m, in])``.

    ``B = Qb Rb`` and ``A^T = Qa Ra`` give ``dW = Qb (Rb Ra^T) Qa^T``; the SVD of the small middle
    matrix gives that of ``dW``, at a cost linear in ``out`` and ``in``.
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.t())
    U, S, Vh = torch.linalg.svd(Rb @ Ra.t(), full_matrices=False)
    return Qb @ U, S, Vh @ Qa.t()


def _truncate(B: Tensor, A: Tensor, rank: int | None, dtype: torch.dtype) -> tuple[tuple[Tensor, Tensor], int, float]:
    U, S, Vh = expected_update_svd(B, A)
    total = float(S.square().sum())
    nonzero = int((S.max() * 1e-12 < S).sum()) if total > 0 else 0
    k = nonzero if rank is None else min(rank, nonzero)
    error = (float(S[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return ((Vh[:k]).to(dtype), (U[:, :k] * S[:k]).to(dtype)), k, error


def calibration_stream(batches: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """The calibration batches, each checked by :func:`check_model_batch` (named by its position) before the
    model sees it.

    A list or tuple is checked whole before the first forward, so a bad item far down fails at once; a
    stream (a data loader, a generator) is checked item by item as it is read. A text, a single batch or
    a tensor given in place of the iterable of batches is refused too (iterating it would give
    characters, keys or rows).
    """
    if isinstance(batches, (str, bytes, Mapping, Tensor)) or not isinstance(batches, Iterable):
        hint = "; wrap one batch in a list: [batch]" if isinstance(batches, Mapping) else ""
        raise TypeError(
            f"calibration_batches must be an iterable of batches (a list or a data loader), got a "
            f"{type(batches).__name__}{hint}"
        )
    if isinstance(batches, Sequence):
        for index, batch in enumerate(batches):
            check_model_batch(batch, f"calibration_batches[{index}]")
        return iter(batches)
    return (check_model_batch(batch, f"calibration_batches[{index}]") for index, batch in enumerate(batches))


@takes_model
def export_single(
    model: nn.Module,
    out_dir: str | os.PathLike,
    calibration_batches: Iterable[Mapping[str, Any]],
    *,
    rank: int | None,
    overwrite: bool = False,
) -> SingleExport:
    """Write one PEFT LoRA adapter approximating ``model``'s routed mixture; report its truncation error.

    Args:
        model: a molex model with any router (token-level ones are the point; a per-sequence router's
            routes export exactly with :func:`molex.export_routes`).
        out_dir: the adapter folder (``adapter_config.json``, ``adapter_model.safetensors`` and
            ``export_report.json`` with the per-layer ranks and errors), published by one rename.
        calibration_batches: batches of the model's inputs (``input_ids [B, S]``, ``attention_mask``,
            routing inputs; ``labels`` are ignored) over whose real tokens the routing is averaged. Each
            must be a dict of tensors; anything else is refused naming its position and type.
        rank: the adapter's rank per layer (a layer whose expected update has a lower rank keeps that);
            ``None`` keeps every layer's full rank (then the adapter is the expected update exactly).

    Layers whose expected update is zero are left out of the adapter.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer (or None for full rank), got {rank!r}")
    check_output_dir(out_dir, overwrite=overwrite)
    layers = mole_layers(model)
    if not layers:
        raise ValueError("this model has no MoLE layers; load or inject a molex adapter first")
    batches = calibration_stream(calibration_batches)
    sums: dict[str, Tensor] = {}
    factors: dict[str, LayerFactors] = {}
    tokens = 0
    device = next(model.parameters()).device
    with eval_mode(model):
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            mask = batch.get("attention_mask")
            mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
            mask = mask.bool()
            for name, seen in capture_gates(model, batch).items():
                factors.setdefault(name, seen.factors)
                gate = seen.gates[mask].sum(0).double().cpu()  # [E'] over real tokens
                sums[name] = gate if name not in sums else sums[name] + gate
            tokens += int(mask.sum())
    if tokens == 0:
        raise ValueError("calibration_batches held no real tokens; give batches with input_ids and attention_mask")
    modules, ranks, errors = {}, {}, {}
    for name in layers:
        stack = _factor_stack(factors[name], sums[name] / tokens)
        if stack is None:
            continue
        lora, k, error = _truncate(*stack, rank, factors[name].A.dtype)
        if k == 0:
            continue
        modules[name], ranks[name], errors[name] = lora, k, error
    if not modules:
        raise ValueError(
            "the expected update is zero in every layer (untrained experts, or a router that gives them no weight "
            "on these tokens); there is nothing to export"
        )
    result = SingleExport(Path(out_dir), rank, ranks, errors, tokens)
    conv1d = any(is_conv1d(layer) for layer in layers.values())
    result.path = write_peft_adapter(
        out_dir,
        modules,
        base_model_name_or_path=get_config(model).base_model_name_or_path,
        fan_in_fan_out=conv1d,
        overwrite=overwrite,
        extra_json={REPORT_NAME: result.report()},
    )
    return result
