"""Whole MoLE layer, forward + backward, per backend, against its roofline floor.

The layer: a frozen ``nn.Linear`` d -> d, a top-k router and E experts of rank r (default the
roofline point T = 4096, d = 4096, E = 8, k = 2, r = 8, bf16), ``x`` requires grad. Every
available backend that takes per-token decisions (all but ``per_seq``) runs the same layer; the
PEFT ``lora.Linear`` of rank ``k r`` and the frozen base alone run beside them, all timed
round-robin in one run (median of ``--repeats`` after ``--warmup``, device-synchronised).

Roofline floor of one forward + backward (``roofline``), with ``P = 790e12`` FLOP/s (bf16 dense
matmul) and ``W = 4.3e12`` B/s (device copy), both assumed for an H200 (reported figures, not measured here), ``s`` bytes per element::

    FLOPs = 2 T d d (base fwd) + 2 T d d (base grad-x; the base is frozen, no weight grad)
          + 3 * 2 T d E        (router logits fwd; grad-x and grad-W bwd)
          + 3 * 2 T k r (d + d) (the k active experts: shrink + expand fwd; bwd twice that)
    bytes = s * (2 T d          fwd: read x, write y
                 + 3 T d        bwd: read grad_y, re-read x (for the adapter/router grads), write grad_x
                 + 2 d d        base weight, read once per pass
                 + 2 (E r (d + d) + d E) * 2)  expert and router weights read twice, grads written
    floor = max(FLOPs / P, bytes / W)

Forward and backward are separate passes (the backward needs grad_y), so ``x`` and the base weight
are counted once per pass. At the default point the FLOPs term (the two base GEMMs) dominates.
``vs_floor`` = measured / floor (1.0 would be perfect); ``vs_loop`` = loop time / backend time.

Run: ``python -m benchmarks.bench_layer_roofline --json roofline.json``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import environment, fwd_bwd, time_candidates, write_json
from benchmarks.layers import base_linear, mole_layer, peft_lora_layer, trainable
from molex.kernels import available_backends, resolve_backend

#: roofline ceilings measured on the H200: bf16 dense matmul FLOP/s and device-copy bytes/s
PEAK_FLOPS, PEAK_BYTES = 790e12, 4.3e12


def layer_flops(*, tokens: int, dim: int, experts: int, rank: int, top_k: int) -> float:
    """FLOPs of one MoLE layer forward + backward (see the module docstring)."""
    t, d = tokens, dim
    base = 2 * (2 * t * d * d)
    router = 3 * 2 * t * d * experts
    active = 3 * 2 * t * top_k * rank * (d + d)
    return float(base + router + active)


def layer_bytes(*, tokens: int, dim: int, experts: int, rank: int, element_size: int) -> float:
    """Fewest bytes one forward + backward must move (see the module docstring)."""
    t, d = tokens, dim
    adapters = experts * rank * (d + d) + d * experts
    return float(element_size * (2 * t * d + 3 * t * d + 2 * d * d + 2 * adapters * 2))


def roofline(*, tokens: int, dim: int, experts: int, rank: int, top_k: int, element_size: int) -> dict:
    flops = layer_flops(tokens=tokens, dim=dim, experts=experts, rank=rank, top_k=top_k)
    nbytes = layer_bytes(tokens=tokens, dim=dim, experts=experts, rank=rank, element_size=element_size)
    return {
        "flops": flops,
        "bytes": nbytes,
        "compute_s": flops / PEAK_FLOPS,
        "memory_s": nbytes / PEAK_BYTES,
        "floor_s": max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES),
        "peak_flops": PEAK_FLOPS,
        "peak_bytes_per_s": PEAK_BYTES,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    dev, T, d, E, r, k = args.device, args.tokens, args.dim, args.experts, args.rank, args.top_k

    base = base_linear(d, d, device=dev, dtype=dtype)
    x = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, d, device=dev, dtype=dtype)
    # per_seq needs per-sequence decisions; the layer's top-k router decides per token
    backends = [b for b in available_backends() if b != "per_seq"]
    candidates = {}
    for b in backends:
        layer = mole_layer(base, num_experts=E, rank=r, top_k=k, backend=b).to(dtype=dtype)
        candidates[b] = fwd_bwd(layer, x, grad, trainable(layer))
    auto = mole_layer(base, num_experts=E, rank=r, top_k=k, backend="auto").to(dtype=dtype)
    candidates["auto"] = fwd_bwd(auto, x, grad, trainable(auto))
    peft = peft_lora_layer(base, rank=k * r).to(dev, dtype)
    candidates["peft_lora"] = fwd_bwd(peft, x, grad, trainable(peft))
    candidates["base"] = fwd_bwd(base, x, grad, [])
    stats = time_candidates(candidates, warmup=args.warmup, repeats=args.repeats, device=dev)

    roof = roofline(tokens=T, dim=d, experts=E, rank=r, top_k=k, element_size=x.element_size())
    decision = auto.route(x.detach())
    selected = resolve_backend("auto", x, auto.experts.lora_A, auto.experts.lora_B, decision)
    med = {name: s["median"] for name, s in stats.items()}
    rows = {
        name: {
            "median_s": med[name],
            "vs_floor": med[name] / roof["floor_s"],
            "vs_loop": med["reference"] / med[name],
            "vs_peft": med[name] / med["peft_lora"],
            "tflops": roof["flops"] / med[name] / 1e12,
        }
        for name in candidates
    }
    result = {
        "env": environment(precision=args.dtype),
        "config": vars(args),
        "auto_backend": selected,
        "roofline": roof,
        "stats": stats,
        "rows": rows,
    }
    print(
        f"# whole layer T={T} d={d} E={E} k={k} r={r} {args.dtype} fwd+bwd on {result['env']['device']}: "
        f"floor {roof['floor_s'] * 1e3:.3f} ms ({'compute' if roof['compute_s'] >= roof['memory_s'] else 'memory'}"
        f" bound), auto -> {selected}"
    )
    print(f"{'variant':<12} {'ms':>9} {'x floor':>8} {'vs loop':>8} {'/ peft':>7} {'TFLOP/s':>8}")
    for name, row in rows.items():
        print(
            f"{name:<12} {row['median_s'] * 1e3:9.3f} {row['vs_floor']:8.2f} {row['vs_loop']:7.2f}x "
            f"{row['vs_peft']:7.2f} {row['tflops']:8.1f}"
        )
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
