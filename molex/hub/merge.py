"""Static merges of LoRA adapters into one plain PEFT adapter.

Conventions follow PEFT's ``add_weighted_adapter`` so that a merged adapter loads in PEFT and
means what PEFT users expect (``s_i = alpha_i / r_i``, ``delta_i = s_i B_i A_i``):

* ``cat``: ``A = [w_1 s_1 A_1; ...]``, ``B = [B_1, ...]``, rank ``sum r_i``; exactly
  ``delta = sum_i w_i delta_i``.
* ``linear``: ``A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i``
  (same rank required); this mixes the factors, so it is not ``sum_i w_i delta_i``.
* ``svd``: the best rank-``svd_rank`` approximation of ``sum_i w_i delta_i`` (``B = U S``, ``A = V^T``).

A module that only some adapters target is merged over those adapters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from molex.hub.fuse import AdapterSource, load_adapters
from molex.hub.peft_format import PeftLoraAdapter, check_output_dir, write_peft_adapter

__all__ = ["COMBINATIONS", "merge_adapters", "merged_factors"]

COMBINATIONS = ("cat", "linear", "svd")


def merged_factors(
    adapters: Sequence[PeftLoraAdapter], weights: Sequence[float], combination: str, svd_rank: int | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module: (A [r, in], B [out, r])}`` of the merge, with scaling folded in (PEFT scaling 1)."""
    if combination not in COMBINATIONS:
        raise ValueError(f"unknown combination {combination!r}; choose one of {COMBINATIONS}")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights given for {len(adapters)} adapters")
    if svd_rank is not None and (combination != "svd" or svd_rank < 1):
        raise ValueError("svd_rank is an option of combination='svd' and must be >= 1")
    modules: list[str] = []
    for adapter in adapters:
        modules += [m for m in adapter.modules if m not in modules]
    merged = {}
    for module in modules:
        parts = [
            (a, float(w), a.modules[module]) for a, w in zip(adapters, weights, strict=True) if module in a.modules
        ]
        dtype = parts[0][2].A.dtype
        if combination == "cat":
            A = torch.cat([w * f.scaling * f.A.float() for _, w, f in parts])
            B = torch.cat([f.B.float() for _, _, f in parts], dim=1)
        elif combination == "linear":
            ranks = {a.name: f.rank for a, _, f in parts}
            if len(set(ranks.values())) > 1:
                raise ValueError(
                    f"combination='linear' needs one rank per module, but module {module!r} has ranks {ranks}; "
                    "use 'cat' or 'svd'"
                )
            # PEFT puts the sign on A only, so that sqrt(|w s|) on both sides gives back w s
            A = sum(
                (1.0 if w * f.scaling >= 0 else -1.0) * abs(w * f.scaling) ** 0.5 * f.A.float() for _, w, f in parts
            )
            B = sum(abs(w * f.scaling) ** 0.5 * f.B.float() for _, w, f in parts)
        else:
            delta = sum(w * f.scaling * (f.B.double() @ f.A.double()) for _, w, f in parts)
            rank = min(svd_rank or max(f.rank for _, _, f in parts), *delta.shape)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            B, A = U[:, :rank] * S[:rank], Vh[:rank]
        merged[module] = (A.to(dtype), B.to(dtype))
    return merged


def check_merge_output(adapters: Sequence[PeftLoraAdapter], out_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that is one of the inputs' folders (symlinks resolved), a file, or a
    folder holding an adapter molex did not write (unless ``overwrite``)."""
    target = Path(out_dir).resolve()
    for adapter in adapters:
        if adapter.path is not None and Path(adapter.path).resolve() == target:
            raise ValueError(
                f"out_dir {str(out_dir)!r} is the folder of input adapter {adapter.name!r}: merging would replace "
                "one of its own inputs; choose another out_dir"
            )
    check_output_dir(out_dir, overwrite=overwrite)


def merge_adapters(
    adapters: Mapping[str, AdapterSource],
    weights: Sequence[float],
    combination: str = "cat",
    out_dir: str | os.PathLike | None = None,
    *,
    svd_rank: int | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge PEFT LoRA adapters with one weight each and write a plain PEFT adapter to ``out_dir``.

    Returns ``out_dir``; ``PeftModel.from_pretrained(base, out_dir)`` loads it. ``out_dir`` may
    not be one of the inputs; an adapter there that molex did not write is replaced only with
    ``overwrite=True``. A crash at any instant leaves ``out_dir`` as it was or fully written.
    """
    if out_dir is None:
        raise ValueError("merge_adapters needs out_dir, the directory to write the merged PEFT adapter to")
    loaded = load_adapters(adapters)
    check_merge_output(loaded, out_dir, overwrite=overwrite)
    fan_in_fan_out = {bool(a.config.get("fan_in_fan_out", False)) for a in loaded}
    if len(fan_in_fan_out) > 1:
        raise ValueError("the adapters disagree on fan_in_fan_out: they were trained on different architectures")
    base = base_model_name_or_path or loaded[0].config.get("base_model_name_or_path")
    return write_peft_adapter(
        out_dir,
        merged_factors(loaded, weights, combination, svd_rank),
        base_model_name_or_path=base,
        fan_in_fan_out=fan_in_fan_out.pop(),
        task_type=loaded[0].config.get("task_type", "CAUSAL_LM"),
        overwrite=overwrite,
    )
