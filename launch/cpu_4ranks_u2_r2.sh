#!/usr/bin/env bash
# The main job on a machine without a GPU: 4 CPU ranks (gloo), Ulysses 2 x ring 2, built-in model,
# checked against a one-process rerun; writes video.gif and video_one_process.gif. Extra arguments are passed on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec torchrun --nproc-per-node 4 launch/generate.py \
    --attention-backend torch_sdpa --ulysses-degree 2 --ring-degree 2 \
    --prompt "a red circle moving right" --output video.gif --verify "$@"
