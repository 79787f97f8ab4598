"""Part "compile": what ``torch.compile(fullgraph=True)`` costs and gains for ``LocalAttention`` and
``USPAttention`` (world 1) with ``torch_sdpa``: the first compiled call (the compile itself), the
graphs made, and the per-call time eager vs compiled. That they compile at all, without graph breaks
or recompiles, and match eager is checked by tests/gpu/test_gpu_layers.py.
"""

from __future__ import annotations

import time

import torch

import usp_attn
from usp_attn import AttentionBackendEnum, LocalAttention, USPAttention, global_force_attn_backend_context_manager

from benchmarks.suite import Context, short_error
from benchmarks.timing import random_qkv, synchronize, time_fn

__all__ = ["compile_part"]

GPU = dict(shape=(1, 12, 4096, 128), dtype=torch.bfloat16, compile_backend="inductor", reps=100)
CPU = dict(shape=(1, 2, 256, 64), dtype=torch.bfloat16, compile_backend="eager", reps=3)


def compile_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    b, h, s, d = cfg["shape"]
    sets = random_qkv(cfg["shape"], cfg["dtype"], ctx.device, seed=7, count=2)
    backend, rows = cfg["compile_backend"], []
    usp_attn.init_sequence_parallel(1, 1)
    try:
        for name, layer in (("LocalAttention", LocalAttention(h, d)), ("USPAttention (world 1)", USPAttention(h, d))):
            row = {"what": f"{name}, torch_sdpa", "shape": ",".join(map(str, cfg["shape"])), "compile_backend": backend}
            torch._dynamo.reset()
            try:
                with global_force_attn_backend_context_manager(AttentionBackendEnum.TORCH_SDPA):
                    layer(*sets[0])
                    compiled = torch.compile(layer, fullgraph=True, backend=backend)
                    t0 = time.perf_counter()
                    compiled(*sets[0])
                    synchronize(ctx.device)
                    row["first_call_s"] = time.perf_counter() - t0
                    compiled(*sets[1])
                    row["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
                    row["eager_us"] = time_fn(layer, sets, warmup=3, reps=cfg["reps"], device=ctx.device).median * 1e6
                    row["compiled_us"] = time_fn(compiled, sets, warmup=3, reps=cfg["reps"], device=ctx.device).median * 1e6
            except Exception as exc:  # a layer that does not compile here is a result; the GPU tests fail on it
                row["note"] = f"error: {short_error(exc, 600)}"
            rows.append(row)
    finally:
        usp_attn.destroy_sequence_parallel()
        torch._dynamo.reset()
    return rows
