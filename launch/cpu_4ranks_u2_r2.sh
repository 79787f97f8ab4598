#!/usr/bin/env bash
# The main job on a machine without a GPU: 4 CPU ranks (gloo), Ulysses 2 x ring 2, built-in model,
# checked against a one-process rerun. About 30-60 s on 2 cores. Extra arguments are passed on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec torchrun --nproc-per-node 4 launch/generate.py \
    --attention-backend torch_sdpa --ulysses-degree 2 --ring-degree 2 \
    --output video.npz --verify "$@"
