"""How far one steady-state ``USPAttention.forward`` call (U=2, R=2, 4 CPU ranks) walks before the kernel.

    torchrun --standalone --nproc-per-node 4 -m benchmarks.call_path

Prints, from rank 0: the usp_attn modules the call enters, and the most usp_attn frames on the stack when a
torch operator is called (the depth a reader follows from the layer to the kernel). Measured with
``sys.setprofile`` on the fourth call of a layer (the first is checked across ranks, later ones are steady).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import usp_attn


def main() -> None:
    dist.init_process_group("gloo")
    usp_attn.init_sequence_parallel(ulysses_degree=2, ring_degree=2)
    layer = usp_attn.USPAttention(num_heads=4, head_size=16)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 32, 4, 16) for _ in range(3))
    for _ in range(3):
        layer(q, k, v, seq_len=128)
    package = os.path.dirname(usp_attn.__file__)
    modules, depths = set(), []

    def profile(frame, event, arg):
        if event != "call":
            return
        name = frame.f_code.co_filename
        if name.startswith(package):
            modules.add(os.path.relpath(name, package))
        if name.endswith(os.path.join("torch", "_ops.py")) and frame.f_code.co_name == "__call__":
            depth, f = 0, frame
            while f is not None:
                depth += f.f_code.co_filename.startswith(package)
                f = f.f_back
            depths.append(depth)

    sys.setprofile(profile)
    layer(q, k, v, seq_len=128)
    sys.setprofile(None)
    if dist.get_rank() == 0:
        print(json.dumps({"modules": len(modules), "max_frames_to_op": max(depths), "list": sorted(modules)}))
    usp_attn.destroy_sequence_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
