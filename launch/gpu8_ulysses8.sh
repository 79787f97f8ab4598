#!/usr/bin/env bash
# 8 GPUs, one node, Ulysses 8 (all-to-all only): the built-in model at a Wan 1.3B-like shape,
# 480p, 81 frames (32760 tokens), bf16. 12 heads do not divide 8: USPAttention pads them to 16
# (the padded heads cost 1/4 more attention work; 16 or 24 heads would not). Extra arguments pass on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec torchrun --nproc-per-node 8 launch/generate.py \
    --ulysses-degree 8 --ring-degree 1 \
    --hidden-size 1536 --num-heads 12 --num-layers 4 \
    --num-frames 81 --height 480 --width 832 --num-inference-steps 20 --dtype bf16 \
    --output video.mp4 --verify "$@"
