#!/usr/bin/env bash
# 8 GPUs, one node, USP: Ulysses 4 (all-to-all inside groups of 4 neighbouring ranks) x ring 2
# (K/V passed between the two groups). 12 heads divide 4, so no head padding. Needs a backend that
# returns the log-sum-exp for the ring (fa or torch_sdpa; auto picks one). Extra arguments pass on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec torchrun --nproc-per-node 8 launch/generate.py \
    --ulysses-degree 4 --ring-degree 2 \
    --hidden-size 1536 --num-heads 12 --num-layers 4 \
    --num-frames 81 --height 480 --width 832 --num-inference-steps 20 --dtype bf16 \
    --output video.mp4 --verify "$@"
