"""Memory and step time of the default MoLE run on SmolLM2-135M: float32 base vs each quantized base.

The default ``molex-train`` MoLE config (router ``topk``, allocation ``mola_increasing``, targets
``q_proj``, ``v_proj``, ``down_proj``, rank 8), composed from the packaged Hydra config, is injected
into ``load_model("smollm2-135m", quantization=q)``; a training step is forward, LM + auxiliary loss,
backward and an AdamW step on a batch of the default recipe's shape (8 x 96 random tokens).

Each quantization runs in a fresh process, so the memory numbers do not mix:

* ``base_weight_mb``: bytes of the model's parameters and buffers (quantized tensors counted by their
  packed storage and scales), after quantization and injection;
* ``rss_after_load_mb``: the process's resident memory then (Python, torch, the model);
* ``peak_rss_train_mb``: the process's peak resident memory (``VmHWM``) during the training steps, with
  the peak reset (``/proc/self/clear_refs``) after loading, so the float model a quantization starts
  from does not count.

Step time: median of ``--steps`` steps after ``--warmup``, wall clock (``step_s``) and the process's CPU
time (``step_cpu_s``; with ``OMP_NUM_THREADS=1`` this is the compute a step needs, which a busy machine
does not inflate as it does the wall clock). Run:
``nice -n 10 env OMP_NUM_THREADS=1 python -m benchmarks.bench_quant`` (writes benchmarks/results/quant.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import environment, write_json

PRECISION = "float32 compute over each scheme's base"
SCHEMES = ["float32", "nf4", "int8", "torchao-int8", "torchao-int4"]
OUT = Path(__file__).parent / "results" / "quant.json"
BATCH, SEQ = 8, 96  # molex/conf/data/builtin_multitask.yaml: batch_size, max_length


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _tensor_bytes(tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # torchao subclass: its inner tensors
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    for module in model.modules():  # bitsandbytes 4-bit: absmax / code live in the weight's quant_state
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += sum(_tensor_bytes(t) for t in state.as_dict(packed=True).values() if hasattr(t, "numel"))
    return total


def measure(scheme: str, warmup: int, steps: int) -> dict:
    """One scheme, in this process."""
    import torch

    import molex
    from benchmarks.study_measure import compose_config, mole_config_of
    from molex.models import load_model
    from molex.training.objective import mole_objective

    torch.manual_seed(0)
    start = time.perf_counter()
    model, _ = load_model("smollm2-135m", quantization=None if scheme == "float32" else scheme)
    molex.inject(model, mole_config_of(compose_config([])))
    load_s = time.perf_counter() - start
    model.train()
    optimizer = torch.optim.AdamW(molex.trainable_parameters(model), lr=3e-3)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    gc.collect()
    rss_after_load = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times, cpu_times = [], []
    for step in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        outputs = model(input_ids=ids, labels=ids)
        loss = mole_objective(model, outputs).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    return {
        "scheme": scheme,
        "load_and_inject_s": round(load_s, 2),
        "base_weight_mb": round(_model_bytes(model) / 2**20, 1),
        "rss_after_load_mb": round(rss_after_load, 1),
        "peak_rss_train_mb": round(_status_mb("VmHWM"), 1),
        "step_s_median": round(statistics.median(times), 3),
        "step_s_all": [round(t, 3) for t in times],
        "step_cpu_s_median": round(statistics.median(cpu_times), 3),
        "final_loss": round(float(loss), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_quant", description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=SCHEMES, choices=SCHEMES)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one scheme may take")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure one scheme, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.warmup, args.steps)))
        return {}
    # rows of schemes not measured now are kept from the file when it was measured the same way on the same
    # machine and torch, so a run cut short loses nothing and the rest can be measured with --schemes
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    here = environment(precision=PRECISION)
    machine = {key: previous.get("environment", {}).get(key) for key in ("cpu", "torch", "threads")}
    same = (previous.get("warmup"), previous.get("steps")) == (args.warmup, args.steps) and machine == {
        key: here[key] for key in machine
    }
    rows = {row["scheme"]: row for row in previous.get("results", [])} if same else {}
    payload: dict = {}
    for scheme in args.schemes:
        cmd = [sys.executable, "-m", "benchmarks.bench_quant", "--one", scheme, "--warmup", str(args.warmup),
               "--steps", str(args.steps)]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rows[scheme] = {"scheme": scheme, "error": f"did not finish in {args.timeout:.0f} s"}
        else:
            ok = proc.returncode == 0
            last = (proc.stdout if ok else proc.stderr).strip().splitlines()[-1]
            rows[scheme] = json.loads(last) if ok else {"scheme": scheme, "error": last}
        print(json.dumps(rows[scheme]), flush=True)
        payload = {
            "what": "default MoLE config (topk, mola_increasing, q/v/down_proj, rank 8) on SmolLM2-135M, 8 x 96 tokens",
            "memory": "base_weight_mb: tensor bytes; rss: /proc/self/status VmRSS after load, VmHWM over the steps",
            "warmup": args.warmup,
            "steps": args.steps,
            "environment": here,
            "results": [rows[s] for s in SCHEMES if s in rows],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(str(args.out), payload)
    return payload


if __name__ == "__main__":
    main()
