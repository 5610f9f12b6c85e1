"""Short table of a ``bench_sweep`` JSON: device, run time, speed-up over the loop, roofline ratio.

Run: ``python -m benchmarks.summarize [--short] sweep.json`` (``--short``: key points only).
"""

from __future__ import annotations

import json
import statistics
import sys

#: (E, r, k) rows kept by ``--short`` (at T = 4096): typical MoLE, small, mid-size, fused hub
SHORT = {(8, 8, 2), (2, 4, 1), (32, 16, 4), (64, 64, 2)}


def _short(point: dict) -> bool:
    return point["tokens"] == 4096 and (point["experts"], point["rank"], point["top_k"]) in SHORT


def summarize(payload: dict, short: bool = False) -> str:
    env, all_results = payload["env"], payload["results"]
    results = [r for r in all_results if _short(r["point"])] if short else all_results
    lines = [f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  sweep {payload['seconds']:.0f} s"]
    roofline = any("vs_roofline" in r for r in results)
    header = f"{'E':>3} {'r':>3} {'k':>2} {'T':>5} {'d':>5} {'seq':>3}  {'selected':<10} {'x loop':>7} {'sel/best':>8}"
    lines.append(header + (f" {'dense/floor':>11} {'sel/floor':>9}" if roofline else ""))
    for res in results:
        pt = res["point"]
        roof = res.get("vs_roofline", {})
        sel = res["selected"]
        line = (
            f"{pt['experts']:>3} {pt['rank']:>3} {pt['top_k']:>2} {pt['tokens']:>5} {pt['dim']:>5} "
            f"{pt.get('sequences') or '-':>3}  {sel:<10} {res['speedup_vs_loop'][sel]:6.1f}x "
            f"{res['selected_vs_best']:8.2f}"
        )
        if roofline:
            line += f" {roof.get('dense', float('nan')):11.2f} {roof.get(sel, float('nan')):9.2f}"
        lines.append(line)
    speedups = [r["speedup_vs_loop"][r["selected"]] for r in all_results]
    within = sum(r["selected_vs_best"] <= 1.10 for r in all_results)
    lines.append(
        f"all {len(all_results)} points: selected backend median {statistics.median(speedups):.1f}x faster than the "
        f"loop (min {min(speedups):.1f}x); within 10% of the best at {within}/{len(all_results)}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    short = "--short" in args
    paths = [a for a in args if a != "--short"]
    if len(paths) != 1:
        raise SystemExit("usage: python -m benchmarks.summarize [--short] SWEEP.json")
    with open(paths[0]) as f:
        print(summarize(json.load(f), short=short))


if __name__ == "__main__":
    main()
