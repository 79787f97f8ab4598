"""Part "scaling" (P4): the attention layer on 1, 2, 4, ... GPUs in every layout, one torchrun.

For every group size k dividing the world (1, 2, 4, 8 and the world itself), the ranks form
world/k contiguous sequence-parallel groups that run side by side, each on its own GPUs (so the
k = 1 rows are single-GPU times), and ``USPAttention`` is timed in every layout U x R = k on
this rank's shard of the same inputs. speedup = time at k = 1 / time, efficiency = speedup / k.
rel_err: the gathered output against ``LocalAttention`` over the whole sequence on one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import usp_attn

from benchmarks.kernel_speed import qkv_sets
from benchmarks.suite import Context, headline, layouts_of, rel_err, short_error, skipped
from benchmarks.timing import attention_flops, tflops

__all__ = ["scaling_part", "group_sizes", "sp_groups", "layout_name"]

GPU = dict(shape=(1, 40, 75600, 128), dtype=torch.bfloat16)  # Wan 2.1 14B, 720p
CPU = dict(shape=(1, 8, 256, 32), dtype=torch.float32)


def group_sizes(world: int) -> list[int]:
    return sorted({k for k in (1, 2, 4, 8, world) if world % k == 0})


def sp_groups(world: int, k: int) -> list[list[int]]:
    return [list(range(g, g + k)) for g in range(0, world, k)]


def layout_name(u: int, r: int) -> str:
    k = u * r
    kind = "1 GPU" if k == 1 else f"Ulysses-{k}" if r == 1 else f"ring-{k}" if u == 1 else "U x R"
    return f"{u}x{r} ({kind})"


def time_shards(ctx: Context, layer, shards, reference) -> tuple[float, float | None, str]:
    """Slowest rank's median seconds of ``layer`` over the shard sets, and its gathered error."""
    err = None if reference is None else ctx.max_over_ranks(
        rel_err(usp_attn.gather_sequence(layer(*shards[0])), reference))
    timing = ctx.measure(layer, shards, lo=5, hi=100, warmup=2)
    return ctx.max_over_ranks(timing.median), err, f"{len(timing.times)} reps"


def scaling_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    rows = []
    for shape in ctx.shapes or [cfg["shape"]]:
        b, h, s, d = shape
        label, flops = ",".join(map(str, shape)), attention_flops(b, h, s, s, d)
        full = qkv_sets(ctx, shape, cfg["dtype"], seed=0, per_rank=ctx.world)
        reference = usp_attn.LocalAttention(h, d)(*full[0])
        base, timed = None, {}
        for k in group_sizes(ctx.world):
            for u, r in layouts_of(k):
                row = {"what": "USPAttention", "shape": label, "layout": layout_name(u, r), "gpus": k}
                if ctx.out_of_time():
                    rows.append(skipped(**row, why="time budget spent"))
                    continue
                state, shards = usp_attn.init_sequence_parallel(u, r, ranks=sp_groups(ctx.world, k)), None
                try:
                    shards = [tuple(usp_attn.shard_sequence(x).contiguous() for x in qkv) for qkv in full]
                    layer = usp_attn.USPAttention(h, d)
                    seconds, err, note = time_shards(ctx, layer, shards, reference)
                    base = seconds if k == 1 else base
                    timed[(u, r)] = seconds
                    speedup = base / seconds if base else None
                    rows.append({**row, "backend": str(layer.backend), "ms": seconds * 1e3,
                                 "tflops": tflops(flops, seconds), "speedup": speedup,
                                 "efficiency": speedup and speedup / k, "rel_err": err, "note": note})
                except Exception as exc:
                    rows.append({**row, "backend": str(state.backend), "note": f"error: {short_error(exc)}"})
                finally:
                    del shards
                    usp_attn.destroy_sequence_parallel()
                dist.barrier()
        top = max(group_sizes(ctx.world))
        if top > 1 and base and (top, 1) in timed:
            rows.append(headline("P4", f"Ulysses-{top} efficiency (time on 1 GPU / time on {top} / {top})",
                                 base / timed[(top, 1)] / top, ">= 0.90", shape=label, gpus=top))
        del full, reference
        ctx.free()
    return rows
