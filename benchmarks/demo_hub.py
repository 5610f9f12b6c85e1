"""A real LoRA hub: one PEFT LoRA adapter per task of the built-in dataset, then fused behind routers.

1. For every task of ``molex.data.TASKS``, train a PEFT LoRA adapter on that task only and save it in
   PEFT format (``<out>/adapters/<task>``); evaluate it on its own task's held-out test examples.
2. Fuse all adapters with each router (``gate`` / ``dlp`` when available, ``soft`` otherwise; ``arrow``
   needs no training), train only the router on mixed-task data (LM loss + cross-entropy to the task's
   adapter, MeteoRA-style).
3. Report routing accuracy on task identity over held-out prompts, and per-task exact-match accuracy
   of the fused model vs each single adapter on its own task.

Usage::

    python benchmarks/demo_hub.py --fast                  # tiny random Llama, about a minute
    python benchmarks/demo_hub.py                          # SmolLM2-135M-Instruct (CPU: tens of minutes)
    python benchmarks/demo_hub.py --threads 2 --routers arrow dlp gate --results benchmarks/results/demo_hub_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import molex
from benchmarks.harness import command_line
from benchmarks.machine import machine_record
from molex.data import TASKS, make_builtin_dataset
from molex.evaluation.generation import evaluate_generation
from molex.evaluation.hub import evaluate_fused, fit_router, task_batches
from molex.models import load_model


@dataclass
class HubSettings:
    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "up_proj", "down_proj"])
    rank: int = 8
    alpha: float = 16.0
    train_per_task: int = 64
    test_per_task: int = 25
    adapter_steps: int = 60
    adapter_lr: float = 1e-3
    router_steps: int = 60
    router_lr: float = 5e-3
    dlp_epochs: int = 60
    task_loss_coef: float = 10.0
    batch_size: int = 8
    max_new_tokens: int = 12
    template: str = "chat"
    evaluate: bool = True  # greedy-decode the test examples (per-task accuracy)
    seed: int = 0
    config_overrides: dict[str, Any] | None = None


FAST = {
    "model": "tiny-llama",
    "train_per_task": 32,
    "test_per_task": 10,
    "adapter_steps": 15,
    "adapter_lr": 3e-3,
    "router_steps": 150,
    "router_lr": 1e-2,
    "max_new_tokens": 6,
}


def train_adapters(model, tokenizer, settings: HubSettings, out: Path) -> dict[str, dict[str, Any]]:
    """Train and save one PEFT LoRA adapter per task; return ``{task: {"path", "accuracy", "seconds"}}``."""
    from peft import LoraConfig, get_peft_model

    results = {}
    for index, task in enumerate(settings.tasks):
        start = time.perf_counter()
        torch.manual_seed(settings.seed + index)
        peft_model = get_peft_model(
            model,
            LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=settings.target_modules),
        )
        train = make_builtin_dataset("train", settings.train_per_task, settings.seed, tasks=[task])
        batches = task_batches(
            tokenizer,
            train,
            settings.tasks,
            template=settings.template,
            batch_size=settings.batch_size,
            seed=settings.seed,
        )
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.adapter_lr)
        peft_model.train()
        for step in range(settings.adapter_steps):
            batch = batches[step % len(batches)]
            loss = peft_model(**{k: v for k, v in batch.items() if k not in ("prompt_mask", "task_ids")}).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        peft_model.eval()
        path = out / "adapters" / task
        peft_model.save_pretrained(str(path))
        accuracy = None  # not evaluated (strict JSON: no NaN)
        if settings.evaluate:
            test = make_builtin_dataset("test", settings.test_per_task, settings.seed, tasks=[task])
            accuracy = evaluate_generation(
                peft_model, tokenizer, test, template=settings.template, max_new_tokens=settings.max_new_tokens
            )["accuracy"]
        model = peft_model.unload()  # the base model again, without this adapter's layers
        results[task] = {"path": path, "accuracy": accuracy, "seconds": time.perf_counter() - start}
        print(
            f"adapter {task:<10} loss {float(loss.detach()):.3f}  own-task accuracy "
            f"{'not evaluated' if accuracy is None else f'{accuracy:.3f}'}  "
            f"({results[task]['seconds']:.0f} s)",
            flush=True,
        )
    return results


def hub_routers() -> list[str]:
    """``gate`` and ``dlp`` when registered; ``soft`` when neither is."""
    chosen = [name for name in ("gate", "dlp") if name in molex.available_routers()]
    return chosen or ["soft"]


def fuse_and_evaluate(model, tokenizer, adapters: dict[str, Path], router: str, settings: HubSettings) -> dict:
    """Fuse, train the router, measure routing accuracy and per-task accuracy; the model is restored after."""
    start = time.perf_counter()
    fused = molex.fuse_adapters(model, adapters, router=router)
    try:
        train = make_builtin_dataset("train", settings.train_per_task, settings.seed + 1, tasks=settings.tasks)
        # a training-free router (arrow) has nothing to fit
        fit = fit_router if molex.trainable_parameters(fused) or router == "dlp" else None
        history = (
            []
            if fit is None
            else fit(
                fused,
                tokenizer,
                train,
                template=settings.template,
                steps=settings.router_steps,
                lr=settings.router_lr,
                task_loss_coef=settings.task_loss_coef,
                dlp_epochs=settings.dlp_epochs,
                batch_size=settings.batch_size,
                seed=settings.seed,
            )
        )
        test = make_builtin_dataset("test", settings.test_per_task, settings.seed, tasks=settings.tasks)
        evaluation = evaluate_fused(
            fused,
            tokenizer,
            test,
            template=settings.template,
            max_new_tokens=settings.max_new_tokens,
            generation=settings.evaluate,
        )
    finally:
        molex.unload(fused)
    result = {
        "router": router,
        "routing_accuracy": evaluation["routing_accuracy"],
        "per_task": evaluation["per_task"],
        # first and last router-training loss; None for a training-free router (strict JSON: no NaN)
        "router_loss": [history[0], history[-1]] if history else None,
        "seconds": time.perf_counter() - start,
    }
    trained = f"router loss {history[0]:.3f} -> {history[-1]:.3f}" if history else "no router training"
    print(
        f"fused/{router:<5} routing accuracy {result['routing_accuracy']:.3f}  {trained}  ({result['seconds']:.0f} s)",
        flush=True,
    )
    return result


def table(singles: dict[str, dict[str, Any]], fused: Sequence[dict[str, Any]]) -> str:
    header = "| task | single adapter | " + " | ".join(f"fused {f['router']}" for f in fused) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(fused)]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for task, single in singles.items():
        cells = " | ".join(f"{f['per_task'].get(task, 0.0):.3f}" for f in fused)
        lines.append(f"| {task} | {cell(single['accuracy'])} | {cells} |")
    evaluated = [s["accuracy"] for s in singles.values() if s["accuracy"] is not None]
    mean = sum(evaluated) / len(evaluated) if len(evaluated) == len(singles) else None
    fused_means = " | ".join(f"{sum(f['per_task'].get(t, 0.0) for t in singles) / len(singles):.3f}" for f in fused)
    lines.append(f"| **mean** | {cell(mean)} | {fused_means} |")
    lines.append("| routing accuracy | | " + " | ".join(f"{f['routing_accuracy']:.3f}" for f in fused) + " |")
    return "\n".join(lines)


def run(settings: HubSettings, out: Path, routers: Sequence[str] | None = None) -> dict[str, Any]:
    torch.manual_seed(settings.seed)
    model, tokenizer = load_model(settings.model, config_overrides=settings.config_overrides)
    singles = train_adapters(model, tokenizer, settings, out)
    adapters = {task: info["path"] for task, info in singles.items()}
    fused = [fuse_and_evaluate(model, tokenizer, adapters, r, settings) for r in (routers or hub_routers())]
    return {"singles": singles, "fused": fused, "table": table(singles, fused)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="tiny random Llama and few steps")
    parser.add_argument("--out", type=Path, default=Path("demo_hub_out"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--tasks", nargs="*", help=f"subset of the built-in tasks (default: all of {TASKS})")
    parser.add_argument("--routers", nargs="*", help="routers to fuse with (default: gate and dlp when available)")
    parser.add_argument("--results", type=Path, default=None, help="also write the summary (with machine details) here")
    for name, default in vars(HubSettings()).items():
        if isinstance(default, (int, float, str)) and not isinstance(default, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=None)
    args = parser.parse_args()
    options = dict(FAST) if args.fast else {}
    options.update({k: v for k, v in vars(args).items() if k in vars(HubSettings()) and v is not None})
    settings = HubSettings(**options)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(settings, args.out, args.routers)
    print(
        f"\n{settings.model}: {len(settings.tasks)} adapters, rank {settings.rank}, "
        f"{settings.adapter_steps} adapter steps, {settings.router_steps} router steps, "
        f"{time.perf_counter() - start:.0f} s total\n"
    )
    print(result["table"])
    summary = {k: v for k, v in result.items() if k != "singles"}
    summary["singles"] = {t: {"accuracy": s["accuracy"]} for t, s in result["singles"].items()}
    summary["command"] = command_line()
    summary["machine"] = machine_record(threads=args.threads, precision="float32", seconds=time.perf_counter() - start)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2, default=str, allow_nan=False))
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(summary, indent=2, default=str, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
