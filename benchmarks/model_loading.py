"""Time the built-in SmolLM2-135M load: GGUF conversion into an empty cache, then loads from the cache.

Usage: python -m benchmarks.model_loading [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from molex.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cached loads to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        model, _ = load_model("smollm2-135m", cache_dir=cache)
        first = time.perf_counter() - start
        size = sum(f.stat().st_size for f in os.scandir(os.path.join(cache, "smollm2-135m-instruct-v1")))
        del model
        cached = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model, _ = load_model("smollm2-135m", cache_dir=cache)
            cached.append(time.perf_counter() - start)
            del model
    print(f"threads={torch.get_num_threads()}")
    print(f"first load (GGUF -> float32 safetensors cache): {first:.1f} s; cache size {size / 2**20:.0f} MiB")
    print(f"cached load: best {min(cached):.2f} s, median {sorted(cached)[len(cached) // 2]:.2f} s")
    print(f"ratio first / cached: {first / min(cached):.0f}x")


if __name__ == "__main__":
    main()
