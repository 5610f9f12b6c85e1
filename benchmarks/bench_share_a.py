"""Shared-A expert pools (one A per layer, E B's) against unshared pools of the same E and r.

Forward + backward of one top-k MoLE layer (frozen ``nn.Linear`` d -> d) and of the expert op
alone (``mole_delta``), both timed round-robin in one run. With a shared A the ``dense`` backend
runs one ``r``-wide shrink instead of an ``E r``-wide one, so the expert op saves up to half its
FLOPs at ``in = out``; the ratio printed is unshared time / shared time (> 1: shared is faster).
Default: d = 2048, T = 2048 tokens, E = 8, r = 8, k = 2, fp32 on the default device.

Run: ``python -m benchmarks.bench_share_a [--threads 1] [--json out.json]``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import environment, fwd_bwd, ratio, time_candidates, write_json
from benchmarks.layers import base_linear, mole_layer, trainable
from molex.kernels import mole_delta, resolve_backend


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--backend", default="auto", help="expert op backend for both pools (default: the cost model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev, T, d = args.device, args.tokens, args.dim
    sizes = {"num_experts": args.experts, "rank": args.rank, "top_k": args.top_k, "backend": args.backend}

    base = base_linear(d, d, device=dev, dtype=dtype)
    x = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, d, device=dev, dtype=dtype)
    layers = {name: mole_layer(base, share_A=name == "shared", **sizes) for name in ("shared", "unshared")}
    layer_stats = time_candidates(
        {name: fwd_bwd(m, x, grad, trainable(m)) for name, m in layers.items()},
        warmup=args.warmup,
        repeats=args.repeats,
        device=dev,
    )

    ops, chosen = {}, {}
    for name, m in layers.items():
        A, B, scaling = m.experts.lora_A, m.experts.lora_B, m.experts.scaling
        decision = m.route(x.detach())
        chosen[name] = resolve_backend(args.backend, x, A, B, decision)
        ops[name] = fwd_bwd(
            lambda h, A=A, B=B, s=scaling, dec=decision: mole_delta(h, A, B, dec, s, args.backend), x, grad, [A, B]
        )
    op_stats = time_candidates(ops, warmup=args.warmup, repeats=args.repeats, device=dev)

    result = {
        "environment": environment(precision=args.dtype),
        "config": {**vars(args)},
        "backends": chosen,
        "layer": layer_stats,
        "experts": op_stats,
        "ratios": {
            "layer: unshared / shared": ratio(layer_stats, "shared", "unshared"),
            "experts: unshared / shared": ratio(op_stats, "shared", "unshared"),
        },
    }
    print(
        f"device {result['environment']['device']}, T={T}, d={d}, E={args.experts}, r={args.rank}, "
        f"k={args.top_k}, backends {chosen}"
    )
    for view, stats in (("layer", layer_stats), ("experts", op_stats)):
        times = ", ".join(f"{n} {s['median'] * 1e3:.1f} ms (spread {s['spread']:.2f})" for n, s in stats.items())
        print(f"{view}: {times}")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}x")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
