"""How much of a token-level mixture one exported LoRA keeps: ``export_single`` at several ranks vs the routed model.

For a trained molex adapter (default: the study's ``mola_increasing`` seed-0 run), export one PEFT LoRA
per rank with :func:`molex.export_single` (routing averaged over validation batches of the built-in
tasks), load each through PEFT on a fresh base model and score greedy exact match on the built-in test
split, next to the routed model itself; also the mean relative Frobenius error of the SVD truncation
(vs the expected update). Prints a table and writes JSON::

    python benchmarks/bench_export_single.py                                   # the study adapter, ranks 8 16 32
    python benchmarks/bench_export_single.py --adapter path/to/adapter --model smollm2-135m
    python benchmarks/bench_export_single.py --quick                           # a random tiny-llama adapter (wiring)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import molex
from molex.core.files import write_json

ROOT = Path(__file__).resolve().parent
DEFAULT_ADAPTER = ROOT / "results" / "study" / "runs" / "mola_increasing" / "seed0" / "adapter"
DEFAULT_OUT = ROOT / "results" / "export_single.json"


def quick_adapter(folder: Path) -> Path:
    """A tiny-llama top-2 adapter with random non-zero experts (nothing learned: it checks the wiring)."""
    from molex.models import load_model

    model, _ = load_model("tiny-llama")
    cfg = molex.MoLEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, rank=4, router="topk", top_k=2)
    molex.inject(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.05)
            layer.router.gate.weight.normal_(std=1.0)
    return molex.save_adapter(model, folder)


def evaluate(model, tokenizer, dm, *, routed: bool, args: argparse.Namespace) -> dict:
    from molex.evaluation.generation import evaluate_generation

    result = evaluate_generation(
        model,
        tokenizer,
        dm.test_examples(),
        template=dm.template,
        system_prompt=dm.system_prompt,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        task_names=dm.task_names if routed else None,
        routing_inputs=routed,
    )
    result.pop("predictions")
    return result


def run(args: argparse.Namespace) -> dict:
    from peft import PeftModel

    from molex.data import InstructionDataModule
    from molex.models import load_model

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-export-single-"))
    adapter = quick_adapter(work / "adapter") if args.quick else Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"no molex adapter at {adapter}; train one (python -m benchmarks.study) or pass --adapter")
    base, tokenizer = load_model(args.model)
    base.eval()
    pristine = copy.deepcopy(base)  # PEFT gets a fresh copy of the base for every exported adapter
    model = molex.load_adapter(base, adapter)
    dm = InstructionDataModule(
        tokenizer=tokenizer,
        val_per_task=args.val_per_task,
        test_per_task=args.test_per_task,
        num_per_task=args.val_per_task,
        eval_batch_size=args.batch_size,
        builtin_tasks=args.tasks,
    )
    dm.setup("fit")
    rows = []
    start = time.perf_counter()
    routed = evaluate(model, tokenizer, dm, routed=True, args=args)
    rows.append(
        {
            "variant": "routed (molex)",
            "rank": None,
            "accuracy": routed["accuracy"],
            "per_task": routed["per_task"],
            "mean_error": None,
            "seconds": time.perf_counter() - start,
        }
    )
    for rank in args.ranks:
        start = time.perf_counter()
        batches = [b for i, b in zip(range(args.calibration_batches), dm.val_dataloader(), strict=False)]
        exported = molex.export_single(model, work / f"rank{rank}", batches, rank=rank)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), str(exported.path)).eval()
        scored = evaluate(peft_model, tokenizer, dm, routed=False, args=args)
        rows.append(
            {
                "variant": "export_single (PEFT)",
                "rank": rank,
                "accuracy": scored["accuracy"],
                "per_task": scored["per_task"],
                "mean_error": exported.mean_error,
                "seconds": time.perf_counter() - start,
            }
        )
    return {
        "adapter": str(adapter),
        "model": args.model,
        "router": molex.get_config(model).router_name,
        "test_examples": routed["num_examples"],
        "calibration_batches": args.calibration_batches,
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"adapter {result['adapter']} (router {result['router']}), {result['test_examples']} test examples",
        "| variant | rank | exact match | mean rel. Frobenius error |",
        "|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        rank = "-" if row["rank"] is None else str(row["rank"])
        error = "-" if row["mean_error"] is None else f"{row['mean_error']:.4f}"
        lines.append(f"| {row['variant']} | {rank} | {100 * row['accuracy']:.1f}% | {error} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="molex adapter folder")
    parser.add_argument("--model", default=None, help="base model (default: smollm2-135m; tiny-llama with --quick)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="ranks to export (default 8 16 32)")
    parser.add_argument("--test-per-task", type=int, default=None, help="test examples per task (default 40)")
    parser.add_argument("--val-per-task", type=int, default=None, help="validation examples per task (default 10)")
    parser.add_argument("--calibration-batches", type=int, default=4, help="validation batches for the routing mean")
    parser.add_argument("--tasks", nargs="+", default=None, help="built-in tasks (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT}; a temp file with --quick)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny random adapter, two tasks, ranks 1 2: a wiring check"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.model = args.model or ("tiny-llama" if quick else "smollm2-135m")
    args.ranks = args.ranks or ([1, 2] if quick else [8, 16, 32])
    args.test_per_task = args.test_per_task or (2 if quick else 40)
    args.val_per_task = args.val_per_task or (2 if quick else 10)
    args.tasks = args.tasks or (["add", "parity"] if quick else None)
    if quick:
        args.max_new_tokens, args.calibration_batches = min(args.max_new_tokens, 3), 1
    if any(rank < 1 for rank in args.ranks):
        parser.error(f"--ranks must be positive, got {args.ranks}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    result = run(args)
    out = (
        Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "export_single.json" if args.quick else DEFAULT_OUT)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(table(result))
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    main()
