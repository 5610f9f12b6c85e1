"""Inference cost of a fused LoRA hub: N adapters as experts behind a router vs the base model with one adapter.

For N in {4, 16, 64} adapters of rank r in {8, 64} on a small Llama (random weights, built from a
config), measures in one run:

* forward over 8 x 128 tokens, and greedy decode of 64 tokens (batch 1, KV cache);
* the base model with a single LoRA adapter (PEFT when installed, else a one-expert molex layer);
* the fused model with the selected kernel backend (``auto``) and with the ``reference`` loop.

Candidates are timed round-robin within each repeat (medians), so load changes on a shared machine hit
them alike. Prints a markdown table of times and ratios. Usage::

    python benchmarks/bench_hub.py            # full sweep, a few minutes on 2 CPU cores
    python benchmarks/bench_hub.py --quick    # one small configuration
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import molex
from benchmarks.harness import environment, time_candidates, write_json
from molex.hub.peft_format import LoraFactors, PeftLoraAdapter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def small_llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


def random_adapter(model, name: str, rank: int, seed: int) -> PeftLoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in TARGETS:
            A = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            B = torch.randn(module.out_features, rank, generator=gen) * 0.01
            modules[path] = LoraFactors(A=A, B=B, scaling=2.0)
    config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    return PeftLoraAdapter(name=name, path=None, config=config, modules=modules)


def single_adapter_model(base, adapter: PeftLoraAdapter):
    """The base model with one plain LoRA adapter: PEFT if installed, else a one-expert molex layer."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return molex.fuse_adapters(base, {"only": adapter}, router="fixed", weights=[1.0]), "molex 1 expert"
    model = get_peft_model(
        base, LoraConfig(r=adapter.config["r"], lora_alpha=2 * adapter.config["r"], target_modules=list(TARGETS))
    )
    return model.eval(), "PEFT LoRA"


def with_backend(model, backend: str | None, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        if backend is not None:
            for layer in molex.mole_layers(model).values():
                layer.kernel_backend = backend
        return fn()

    return run


@torch.no_grad()
def measure(single, fused, repeats: int, decode_tokens: int) -> dict[str, dict[str, float]]:
    """``{"forward" | "decode": {"single" | "auto" | "reference": seconds}}``."""
    ids = torch.randint(1, 1024, (8, 128), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :16]

    def forward(model):
        return lambda: model(input_ids=ids)

    def decode(model):
        return lambda: model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=decode_tokens,
            min_new_tokens=decode_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    result = {}
    for what, make, count in (("forward", forward, repeats), ("decode", decode, max(2, repeats // 2))):
        candidates = {
            "single": make(single),
            "auto": with_backend(fused, "auto", make(fused)),
            "reference": with_backend(fused, "reference", make(fused)),
        }
        result[what] = {name: st["median"] for name, st in time_candidates(candidates, repeats=count).items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the times and ratios here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    router = "gate" if "gate" in molex.available_routers() else "topk"
    counts, ranks = ((4,), (8,)) if args.quick else ((4, 16, 64), (8, 64))
    decode_tokens = 16 if args.quick else 64
    base = small_llama(args.hidden, args.layers)
    print(
        f"small Llama hidden={args.hidden} layers={args.layers}, targets {TARGETS}, router {router} "
        f"top_k={args.top_k}, backends {molex.kernels.available_backends()}, {args.threads} threads"
    )
    rows = []
    for rank in ranks:
        adapters = [random_adapter(base, f"a{i}", rank, seed=i) for i in range(max(counts))]
        single, single_kind = single_adapter_model(copy.deepcopy(base), adapters[0])
        for count in counts:
            fused = molex.fuse_adapters(
                copy.deepcopy(base), {a.name: a for a in adapters[:count]}, router=router, top_k=args.top_k
            )
            times = measure(single, fused, args.repeats, decode_tokens)
            layer = next(iter(molex.mole_layers(fused).values()))
            x = torch.zeros(8 * 128, layer.in_features)
            selected = molex.kernels.resolve_backend(
                "auto", x, layer.experts.lora_A, layer.experts.lora_B, layer.route(x)
            )
            rows.append((count, rank, selected, times))
            print(f"done: {count} adapters of rank {rank}", flush=True)
    print(
        f"\nbaseline: base model + one adapter ({single_kind}); fused: N adapters, router {router} top_k={args.top_k}"
    )
    print(
        "| adapters | rank | backend | fwd single ms | fwd fused ms | fused/single | reference/selected "
        "| decode single ms | decode fused ms | fused/single | reference/selected |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count, rank, selected, t in rows:
        f, d = t["forward"], t["decode"]
        print(
            f"| {count} | {rank} | {selected} | {f['single'] * 1e3:.1f} | {f['auto'] * 1e3:.1f} "
            f"| {f['auto'] / f['single']:.2f} | {f['reference'] / f['auto']:.2f} | {d['single'] * 1e3:.0f} "
            f"| {d['auto'] * 1e3:.0f} | {d['auto'] / d['single']:.2f} | {d['reference'] / d['auto']:.2f} |"
        )
    if args.json:
        points = [
            {
                "adapters": count,
                "rank": rank,
                "backend": selected,
                "seconds": t,
                "forward_fused_vs_single": round(t["forward"]["auto"] / t["forward"]["single"], 3),
                "forward_reference_vs_selected": round(t["forward"]["reference"] / t["forward"]["auto"], 3),
                "decode_fused_vs_single": round(t["decode"]["auto"] / t["decode"]["single"], 3),
                "decode_reference_vs_selected": round(t["decode"]["reference"] / t["decode"]["auto"], 3),
            }
            for count, rank, selected, t in rows
        ]
        payload = {"env": environment(precision="float32"), "config": vars(args), "baseline": single_kind}
        write_json(args.json, {**payload, "router": router, "results": points})


if __name__ == "__main__":
    main()
