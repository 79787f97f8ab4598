"""Parts "syncs" and "compile": steady-state forwards never synchronise the host with the GPU
(each runs once, then again under ``torch.cuda.set_sync_debug_mode("error")``; on CPU they just run),
and ``LocalAttention`` / ``USPAttention`` (world 1) compile with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import time

import torch

import usp_attn
from usp_attn import AttentionBackendEnum, LocalAttention, USPAttention, global_force_attn_backend_context_manager
from usp_attn.backends import BACKEND_CLASSES
from usp_attn.platforms import current_platform

from benchmarks.correctness import key_mask
from benchmarks.local_ring import run_local_ring, split_blocks
from benchmarks.suite import Context, short_error
from benchmarks.timing import random_qkv, synchronize, time_fn

__all__ = ["syncs_part", "compile_part"]

GPU = dict(shape=(1, 12, 4096, 128), dtype=torch.bfloat16, compile_backend="inductor", reps=100)
CPU = dict(shape=(1, 2, 256, 64), dtype=torch.bfloat16, compile_backend="eager", reps=3)


def _without_syncs(ctx: Context, fn) -> str:
    try:
        fn()
        synchronize(ctx.device)
    except Exception as exc:
        return f"warm-up failed: {short_error(exc)}"
    if not ctx.cuda:
        fn()
        return "ran (CPU: sync debug mode needs CUDA)"
    try:
        torch.cuda.set_sync_debug_mode("error")
        fn()
        status = "ok: no synchronizing call"
    except Exception as exc:
        status = f"SYNC: {short_error(exc, 400)}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(ctx.device)
    return status


def syncs_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    b, h, s, d = cfg["shape"]
    q, k, v = random_qkv(cfg["shape"], cfg["dtype"], ctx.device, seed=6)[0]
    layer, mask = LocalAttention(h, d), key_mask(b, s, ctx.device)
    blocks, lengths = split_blocks(k, v, 4)
    cases = [("LocalAttention auto", lambda: layer(q, k, v)),
             ("LocalAttention auto, attend(return_lse=True)", lambda: layer.attend(q, k, v, return_lse=True)),
             ("ring_attention R=4 compute path (in-memory exchange)",
              lambda: run_local_ring(layer.attend, q, blocks, lengths)),
             ("LocalAttention auto, key-padding mask", lambda: layer(q, k, v, attn_mask=mask))]
    sage = AttentionBackendEnum.SAGE_ATTN
    if not BACKEND_CLASSES[sage].unsupported_reason(current_platform(), d, cfg["dtype"]):
        def run_sage():
            with global_force_attn_backend_context_manager(sage):
                return layer(q, k, v)
        cases.append(("LocalAttention[sage_attn]", run_sage))
    usp_attn.init_sequence_parallel(1, 1)
    try:
        usp = USPAttention(h, d)
        cases.insert(1, ("USPAttention (world 1)", lambda: usp(q, k, v)))
        return [{"what": name, "result": _without_syncs(ctx, fn)} for name, fn in cases]
    finally:
        usp_attn.destroy_sequence_parallel()


def compile_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    b, h, s, d = cfg["shape"]
    sets = random_qkv(cfg["shape"], cfg["dtype"], ctx.device, seed=7, count=2)
    backend, rows = cfg["compile_backend"], []
    usp_attn.init_sequence_parallel(1, 1)
    try:
        for name, layer in (("LocalAttention", LocalAttention(h, d)), ("USPAttention (world 1)", USPAttention(h, d))):
            row = {"what": f"{name}, torch_sdpa", "compile_backend": backend}
            torch._dynamo.reset()
            try:
                with global_force_attn_backend_context_manager(AttentionBackendEnum.TORCH_SDPA):
                    eager = layer(*sets[0])
                    compiled = torch.compile(layer, fullgraph=True, backend=backend)
                    t0 = time.perf_counter()
                    out = compiled(*sets[0])
                    synchronize(ctx.device)
                    row["first_call_s"] = time.perf_counter() - t0
                    compiled(*sets[1])  # new data, same shapes: must not recompile
                    row["max_abs_diff"] = float((out.float() - eager.float()).abs().max())
                    row["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
                    row["eager_us"] = time_fn(layer, sets, warmup=3, reps=cfg["reps"], device=ctx.device).median * 1e6
                    row["compiled_us"] = time_fn(compiled, sets, warmup=3, reps=cfg["reps"], device=ctx.device).median * 1e6
                    row["result"] = "ok"
            except Exception as exc:
                row["result"] = f"FAILED: {short_error(exc, 600)}"
            rows.append(row)
    finally:
        usp_attn.destroy_sequence_parallel()
        torch._dynamo.reset()
    return rows
