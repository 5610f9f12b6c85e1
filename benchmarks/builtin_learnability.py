"""Can SmolLM2-135M learn the built-in tasks in a short MoLE run? Exact match before / after, per task.

A plain PyTorch loop (no Lightning), so it measures the data and the model, not the trainer.

Usage: python -m benchmarks.builtin_learnability [--steps 40] [--lr 3e-3] [--eval-per-task 10]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import molex
from molex.data import InstructionDataModule
from molex.evaluation.generation import evaluate_generation, format_table
from molex.models import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-per-task", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy shared CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    dm = InstructionDataModule(
        tokenizer=tok, num_per_task=200, eval_per_task=args.eval_per_task, batch_size=args.batch_size, max_length=128
    )
    dm.setup()
    test = dm.test_examples()
    before = evaluate_generation(model, tok, test)
    config = molex.MoLEConfig(target_modules=TARGETS, rank=8, alpha=16, num_experts=8, router="topk", top_k=2)
    molex.inject(model, config)
    params = molex.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    batches = iter(())
    for step in range(args.steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(dm.train_dataloader())
            batch = next(batches)
        loss = model(**batch, use_cache=False).loss
        aux = molex.total_aux_loss(model)
        total = loss if aux is None else loss + aux
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    after = evaluate_generation(model, tok, test, task_names=dm.task_names)
    print(format_table(before, after, tasks=dm.task_names))
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
