"""One MoLE layer, forward + backward, against the reference loop, PEFT LoRA and the base linear.

Default: d = 2048 in and out, T = 2048 tokens, E = 8, k = 2, r = 8, fp32 on CPU, ``x`` requires
grad. Two views, each timed round-robin in one run:

* ``layer``: the whole layer (frozen base + router + experts) vs PEFT ``lora.Linear`` of rank
  ``k * r`` (same active parameters) vs the frozen base linear alone;
* ``experts``: the expert op alone (``mole_delta``) vs the LoRA update alone (``x A^T B^T``).

Run: ``python -m benchmarks.bench_layer [--json out.json]``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import environment, fwd_bwd, ratio, time_candidates, write_json
from benchmarks.layers import base_linear, mole_layer, peft_lora_layer, trainable
from molex.kernels import mole_delta, resolve_backend


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 gives stable ratios on a loaded machine",
    )
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev, T, d, E, r, k = args.device, args.tokens, args.dim, args.experts, args.rank, args.top_k

    base = base_linear(d, d, device=dev, dtype=dtype)
    x = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, d, device=dev, dtype=dtype)
    moles = {b: mole_layer(base, num_experts=E, rank=r, top_k=k, backend=b) for b in ("auto", "dense", "reference")}
    peft = peft_lora_layer(base, rank=k * r).to(dev, dtype)

    layer = {f"mole[{b}]": fwd_bwd(m, x, grad, trainable(m)) for b, m in moles.items()}
    layer["peft_lora"] = fwd_bwd(peft, x, grad, trainable(peft))
    layer["base"] = fwd_bwd(base, x, grad, [])

    experts = moles["dense"].experts
    decision = moles["dense"].route(x.detach())
    chosen = resolve_backend("auto", x, experts.lora_A, experts.lora_B, decision)
    w_a, w_b = peft.lora_A["default"].weight, peft.lora_B["default"].weight

    def op(backend):
        return lambda xx: mole_delta(xx, experts.lora_A, experts.lora_B, decision, experts.scaling, backend)

    params = [experts.lora_A, experts.lora_B]
    ops = {f"delta[{b}]": fwd_bwd(op(b), x, grad, params) for b in ("auto", "dense", "reference")}
    ops["lora_delta"] = fwd_bwd(lambda xx: (xx @ w_a.t()) @ w_b.t() * 2.0, x, grad, [w_a, w_b])

    stats = time_candidates({**layer, **ops}, warmup=args.warmup, repeats=args.repeats, device=dev)
    result = {
        "env": environment(precision=args.dtype),
        "config": vars(args) | {"auto_backend": chosen},
        "stats": stats,
        "ratios": {
            "layer_dense_speedup_vs_loop": ratio(stats, "mole[dense]", "mole[reference]"),
            "layer_auto_speedup_vs_loop": ratio(stats, "mole[auto]", "mole[reference]"),
            "layer_dense_time_vs_peft": 1 / ratio(stats, "mole[dense]", "peft_lora"),
            "layer_auto_time_vs_peft": 1 / ratio(stats, "mole[auto]", "peft_lora"),
            "layer_dense_time_vs_base": 1 / ratio(stats, "mole[dense]", "base"),
            "peft_time_vs_base": 1 / ratio(stats, "peft_lora", "base"),
            "experts_dense_speedup_vs_loop": ratio(stats, "delta[dense]", "delta[reference]"),
            "experts_auto_speedup_vs_loop": ratio(stats, "delta[auto]", "delta[reference]"),
            "experts_dense_time_vs_lora_delta": 1 / ratio(stats, "delta[dense]", "lora_delta"),
        },
    }
    print(f"# bench_layer T={T} d={d} E={E} k={k} r={r} {args.dtype} on {result['env']['device']} (auto -> {chosen})")
    for name, s in stats.items():
        print(f"{name:18s} median {s['median'] * 1e3:9.2f} ms  spread {s['spread']:.0%}")
    for name, value in result["ratios"].items():
        print(f"{name:36s} {value:6.2f}x")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
