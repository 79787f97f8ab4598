#!/usr/bin/env bash
# Check an N-GPU machine in one call (about 7 min on 2 x H200; stops itself before 9 min): the multi-GPU
# tests, then every measurement through the benchmark suite (python -m benchmarks.run, parts named below):
#   1. environment (GPUs, links, versions); a wheels folder (.whl/) installed into /tmp/site
#   2. pytest -m multigpu tests/gpu: the sequence-parallel test scenarios on NCCL (one process per GPU), every
#      layout of every group size, the safe defaults there (host syncs, fp64 ring, first-call errors), and the
#      layers and a DiT block captured in CUDA graphs under NCCL
#   3. (GPU runs) ulysses-overlap (Ulysses-2 with and without the head-group pipeline), layout-check (every
#      (cfg, U, R): predicted vs measured guided step), sparse-sp (USPAttention sparse vs dense, every layout)
#   4. scaling (P4): the attention layer at Wan 14B 720p on 1, 2, 4, 8 GPUs (groups side by side), every layout;
#      peers (P5): yunchang and diffusers context parallel against USPAttention, same shards and layout
#   5. model-step: the built-in DiT (P4) and the diffusers Wan transformer (P5: vs enable_parallelism)
#   6. communication: all-to-all, ring hop and NCCL probes vs link bandwidth; then (GPU runs) safe-defaults,
#      training-step, diffusers-families, text-padding (see BENCHMARKS.md)
#   7. torchrun --nproc-per-node N launch/generate.py --verify: Ulysses-N, ring-N, a mixed UxR; bf16 and fp32
#   8. benchmarks/report.py: summary.md, results.json, summary.png
# Output (all under $OUT, else ./out/multigpu): multigpu.log (everything printed), env.txt, summary.md,
# results.json, summary.png. Each step has its own time limit, a failing step is reported and the next one
# runs; exit status 1 if any step failed.
#
# Usage (repository root or anywhere):
#   bash launch/multigpu_check.sh [N]                 # N GPUs (default: all visible)
#   bash launch/multigpu_check.sh --cpu-dry-run [N]   # every step on CPU with gloo at toy sizes, N processes
#                                                     # (default 4): catches typos before a GPU call; the
#                                                     # multigpu tests run on N CPU processes too
#   MULTIGPU_PARTS="sparse-sp layout-check" bash launch/multigpu_check.sh 2   # only those suite parts
#   MULTIGPU_BUDGET_S=580 ...                         # the overall budget (default 530 s)
# The dry run runs generate.py on Ulysses-N (bf16) and ring-N (fp32) only, so it stays within about a
# minute on 2 cores.
set -uo pipefail
shopt -s nullglob  # no result files yet: an empty list, not the pattern itself
# NVLink multicast stays off: on shared hosts it can take the GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

PY=${PYTHON:-python3}  # the Python that holds torch

DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then
    DRY=1
    shift
