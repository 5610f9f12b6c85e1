#!/usr/bin/env bash
# GPU check of molex on a CUDA machine, from a bare checkout (molex need not be installed; needs
# torch, triton, transformers, peft, lightning, pytest; megablocks/grouped_gemm used if installed;
# no hydra, datasets or network needed). From the repository root:
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # results in $OUT (default benchmarks/results/gpu)
#   bash benchmarks/gpu_check.sh --cpu                  # CPU mode: every Python step at tiny sizes
# (MOLEX_GPU_CHECK_CPU=1 is the same as --cpu.) Steps, each under its own `timeout`:
#   1. device and versions;
#   2. tests: tests/test_kernels_gpu.py (gpu-marked: every backend on CUDA, fp32 and bf16),
#      tests/test_kernels_triton.py (Triton compiled for real, bf16 under the gpu marker),
#      tests/test_kernels.py (CPU backends, cost model) -> tests.xml;
#   3. the whole-layer roofline point, every backend, fwd+bwd -> roofline.json;
#   4. one training step through Lightning, MoLE vs PEFT LoRA, tiny and SmolLM2-sized -> train.json;
#   5. the backend sweep, cost-model pick vs measured best, with the time left -> sweep.json;
#   6. the summary (summary.json), printed last.
# Everything printed also goes to gpu_check.log. Six files in all. Budget: < 8 min on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CPU="${MOLEX_GPU_CHECK_CPU:-0}"
for arg in "$@"; do
    case "$arg" in
        --cpu) CPU=1 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (the only option is --cpu)" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results/gpu}"
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
: >"$LOG"
start=$(date +%s)
BUDGET=430  # seconds for all steps; the sweep gets what the others leave (30 to 240 s)

if [ "$CPU" = 1 ]; then
    # Triton's kernels run under its interpreter on CPU; tiny sizes, few repeats: checks the script, not speed
    export TRITON_INTERPRET=1
    DEVICE=cpu
    TESTS=(tests/test_kernels_gpu.py)  # collected, and skipped without CUDA: checks the junit step
    ROOF=(--device cpu --tokens 64 --dim 64 --repeats 1 --warmup 1)
    TRAIN=(--device cpu --models tiny --steps 2 --warmup 1 --batch 2 --seq 16)
    SWEEP=(--device cpu --tiny --repeats 1 --warmup 1)
else
    unset TRITON_INTERPRET
    DEVICE=cuda
    TESTS=(tests/test_kernels_gpu.py tests/test_kernels_triton.py tests/test_kernels.py)
    ROOF=(--device cuda --repeats 20 --warmup 5)
    TRAIN=(--device cuda --steps 10 --warmup 3)
    SWEEP=(--device cuda)
fi

log() { echo "$@" | tee -a "$LOG"; }
# run NAME SECONDS CMD...: the command under `timeout`, its output into the log; sets rc_NAME
run() {
    local name=$1 limit=$2
    shift 2
    log "== $name (limit ${limit} s) =="
    # SIGINT first: pytest then still writes its junit file and summary; a hung kernel gets killed 10 s later
    timeout -s INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    printf -v "rc_$name" '%s' "$rc"
    log "== $name: exit $rc after $(($(date +%s) - start)) s in all =="
}

run device 60 "$PY" - "$DEVICE" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
import torch
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device: run with --cpu to check the script itself"
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
print("torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("triton", "transformers", "peft", "lightning", "pytest", "megablocks", "grouped_gemm"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "not installed" + (": the megablocks backend is skipped" if name in ("megablocks", "grouped_gemm") else ""))
PYEOF
if [ "$rc_device" != 0 ]; then
    log "gpu_check: the device check failed, nothing else was run"
    exit 1
fi

per_test=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout=90); fi  # one hung test fails alone
run tests 180 "$PY" -m pytest -q -p no:cacheprovider "${per_test[@]}" "${TESTS[@]}" --junitxml="$DEST/tests.xml"
run roofline 75 "$PY" -m benchmarks.bench_layer_roofline "${ROOF[@]}" --json "$DEST/roofline.json"
run train 120 "$PY" -m benchmarks.bench_train_step "${TRAIN[@]}" --json "$DEST/train.json"
left=$((BUDGET - ($(date +%s) - start)))
left=$((left > 240 ? 240 : left))
left=$((left < 30 ? 30 : left))
# the sweep writes its JSON after every point: cut short by its limit, it still leaves what it measured
run sweep "$left" "$PY" -m benchmarks.bench_sweep "${SWEEP[@]}" --json "$DEST/sweep.json"

end=$(date +%s)
log "== all steps: $((end - start)) s =="
timeout 30 "$PY" -m benchmarks.gpu_summary "$DEST" \
    --rc "tests=$rc_tests" "roofline=$rc_roofline" "train=$rc_train" "sweep=$rc_sweep" 2>&1 | tee -a "$LOG"
# a sweep cut short by its limit (124) kept what it measured: not a failure
exit $((rc_tests != 0 || rc_roofline != 0 || rc_train != 0 || (rc_sweep != 0 && rc_sweep != 124)))
