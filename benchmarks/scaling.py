"""Part "scaling" (P4): the attention layer on 1, 2, 4, ... GPUs in every layout, in one torchrun.

For every group size k (1, 2, 4, 8 and the world, dividing it) the ranks form world/k contiguous
sequence-parallel groups working side by side, each on its own GPUs (so k = 1 rows are one-GPU
times), and ``USPAttention`` is timed in every layout U x R = k on this rank's shard of the same
inputs. speedup = time at k = 1 / time; efficiency = speedup / k. rel_err: the gathered output
against ``LocalAttention`` over the whole sequence on one device.
"""

from __future__ import annotations

import torch

import usp_attn

from benchmarks.kernel_speed import qkv_sets
from benchmarks.suite import (Context, group_sizes, headline, layout_name, layouts_of, rel_err, sequence_parallel,
                              short_error, skipped)
from benchmarks.timing import attention_flops, tflops

__all__ = ["scaling_part", "time_shards", "full_inputs"]

GPU = dict(shape=(1, 40, 75600, 128), dtype=torch.bfloat16)  # Wan 2.1 14B, 720p
CPU = dict(shape=(1, 8, 256, 32), dtype=torch.float32)


def full_inputs(ctx: Context, shape, dtype):
    """The whole sequence's q, k, v sets (the same on every rank) and ``LocalAttention`` of the first."""
    full = qkv_sets(ctx, shape, dtype, seed=0, per_rank=ctx.world)
    return full, usp_attn.LocalAttention(shape[1], shape[3])(*full[0])


def time_shards(ctx: Context, layer, full, reference) -> tuple[float, float, str]:
    """Slowest rank's median seconds of ``layer`` on this rank's shards, and its gathered error."""
    shards = [tuple(usp_attn.shard_sequence(x).contiguous() for x in qkv) for qkv in full]
    err = ctx.max_over_ranks(rel_err(usp_attn.gather_sequence(layer(*shards[0])), reference))
    timing = ctx.measure(layer, shards, warmup=2)
    return ctx.max_over_ranks(timing.median), err, f"{len(timing.times)} reps"


def scaling_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    rows = []
    for shape in ctx.shapes or [cfg["shape"]]:
        b, h, s, d = shape
        label, flops = ",".join(map(str, shape)), attention_flops(b, h, s, s, d)
        full, reference = full_inputs(ctx, shape, cfg["dtype"])
        base, timed = None, {}
        for k in group_sizes(ctx.world):
            for u, r in layouts_of(k):
                row = {"what": "USPAttention", "shape": label, "layout": layout_name(u, r), "gpus": k}
                if ctx.out_of_time():
                    rows.append(skipped(**row, why="time budget spent"))
                    continue
                with sequence_parallel(ctx, u, r) as state:
                    try:
                        layer = usp_attn.USPAttention(h, d)
                        seconds, err, note = time_shards(ctx, layer, full, reference)
                    except Exception as exc:
                        rows.append({**row, "backend": str(state.backend), "note": f"error: {short_error(exc)}"})
                        continue
                base = seconds if k == 1 else base
                timed[(u, r)] = seconds
                rows.append({**row, "backend": str(layer.backend), "ms": seconds * 1e3, "tflops": tflops(flops, seconds),
                             "speedup": base and base / seconds, "efficiency": base and base / seconds / k,
                             "rel_err": err, "note": note})
        top = group_sizes(ctx.world)[-1]
        if top > 1 and base and (top, 1) in timed:
            rows.append(headline("P4", f"Ulysses-{top} efficiency (time on 1 GPU / time on {top} / {top})",
                                 base / timed[(top, 1)] / top, ">= 0.90", shape=label, gpus=top))
        full = reference = None
        ctx.free()
    return rows