fi
if [ $# -gt 1 ]; then
    echo "usage: bash launch/multigpu_check.sh [--cpu-dry-run] [N]" >&2
    exit 2
fi
if [ $DRY = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
    N=${1:-4}
    VISIBLE=$N
else
    VISIBLE=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    N=${1:-$VISIBLE}
fi
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
    echo "ERROR: N must be a positive number of GPUs, got '$N'" >&2
    exit 2
fi
if [ "$N" -gt "$VISIBLE" ]; then
    echo "ERROR: N=$N but $VISIBLE GPU(s) are visible to torch; use --cpu-dry-run [N] on a machine without GPUs" >&2
    exit 2
fi

OUTDIR=${OUT:-$REPO/out/multigpu}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/multigpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUTDIR/multigpu.log") 2>&1

# A wheels folder (.whl/: sageattention, yunchang, diffusers) for an offline GPU machine. The dry run
# installs them into a scratch folder instead, leaving this machine's /tmp/site alone.
SITE=/tmp/site
[ $DRY = 1 ] && SITE=$WORK/site
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/.whl/*.whl; then
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
        echo "installed the wheels folder into $SITE: $(cd "$REPO/.whl" && ls -- *.whl | tr '\n' ' ')"
    else
        echo "WARNING: installing .whl/*.whl failed; running without them"
    fi
else
    echo "no wheels folder (.whl/): yunchang and diffusers only if this Python already has them"
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # usp_attn, benchmarks, launch and tests from the checkout

# ---- time limits (seconds) -------------------------------------------------------------------------
if [ $DRY = 1 ]; then
    BUDGET=420; T_ENV=60; T_PART=90; PART_BUDGET=60; T_GEN=60; SUITE_FLAGS=(--dry-run)
    GEN_ARGS=(--num-frames 5 --height 64 --width 64 --num-inference-steps 2 --hidden-size 64 --num-heads 4
              --num-layers 1)
else
    BUDGET=${MULTIGPU_BUDGET_S:-530}; T_ENV=60; T_PART=110; PART_BUDGET=80; T_GEN=60; SUITE_FLAGS=()
    GEN_ARGS=(--num-inference-steps 6)  # the built-in model at its defaults
fi
t0=$SECONDS
FAILED=0
TORCHRUN=("$PY" -m torch.distributed.run --standalone)

# run_step NAME LIMIT CMD...: prints a header, runs CMD under `timeout` (never past the overall budget),
# appends "NAME<TAB>exit<TAB>seconds<TAB>limit" to steps.tsv. A step with no time left is skipped (exit -1).
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - t0) - 10))
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "=== [$((SECONDS - t0)) s] $name (limit ${limit} s)"
    if [ "$limit" -lt 15 ]; then
        echo "skipped: only ${left} s of the ${BUDGET} s budget left"
        printf '%s\t%s\t%s\t%s\n' "$name" -1 0 0 >>"$WORK/steps.tsv"
        FAILED=1
        return
    fi
    local start=$SECONDS
    timeout -k 10 "$limit" "$@"
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$WORK/steps.tsv"
    if [ $rc -ne 0 ]; then
        FAILED=1
        echo "--- $name: exit status $rc$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo ' (time limit)')"
    fi
}

report() {
    "$PY" benchmarks/report.py "$WORK"/*.json --steps "$WORK/steps.tsv" --logs "$WORK/generate_*.log" \
        --markdown "$OUTDIR/summary.md" --json "$OUTDIR/results.json" "$@" >/dev/null
}

# ---- 1. environment ----------------------------------------------------------------------------------
env_info() {
    echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M')  git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "N=$N dry_run=$DRY NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE" \
        "TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS=$NVSHMEM_DISABLE_NVLS"
    echo "cpus: $(nproc)"
    if [ "$DRY" = 0 ]; then
        nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
        nvidia-smi topo -m
        nvidia-smi nvlink -s -i 0 | head -20
    fi
    "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys, torch
def v(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "not installed"
cuda = torch.cuda.is_available()
nccl = torch.cuda.nccl.version() if cuda else "-"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count(), "nccl", ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl)
for n in ("diffusers", "yunchang", "flash-attn", "sageattention", "triton", "huggingface-hub", "safetensors"):
    print(f"  {n}: {v(n)}")
import usp_attn  # the one import that must work
for mod in ("yunchang", "diffusers", "usp_attn.integrations.diffusers"):
    try:
        importlib.import_module(mod)
        print(f"  import {mod}: ok")
    except Exception as exc:  # reported; the benchmark rows then say why the peer did not run
        print(f"  import {mod}: FAILED: {type(exc).__name__}: {exc}")
EOF
}
export -f env_info
export N DRY PY
run_step "environment" "$T_ENV" bash -c 'set -o pipefail; env_info 2>&1 | tee "$0"' "$OUTDIR/env.txt"

# ---- 2. the multi-GPU tests: pytest spawns one process per GPU (tests/gpu/multigpu.py) --------------------
if [ $DRY = 1 ]; then
    TEST_ENV=(USP_ATTN_MULTIGPU_CPU_RANKS="$N")  # the same cases on N CPU processes with gloo
else
    TEST_ENV=(USP_ATTN_TEST_GPUS="$N")
fi
run_step "multigpu tests" "$T_PART" env "${TEST_ENV[@]}" "$PY" -m pytest -m multigpu tests/gpu -q -rfEs \
    -p no:cacheprovider --timeout "$T_PART"

# ---- 3-6. the suite's multi-GPU parts, one torchrun each (a hang costs one step) -------------------------
# Not measured on two GPUs yet first (the Ulysses pipeline, the layout check, sparse under SP), so a short budget
# still gets them; MULTIGPU_PARTS="a b" runs those parts instead.
read -r -a PARTS <<< "${MULTIGPU_PARTS:-ulysses-overlap layout-check sparse-sp scaling peers model-step communication \
safe-defaults training-step diffusers-families text-padding}"
# the last four have unit tests of their own on CPU: the dry run skips them to stay within about a minute
[ $DRY = 1 ] && PARTS=(scaling peers model-step communication)
for i in "${!PARTS[@]}"; do
    part=${PARTS[$i]}  # results numbered: the report lists the parts in the order they ran
    run_step "$part" "$T_PART" "${TORCHRUN[@]}" --nproc-per-node "$N" -m benchmarks.run --parts "$part" \
        ${SUITE_FLAGS[@]+"${SUITE_FLAGS[@]}"} --budget-s "$PART_BUDGET" --json "$WORK/$((i + 10))_$part.json"
    report || echo "WARNING: the report failed"
done

# ---- 7. the main job with --verify -------------------------------------------------------------------
mixed=""
for ((r = 2; r < N; r++)); do  # the most square U x R with U >= R > 1
    if [ $((N % r)) -eq 0 ] && [ $((N / r)) -ge "$r" ]; then mixed="$((N / r)) $r"; fi
done
RUNS=("$N 1 bf16" "$N 1 fp32" "1 $N bf16" "1 $N fp32")
[ -n "$mixed" ] && RUNS+=("$mixed bf16" "$mixed fp32")
[ $DRY = 1 ] && RUNS=("$N 1 bf16" "1 $N fp32")
[ "$N" = 1 ] && RUNS=("1 1 bf16" "1 1 fp32")
for item in "${RUNS[@]}"; do
    set -- $item
    log="$WORK/generate_${1}x${2}_${3}.log"
    run_step "generate ${1}x${2} $3" "$T_GEN" bash -c 'log=$0; set -o pipefail; "$@" 2>&1 | tee "$log"' "$log" \
        "${TORCHRUN[@]}" --nproc-per-node "$N" launch/generate.py --ulysses-degree "$1" --ring-degree "$2" \
        --dtype "$3" --verify --output none "${GEN_ARGS[@]}"
done

# ---- 8. report ---------------------------------------------------------------------------------------
echo
echo "=== [$((SECONDS - t0)) s] report"
report --plot "$OUTDIR/summary.png" || { echo "ERROR: the report failed"; FAILED=1; }
cat "$OUTDIR/summary.md"
echo "=== [$((SECONDS - t0)) s] done: $([ $FAILED = 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED');" \
    "output in $OUTDIR (multigpu.log, env.txt, summary.md, results.json, summary.png)"
exit $FAILED
