#!/usr/bin/env bash
# A real Wan 2.x model through diffusers' WanPipeline on 8 GPUs (Ulysses 4 x ring 2).
# Needs: pip install 'usp-attn[diffusers,video]' and the model, e.g. a local copy of
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers. Usage: launch/gpu8_wan_diffusers.sh /path/to/model [more args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model=${1:?usage: $0 MODEL_PATH [generate.py arguments]}
shift
exec torchrun --nproc-per-node 8 launch/generate.py --model-path "$model" \
    --ulysses-degree 4 --ring-degree 2 \
    --num-frames 81 --height 480 --width 832 --num-inference-steps 50 --dtype bf16 \
    --prompt "a red panda drinking tea in a garden, cinematic" --output wan.mp4 "$@"
