"""Training step time and peak RSS: MoLE (E=8, k=2, r=8) vs PEFT LoRA (r=16) on SmolLM2-135M.

Both adapters sit on all linear projections of every decoder layer (q, k, v, o, gate, up, down);
a step is forward + backward + AdamW on a fixed batch of 8 x 128 tokens (float32, CPU threads as
available). Each variant runs in its own process, so peak RSS (VmHWM, reset after the base model is
loaded) is that variant's alone; variants alternate (lora, mole, lora, mole, ...) so a busy machine
affects both alike, and the ratio uses each variant's best (median-of-steps) run.

    python benchmarks/bench_train.py                      # full comparison, prints a markdown table
    python benchmarks/bench_train.py --steps 3 --rounds 1 # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def _vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def run_variant(
    variant: str, *, batch: int, seq: int, steps: int, warmup: int, model_name: str, threads: int | None
) -> dict:
    """One process, one variant: build it, train ``warmup + steps`` steps, report times and memory."""
    import gc

    import torch

    if threads:
        torch.set_num_threads(threads)
    from molex.models import load_model

    torch.manual_seed(0)
    model, _ = load_model(model_name)
    gc.collect()
    base_rss = _vm_rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: count training only
    if variant == "mole":
        import molex

        cfg = molex.MoLEConfig(target_modules=TARGETS, rank=8, alpha=16, num_experts=8, router="topk", top_k=2)
        model = molex.inject(model, cfg)
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    else:
        raise ValueError(f"unknown variant {variant!r}; use 'mole' or 'lora'")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = model(**inputs).loss
        if variant == "mole":
            aux = molex.total_aux_loss(model)
            loss = loss + aux if aux is not None else loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "trainable": sum(p.numel() for p in params),
        "step_s": statistics.median(times),
        "step_times": [round(t, 3) for t in times],
        "base_rss_mib": round(base_rss, 1),
        "peak_rss_mib": round(_vm_hwm_mib(), 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write the runs and ratios here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    shape = dict(
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        warmup=args.warmup,
        model_name=args.model,
        threads=args.threads,
    )
    if args.variant:
        print(json.dumps(run_variant(args.variant, **shape)))
        return
    results: dict[str, list[dict]] = {"lora": [], "mole": []}
    for _ in range(args.rounds):
        for variant in ("lora", "mole"):
            cmd = [sys.executable, __file__, "--variant", variant] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "rounds", "json") and v is not None
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant].append(result)
            print(f"# {variant}: step {result['step_s']:.3f} s, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    best = {v: min(runs, key=lambda r: r["step_s"]) for v, runs in results.items()}
    peak = {v: min(r["peak_rss_mib"] for r in runs) for v, runs in results.items()}
    lora, mole = best["lora"], best["mole"]
    print(
        f"\nSmolLM2-135M, batch {args.batch} x {args.seq} tokens, fp32, {lora['threads']} threads, "
        f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.rounds} processes per variant\n"
    )
    print("| variant | trainable params | step time (s) | peak RSS (MiB) | base model RSS (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for name, r, label in (("lora", lora, "PEFT LoRA r=16"), ("mole", mole, "MoLE topk E=8 k=2 r=8")):
        print(f"| {label} | {r['trainable']:,} | {r['step_s']:.3f} | {peak[name]:.0f} | {r['base_rss_mib']:.0f} |")
    print(
        f"\nratios MoLE / LoRA: step time {mole['step_s'] / lora['step_s']:.2f}x (target <= 1.35x), "
        f"peak RSS {peak['mole'] / peak['lora']:.2f}x (target <= 1.15x)"
    )
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
        from benchmarks.harness import environment, write_json  # here: torch stays out of the parent until now

        ratios = {"step_time": mole["step_s"] / lora["step_s"], "peak_rss": peak["mole"] / peak["lora"]}
        environment_record = environment(precision="float32")
        environment_record["threads"] = lora["threads"]  # what each variant's process ran with
        payload = {"env": environment_record, "config": vars(args), "runs": results, "ratios": ratios}
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
