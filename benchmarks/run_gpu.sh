#!/usr/bin/env bash
# Everything issue 5 needs from one GPU, in one call (< 10 min on an H100):
#   1. install the carried wheels (.whl/: sageattention 1.0.6) into /tmp/site
#   2. pytest -m gpu tests/gpu                       -> $OUT/gpu_tests.log
#   3. python benchmarks/gpu_issue5.py               -> $OUT/issue5.log, $OUT/results.json
#   4. python launch/bench.py (1 rank, Wan shapes)   -> $OUT/bench.md, $OUT/bench.png (if time is left)
# Usage (repository root on the GPU machine): bash benchmarks/run_gpu.sh
#        bash benchmarks/run_gpu.sh --cpu-smoke   # dry run of this script on a CPU machine (toy sizes)
# Each step has its own time limit; a failing step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SMOKE=()
BENCH_ARGS=()
if [ "${1:-}" = "--cpu-smoke" ]; then
    SMOKE=(--cpu-smoke)
    BENCH_ARGS=(--shape 1,2,128,32 --reps 2)
fi
REPO=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || echo "WARNING: installing .whl/*.whl failed; running without them"
fi
export PYTHONPATH=$REPO:${PYTHONPATH:-}  # usp_attn, benchmarks and tests import from the checkout
export PYTHONUNBUFFERED=1
OUT=${OUT:-$REPO/out}
mkdir -p "$OUT"
t0=$SECONDS
step() { echo; echo "=== [$((SECONDS - t0)) s] $*"; }

step "environment"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
        --format=csv 2>&1
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
    python3 -m pip list 2>/dev/null | grep -i -E '^(torch|triton|sageattention|flash|yunchang|diffusers|matplotlib|pytest) '
} 2>&1 | tee "$OUT/env.txt"

step "pytest -m gpu tests/gpu"
timeout 180 python3 -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider --timeout 120 2>&1 | tee "$OUT/gpu_tests.log"
echo "pytest exit code: ${PIPESTATUS[0]}"

step "benchmarks/gpu_issue5.py"
timeout 330 python3 benchmarks/gpu_issue5.py ${SMOKE[@]+"${SMOKE[@]}"} --budget-s 270 --out "$OUT" 2>&1 | tee "$OUT/issue5.log"
echo "gpu_issue5.py exit code: ${PIPESTATUS[0]}"

left=$((570 - (SECONDS - t0)))
if [ "$left" -gt 45 ]; then
    step "launch/bench.py (1 rank, ${left} s left)"
    timeout $((left - 10)) python3 launch/bench.py --reps 5 ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --peers none --markdown "$OUT/bench.md" --plot "$OUT/bench.png" 2>&1 | tail -40
    echo "bench.py exit code: ${PIPESTATUS[0]}"
else
    step "launch/bench.py skipped: only ${left} s left"
fi
step "done"
