"""Greedy decoding speed: prompt-level routing (MiLoRA, DLP-LoRA) vs token-level top-k vs one LoRA.

All variants adapt the same seven linear layers of every decoder block of a random Llama and
decode the same prompts greedily (no early stop); times are medians of ``--repeats`` rounds in one
process, the variants taking turns within each round, reported as ratios to a single PEFT LoRA
of the same active rank::

    python benchmarks/bench_decode.py                      # batch 4, 64 new tokens, CPU
    python benchmarks/bench_decode.py --model smollm2-135m --repeats 3
    python benchmarks/bench_decode.py --device cuda --hidden 1024 --layers 8

* ``lora``: one PEFT LoRA of rank ``r`` on every target (the baseline, ratio 1).
* ``milora``: every target holds one rank-``r`` LoRA module; a block router keeps ``top_k`` modules
  per sequence, decided at prefill.
* ``dlp``: ``E`` experts of rank ``r`` per target, one classifier decision per sequence at prefill.
* ``topk``: ``E`` experts of rank ``r`` per target, token-level top-``k`` routing at every step.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import molex
from benchmarks.harness import environment, time_candidates, write_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


_PRETRAINED: dict = {}


def base_model(args: argparse.Namespace):
    if args.model != "tiny":  # a real model (e.g. smollm2-135m): loaded once, copied per variant
        if args.model not in _PRETRAINED:
            from molex.models import load_model

            _PRETRAINED[args.model] = load_model(args.model)[0]
        return copy.deepcopy(_PRETRAINED[args.model]).eval().to(args.device)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 128, 1),
        max_position_embeddings=512,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval().to(args.device)


@torch.no_grad()
def randomize(model) -> None:
    """Non-zero LoRA B (a fresh adapter is a no-op) so every variant does its real work."""
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_(std=0.02)


def build(variant: str, args: argparse.Namespace):
    model = base_model(args)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    elif variant == "milora":
        config = molex.MoLEConfig(
            target_modules=TARGETS, rank=args.rank, num_experts=1, router="milora", router_options={"top_k": 2}
        )
        molex.inject(model, config)
    elif variant == "dlp":
        options = {"top_p": 0.8}
        config = molex.MoLEConfig(
            target_modules=TARGETS, rank=args.rank, num_experts=args.experts, router="dlp", router_options=options
        )
        molex.inject(model, config)
    elif variant == "topk":
        config = molex.MoLEConfig(
            target_modules=TARGETS, rank=args.rank, num_experts=args.experts, router="topk", top_k=2
        )
        molex.inject(model, config)
    elif variant != "base":
        raise ValueError(f"unknown variant {variant!r}")
    randomize(model)
    return model.eval()


def decode_once(model, prompts: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    if prompts.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_variants(models: dict, prompts: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per variant; the variants take turns so that a change in machine load hits all alike."""
    candidates = {
        name: functools.partial(decode_once, model, prompts, args.new_tokens) for name, model in models.items()
    }
    stats = time_candidates(candidates, warmup=1, repeats=args.repeats, device=prompts.device.type)
    return {name: s["median"] for name, s in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", default="tiny", help="'tiny' (random Llama) or a molex.models name/path")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 = stable timings on a shared machine)")
    parser.add_argument("--variants", default="base,lora,milora,dlp,topk")
    parser.add_argument("--json", default=None, help="write the times and ratios here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {variant: build(variant, args) for variant in args.variants.split(",")}
    vocab = next(iter(models.values())).config.vocab_size
    prompts = torch.randint(1, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompts = prompts.to(args.device)
    results = time_variants(models, prompts, args)
    baseline = results.get("lora")
    shape = f"Llama hidden {args.hidden} x {args.layers} layers" if args.model == "tiny" else args.model
    print(
        f"greedy decode: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"{shape}, rank {args.rank}, {args.experts} experts, "
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print("| variant | median s | ms / token step | vs one LoRA |")
    print("|---|---:|---:|---:|")
    for variant, seconds in results.items():
        ratio = f"{seconds / baseline:.2f}x" if baseline else "-"
        print(f"| {variant} | {seconds:.3f} | {1000 * seconds / args.new_tokens:.2f} | {ratio} |")
    if args.json:
        ratios = {f"{v}_vs_lora": round(s / baseline, 3) for v, s in results.items() if baseline}
        payload = {"env": environment(precision="float32"), "config": vars(args), "seconds": results, "ratios": ratios}
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
