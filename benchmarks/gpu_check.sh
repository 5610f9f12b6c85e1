#!/usr/bin/env bash
# GPU check for the expert kernels, on a CUDA machine, from the repository root:
#   bash benchmarks/gpu_check.sh
# Installs nothing (needs torch, triton, pytest, peft already present; megablocks/grouped_gemm
# are used when installed) and does not need molex installed: it runs from the checkout.
# Runs the gpu-marked tests (Triton compiled for real, bf16, megablocks if installed), then the
# GPU benchmark sweep and the layer benchmark, and prints a short table last. Budget: < 8 min.
# Results go to $OUT (if set) or benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
start=$(date +%s)

"$PY" - <<'PYEOF' || { echo "gpu_check: no usable CUDA device"; exit 1; }
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
for name in ("megablocks", "grouped_gemm"):
    try:
        __import__(name)
        print(name, "installed")
    except ImportError:
        print(name, "not installed: the megablocks backend is skipped")
PYEOF

echo "== tests (gpu-marked and Triton compiled for real) =="
timeout 180 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_kernels_gpu.py tests/test_kernels_triton.py tests/test_kernels.py \
    --junitxml="$DEST/gpu_tests.xml" 2>&1 | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== sweep (bf16, full grid + roofline points) =="
timeout 210 "$PY" -m benchmarks.bench_sweep --json "$DEST/sweep_gpu.json" 2>&1 | tail -n 120
sweep_rc=${PIPESTATUS[0]}

echo "== layer (bf16, T=4096, d=4096: the roofline point, whole layer) =="
timeout 60 "$PY" -m benchmarks.bench_layer --device cuda --dtype bfloat16 --tokens 4096 --dim 4096 \
    --repeats 20 --warmup 5 --json "$DEST/layer_gpu.json" 2>&1 | tail -n 25

end=$(date +%s)
echo
echo "== summary: tests rc=$tests_rc, sweep rc=$sweep_rc, total $((end - start)) s =="
if [ -f "$DEST/sweep_gpu.json" ]; then
    "$PY" -m benchmarks.summarize --short "$DEST/sweep_gpu.json"
fi
exit $(( tests_rc != 0 || sweep_rc != 0 ))
