"""Check once that a one-expert, ``fixed``-router molex adapter is PEFT's LoRA: same logits, same answers.

The trained molex adapter is written as a PEFT LoRA adapter (each module's scaling folded into ``A``),
loaded with ``peft.PeftModel`` onto the same base, and compared with the molex model on a validation
batch (largest absolute logit difference) and on the test split (exact match). No second training:
the same trained weights, two implementations.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import molex
from molex.hub.peft_format import write_peft_adapter

__all__ = ["peft_equivalence"]


def _peft_modules(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A [r, in] * scaling, B [out, r])}`` of a one-expert molex model."""
    modules = {}
    for name, layer in molex.mole_layers(model).items():
        experts = layer.experts
        if experts.num_experts != 1:
            raise ValueError(f"{name} has {experts.num_experts} experts: only a one-expert adapter is a plain LoRA")
        A = experts.lora_A[0].detach().float() * float(experts.scaling[0])
        B = experts.lora_B[0].detach().float().T.contiguous()  # molex [r, out] -> PEFT [out, r]
        modules[name] = (A, B)
    return modules


@torch.no_grad()
def peft_equivalence(base: nn.Module, tokenizer: Any, dm: Any, adapter_dir: Path, *, eval_kwargs: dict) -> dict:
    """Compare the molex model of ``adapter_dir`` with the same weights run by PEFT.

    Returns ``{"max_abs_logit_diff", "max_abs_logit_change" (adapter vs base), "molex_accuracy", "peft_accuracy", "same_predictions"}``, or
    ``{"skipped": reason}`` when peft is not installed. ``base`` is left as it was.
    """
    try:
        from peft import PeftModel
    except ImportError:
        return {"skipped": "peft is not installed (pip install molex-lora[dev])"}
    from molex.evaluation.generation import evaluate_generation

    batch = next(iter(dm.val_dataloader()))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    examples = dm.test_examples()
    base_logits = base.eval()(**inputs).logits.float()
    model = molex.load_adapter(base, adapter_dir).eval()
    try:
        mole_logits = model(**inputs).logits.float()
        mole_eval = evaluate_generation(model, tokenizer, examples, task_names=dm.task_names, **eval_kwargs)
        modules = _peft_modules(model)
    finally:
        molex.unload(model)
    with tempfile.TemporaryDirectory() as tmp:
        write_peft_adapter(tmp, modules)
        peft_model = PeftModel.from_pretrained(base, tmp).eval()
        try:
            peft_logits = peft_model(**inputs).logits.float()
            peft_eval = evaluate_generation(peft_model, tokenizer, examples, routing_inputs=False, **eval_kwargs)
        finally:
            peft_model.unload()  # takes PEFT's layers out of ``base`` again
    same = [
        a["prediction"] == b["prediction"]
        for a, b in zip(mole_eval["predictions"], peft_eval["predictions"], strict=True)
    ]
    mask = inputs["attention_mask"].bool()
    return {
        "max_abs_logit_diff": float((mole_logits - peft_logits).abs()[mask].max()),
        # how far the adapter moves the logits: a zero difference above means something only if this is not
        "max_abs_logit_change": float((mole_logits - base_logits).abs()[mask].max()),
        "molex_accuracy": mole_eval["accuracy"],
        "peft_accuracy": peft_eval["accuracy"],
        "same_predictions": sum(same) / len(same),
    }
