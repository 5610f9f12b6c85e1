"""Sweep of the expert op, forward + backward: every backend vs the loop, PEFT LoRA and base linear.

At each point (E experts, rank r, top-k, T tokens, d = in = out) times, round-robin in one run:
every available backend's ``mole_delta`` (``reference`` is the MoLA / MoE-PEFT style loop), the
LoRA update of rank ``k * r`` alone, a PEFT ``lora.Linear`` of rank ``k * r``, the frozen base
linear, and the MoLE layer with ``auto`` selection. Reports each backend's speed-up over the loop,
which backend the cost model selects and how far it is from the fastest (target: within 10%),
and on CUDA the ratio to the roofline floor (max of bytes / bandwidth and FLOPs / peak).

``--quick``: a CPU-sized subset (a few minutes on 2 cores), the points the CPU cost constants were fitted
on. ``--holdout``: CPU-sized points they were not fitted on (the out-of-sample check of ``auto``). ``--tiny``: two small points (seconds;
checks that the sweep runs). The full grid (E in {2, 8, 32, 64}, r in {4, 8, 16, 64}, k in
{1, 2, 4}, T in {512, 4096}, d = 2048) is for a GPU. Each point also records the cost model's
estimate for every backend (``estimated_s``, one forward), the input for recalibrating it.
Run: ``python -m benchmarks.bench_sweep --quick [--json out.json]``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch

from benchmarks.harness import environment, fwd_bwd, time_candidates, write_json
from benchmarks.layers import base_linear, mole_layer, peft_lora_layer, trainable
from molex.kernels import available_backends, estimate_cost, mole_delta, resolve_backend
from molex.routers.base import RoutingDecision

#: roofline ceilings assumed for an H200 (bf16 dense matmul, device copy): reported figures, not measured here
PEAK_FLOPS, PEAK_BYTES = 7.9e14, 4.3e12

FULL_GRID = [
    dict(experts=e, rank=r, top_k=k, tokens=t, dim=2048)
    for e, r, k, t in itertools.product((2, 8, 32, 64), (4, 8, 16, 64), (1, 2, 4), (512, 4096))
    if k <= e
]
QUICK_GRID = [
    dict(experts=8, rank=8, top_k=2, tokens=4096, dim=2048),  # the CPU target point
    dict(experts=64, rank=64, top_k=2, tokens=1024, dim=2048),  # a fused hub: grouped should beat dense
    dict(experts=2, rank=4, top_k=1, tokens=512, dim=2048),
    dict(experts=8, rank=16, top_k=2, tokens=512, dim=2048),
    dict(experts=32, rank=8, top_k=2, tokens=512, dim=2048),
    dict(experts=32, rank=16, top_k=4, tokens=512, dim=2048),
    dict(experts=64, rank=16, top_k=2, tokens=512, dim=2048),
    dict(experts=8, rank=64, top_k=1, tokens=512, dim=2048),
    dict(experts=8, rank=8, top_k=2, tokens=4096, dim=2048, sequences=8),  # per-sequence routing
]
#: CPU-sized points the CPU cost constants were not fitted on (other d, T, E, r and k than QUICK_GRID's), to
#: check the cost model's choice out of sample
HOLDOUT_GRID = [
    dict(experts=4, rank=8, top_k=2, tokens=2048, dim=1024),
    dict(experts=16, rank=8, top_k=2, tokens=2048, dim=1024),
    dict(experts=16, rank=32, top_k=2, tokens=1024, dim=2048),
    dict(experts=4, rank=16, top_k=1, tokens=4096, dim=1024),
    dict(experts=48, rank=8, top_k=2, tokens=1024, dim=1536),
    dict(experts=8, rank=4, top_k=2, tokens=2048, dim=576),  # SmolLM2-135M's hidden size
    dict(experts=24, rank=16, top_k=3, tokens=512, dim=2048),
    dict(experts=12, rank=32, top_k=2, tokens=2048, dim=1536),
    dict(experts=8, rank=8, top_k=2, tokens=1024, dim=576, sequences=8),
]
TINY_GRID = [
    dict(experts=4, rank=4, top_k=2, tokens=32, dim=32),
    dict(experts=4, rank=4, top_k=2, tokens=32, dim=32, sequences=4),
]
GPU_EXTRA = [
    dict(experts=8, rank=8, top_k=2, tokens=4096, dim=4096),  # the roofline point (h = 4096)
    dict(experts=8, rank=8, top_k=2, tokens=4096, dim=2048, sequences=8),
    dict(experts=64, rank=16, top_k=2, tokens=4096, dim=2048, sequences=8),
]


def random_decision(tokens: int, experts: int, top_k: int, sequences: int | None, device: str) -> RoutingDecision:
    """Top-k of random scores (distinct experts per row), softmax weights; per sequence if asked."""
    rows = sequences or tokens
    scores = torch.randn(rows, experts, device=device)
    weights, indices = scores.topk(top_k, dim=-1)
    per_seq = tokens // sequences if sequences else None
    return RoutingDecision(indices, weights.softmax(-1), tokens_per_sequence=per_seq)


def roofline_floor(point: dict, element_size: int) -> float:
    """Lower bound on fwd+bwd seconds of the expert op: bytes it must move vs FLOPs it must do."""
    t, d, e, r, k = point["tokens"], point["dim"], point["experts"], point["rank"], point["top_k"]
    # read x and write delta (fwd); read grad, re-read x, write grad_x (bwd); weights and their grads
    elements = 2 * t * d + 3 * t * d + 4 * e * r * 2 * d
    flops = 3 * 2 * t * k * r * 2 * d
    return max(elements * element_size / PEAK_BYTES, flops / PEAK_FLOPS)


def run_point(point: dict, *, device: str, dtype: torch.dtype, repeats: int, warmup: int) -> dict:
    T, d, E, r, k = point["tokens"], point["dim"], point["experts"], point["rank"], point["top_k"]
    sequences = point.get("sequences")
    torch.manual_seed(0)
    base = base_linear(d, d, device=device, dtype=dtype)
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, d, device=device, dtype=dtype)
    mole = mole_layer(base, num_experts=E, rank=r, top_k=k, backend="auto")
    experts = mole.experts
    A, B = experts.lora_A, experts.lora_B
    decision = random_decision(T, E, k, sequences, device)
    backends = [b for b in available_backends() if b != "per_seq" or sequences]

    def op(backend):
        return lambda xx: mole_delta(xx, A, B, decision, experts.scaling, backend)

    candidates = {b: fwd_bwd(op(b), x, grad, [A, B]) for b in backends}
    peft = peft_lora_layer(base, rank=k * r).to(device, dtype)
    w_a, w_b = peft.lora_A["default"].weight, peft.lora_B["default"].weight
    candidates["lora_delta"] = fwd_bwd(lambda xx: (xx @ w_a.t()) @ w_b.t() * 2.0, x, grad, [w_a, w_b])
    candidates["peft_layer"] = fwd_bwd(peft, x, grad, trainable(peft))
    candidates["base_layer"] = fwd_bwd(base, x, grad, [])
    candidates["mole_layer_auto"] = fwd_bwd(mole, x, grad, trainable(mole))
    stats = time_candidates(candidates, warmup=warmup, repeats=repeats, device=device)

    med = {name: s["median"] for name, s in stats.items()}
    selected = resolve_backend("auto", x, A, B, decision)
    estimated = {  # None: the cost model rules the backend out on this device (infinite cost)
        b: estimate_cost(
            b,
            tokens=T,
            in_features=d,
            out_features=d,
            num_experts=E,
            rank=r,
            top_k=k,
            device_type=x.device.type,
            num_sequences=sequences,
            element_size=x.element_size(),
        )
        for b in backends
    }
    estimated = {b: (c if math.isfinite(c) else None) for b, c in estimated.items()}
    fast = [b for b in backends if b != "reference"]
    best = min(fast, key=med.__getitem__)
    result = {
        "point": point,
        "stats": stats,
        "selected": selected,
        "best": best,
        "estimated_s": estimated,
        "selected_vs_best": med[selected] / med[best],
        "speedup_vs_loop": {b: med["reference"] / med[b] for b in backends},
        "selected_vs_lora_delta": med[selected] / med["lora_delta"],
        "layer_auto_vs_peft": med["mole_layer_auto"] / med["peft_layer"],
        "layer_auto_vs_base": med["mole_layer_auto"] / med["base_layer"],
    }
    if device == "cuda":
        floor = roofline_floor(point, x.element_size())
        result["roofline_floor_s"] = floor
        result["vs_roofline"] = {b: med[b] / floor for b in backends}
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the CPU-sized subset")
    size.add_argument("--tiny", action="store_true", help="two tiny points (checks that the sweep runs)")
    size.add_argument("--holdout", action="store_true", help="CPU-sized points the cost model was not fitted on")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 gives stable ratios on a loaded machine",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    # on CUDA the extra points come first: a run cut short by its time limit still has them
    if args.tiny:
        grid = TINY_GRID
    elif args.quick:
        grid = QUICK_GRID
    elif args.holdout:
        grid = HOLDOUT_GRID
    else:
        grid = (GPU_EXTRA if cuda else []) + FULL_GRID
    repeats = args.repeats or (10 if cuda else 3)
    warmup = args.warmup or (3 if cuda else 1)
    start = time.perf_counter()
    payload = {
        "env": environment(precision=str(dtype).removeprefix("torch.")),
        "config": {
            "quick": args.quick,
            "holdout": args.holdout,
            "tiny": args.tiny,
            "dtype": str(dtype),
            "repeats": repeats,
            "warmup": warmup,
        },
        "seconds": 0.0,
        "results": [],
    }
    print(
        f"{'E':>3} {'r':>3} {'k':>2} {'T':>5} {'d':>5} {'seq':>3}  selected   best      sel/best  "
        f"sel/loop  sel/lora  layer/peft  per-backend speed-up vs loop"
    )
    for point in grid:
        res = run_point(point, device=args.device, dtype=dtype, repeats=repeats, warmup=warmup)
        payload["results"].append(res)
        payload["seconds"] = time.perf_counter() - start
        ratios = [r["selected_vs_best"] for r in payload["results"]]
        payload["selection"] = {  # how good auto's choice is: within 10% of the fastest backend, and the worst
            "points": len(ratios),
            "within_10_percent": sum(x <= 1.1 for x in ratios),
            "worst_selected_vs_best": max(ratios),
        }
        if args.json:  # after every point, so that a run cut short still leaves its results
            write_json(args.json, payload)
        speedups = " ".join(f"{b}={v:.1f}" for b, v in res["speedup_vs_loop"].items() if b != "reference")
        print(
            f"{point['experts']:>3} {point['rank']:>3} {point['top_k']:>2} {point['tokens']:>5} {point['dim']:>5} "
            f"{point.get('sequences') or '-':>3}  {res['selected']:<10} {res['best']:<9} "
            f"{res['selected_vs_best']:7.2f}  {res['speedup_vs_loop'][res['selected']]:7.1f}x "
            f"{res['selected_vs_lora_delta']:7.2f}  {res['layer_auto_vs_peft']:9.2f}   {speedups}",
            flush=True,
        )
    results = payload["results"]
    within = sum(r["selected_vs_best"] <= 1.10 for r in results)
    print(f"# selected within 10% of the best at {within}/{len(results)} points; {payload['seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
