#!/usr/bin/env bash
# 4 GPUs, pure ring attention (ring 4): any head count works; each rank holds 1/4 of the K/V and
# passes it around the ring. Extra arguments pass on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec torchrun --nproc-per-node 4 launch/generate.py \
    --ulysses-degree 1 --ring-degree 4 \
    --hidden-size 1536 --num-heads 12 --num-layers 4 \
    --num-frames 81 --height 480 --width 832 --num-inference-steps 20 --dtype bf16 \
    --output video.mp4 --verify "$@"
