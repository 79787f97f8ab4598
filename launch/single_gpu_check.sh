#!/usr/bin/env bash
# Check one GPU in one call (about 7 min on an H200), everything under $OUT (else ./out/single_gpu):
#   1. a wheels folder (.whl/, e.g. sageattention, for an offline GPU machine) installed into /tmp/site
#   2. pytest -m gpu tests/gpu: every kernel, candidate and layer vs fp64, host syncs, compile -> gpu_tests.log
#   3. python -m benchmarks.run --parts one-gpu: env, ceilings, layer-overhead (P2), kernels (P1), ring-hops (P3),
#      compile, ring-backward, causal-balance, crossover -> report.md, results.json, report.png
# Usage (repository root or anywhere): bash launch/single_gpu_check.sh [extra benchmarks/run.py arguments]
#        bash launch/single_gpu_check.sh --dry-run      # the same steps on CPU at toy sizes
# Kernel packages installed elsewhere (e.g. FlashAttention 4 under /tmp/fa4site) are used when they are on
# PYTHONPATH before this runs. Each step has its own time limit; a failing step does not stop the next.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$REPO/out/single_gpu}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "WARNING: installing .whl/*.whl failed"
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # usp_attn, benchmarks, launch and tests from the checkout
FAILED=0
t0=$SECONDS
echo "=== [0 s] pytest -m gpu tests/gpu"
timeout -k 10 150 "$PY" -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider --timeout 120 2>&1 | tee "$OUTDIR/gpu_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || { [ "${1:-}" = --dry-run ] || FAILED=1; }  # on CPU every GPU test is skipped (exit 5)
echo "=== [$((SECONDS - t0)) s] python -m benchmarks.run --parts one-gpu"
timeout -k 10 400 "$PY" -m benchmarks.run --parts one-gpu --budget-s 300 --out "$OUTDIR" "$@" || FAILED=1
echo "=== [$((SECONDS - t0)) s] done: $([ $FAILED = 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED');" \
    "output in $OUTDIR (gpu_tests.log, report.md, results.json, report.png)"
exit $FAILED
