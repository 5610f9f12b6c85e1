"""What the default recipe's routers see: per target layer, the size of its inputs and how alike tokens look.

    python -m benchmarks.router_inputs      # SmolLM2-135M, the built-in validation prompts
    python -m benchmarks.router_inputs --model tiny-llama --out /tmp/inputs.json

For every ``q_proj`` / ``v_proj`` / ``down_proj`` of the base model (the default target modules) it records,
over the real tokens of the built-in validation prompts: the inputs' RMS and largest magnitude (a gate's
logits, and AdamW's steps on them, grow with these), the share of the energy in the largest channel, and the
mean cosine between tokens, raw and through each ``input_norm`` of the ``topk`` router
(:func:`molex.routers.inputs.router_input`): close to 1 means every token looks alike to a router.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import machine_record
from molex.data.builtin import make_builtin_dataset
from molex.models import load_model
from molex.routers.inputs import INPUT_NORMS, router_input

TARGETS = ("q_proj", "v_proj", "down_proj")


def _mean_cosine(x: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    return round(float((unit @ unit.T).mean()), 4)


@torch.no_grad()
def measure(model: torch.nn.Module, tokenizer: Any, per_task: int) -> dict[str, dict[str, float]]:
    rows = make_builtin_dataset("validation", per_task, 0)
    batch = tokenizer([f"{r['instruction']}\n{r['input']}" for r in rows], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].float()[real]))
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS
    ]
    try:
        model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for name, x in inputs.items():
        energy = x.pow(2).mean(0)
        out[name] = {
            "rms": round(float(x.pow(2).mean().sqrt()), 4),
            "max_abs": round(float(x.abs().max()), 2),
            "largest_channel_energy": round(float(energy.max() / energy.sum()), 4),
            **{f"mean_cosine_{norm}": _mean_cosine(router_input(x, norm)) for norm in INPUT_NORMS},
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.router_inputs", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-task", type=int, default=4, help="validation prompts per built-in task")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router_inputs.json"))
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    layers = measure(model.eval(), tokenizer, args.per_task)
    report = {
        "command": "python -m benchmarks.router_inputs" + (" " + " ".join(argv) if argv else ""),
        "model": args.model,
        "machine": machine_record(threads=torch.get_num_threads(), precision="float32"),
        "layers": layers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for name, row in layers.items():
        print(
            f"{name:35s} rms {row['rms']:8.3f} max {row['max_abs']:8.1f} cos raw {row['mean_cosine_none']:.2f} log {row['mean_cosine_log']:.2f}"
        )
    return report


if __name__ == "__main__":
    main()
