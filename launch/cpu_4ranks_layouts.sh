#!/usr/bin/env bash
# Every layout of 4 CPU ranks (U x R = 4x1, 2x2, 1x4) on a smaller video, each with --verify.
# Extra arguments are passed on to every run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for layout in "4 1" "2 2" "1 4"; do
    set -- $layout
    echo "== Ulysses $1 x ring $2"
    torchrun --nproc-per-node 4 launch/generate.py --ulysses-degree "$1" --ring-degree "$2" \
        --num-frames 17 --height 256 --width 256 --num-inference-steps 6 --verify "$@"
done
