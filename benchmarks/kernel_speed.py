"""Part "kernels": every attention candidate's speed, and the layer against the fastest kernel (P1).

Per shape: each available candidate of ``benchmarks.kernels.CANDIDATES`` on the layer's own input
layout (``[B, S, H, D]`` storage, as DiT blocks give it). Then P1: each layer candidate (``LocalAttention (auto)``) and the fastest
*exact* raw kernel timed head to head, call by call in turn, so drift hits both alike;
ratio = layer TFLOP/s / kernel TFLOP/s.
"""

from __future__ import annotations

import torch

from benchmarks.kernels import CANDIDATES, by_name
from benchmarks.suite import Context, headline, short_error, skipped
from benchmarks.timing import attention_flops, plan_reps, random_qkv, rotation_count, tflops, time_interleaved

__all__ = ["kernels_part", "crossover_part", "GPU_SHAPES", "qkv_sets"]

#: (B, H, S, D), bf16: Flux 1024², Wan 2.1 1.3B 480p, 14B 480p, 14B 720p, HunyuanVideo 720p, CogVideoX 5B
GPU_SHAPES = [(1, 24, 4608, 128), (1, 12, 32760, 128), (1, 40, 32760, 128), (1, 40, 75600, 128),
              (1, 24, 118800, 128), (1, 48, 17776, 64)]
GPU = dict(shapes=GPU_SHAPES, dtype=torch.bfloat16)
CPU = dict(shapes=[(1, 2, 256, 64), (1, 3, 200, 64)], dtype=torch.bfloat16)


def qkv_sets(ctx: Context, shape, dtype, seed: int, *, per_rank: int = 1):
    """Random q, k, v sets ``[B, S, H, D]``, enough of them to cycle past the L2 cache."""
    b, h, s, d = shape
    per_set = 3 * b * s * h * d * torch.tensor([], dtype=dtype).element_size() // per_rank
    return random_qkv(shape, dtype, ctx.device, seed=seed, count=rotation_count(per_set, ctx.device))


def kernels_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    rows = []
    for shape in ctx.shapes or cfg["shapes"]:
        label = ",".join(map(str, shape))
        if ctx.out_of_time():
            rows.append(skipped("all candidates", "time budget spent", shape=label))
            continue
        b, h, s, d = shape
        flops = attention_flops(b, h, s, s, d)
        sets = qkv_sets(ctx, shape, cfg["dtype"], seed=1)
        calls, speed = {}, {}
        for cand in CANDIDATES:
            reason = cand.reason(ctx.device)
            if reason:
                rows.append(skipped(cand.name, reason, shape=label))
                continue
            try:
                fn = cand.bind(h, d, scale=d**-0.5, causal=False)
                arg_sets = [(q, k.clone(), v) for q, k, v in sets] if cand.mutates_k else sets
                timing = ctx.measure(fn, arg_sets)
            except Exception as exc:  # a kernel failing at this shape is a result, not a crash
                rows.append({"what": cand.name, "shape": label, "note": f"error: {short_error(exc)}"})
                continue
            calls[cand.name], speed[cand.name] = (fn, arg_sets), tflops(flops, timing.median)
            rows.append({"what": cand.name, "shape": label, "ms": timing.median * 1e3, "tflops": speed[cand.name],
                         "note": f"{len(timing.times)} reps"})
        exact = {c.name: speed[c.name] for c in CANDIDATES if c.name in speed and c.exact and not c.layer}
        for cand in (c for c in CANDIDATES if c.layer and c.name in speed):
            if not exact:
                break
            best = max(exact, key=exact.get)
            reps = 3 if ctx.dry_run else plan_reps(flops / (exact[best] * 1e12), target_s=2 * ctx.target_s, lo=5, hi=60)
            pair = time_interleaved({"kernel": calls[best], "layer": calls[cand.name]}, warmup=2, reps=reps,
                                    device=ctx.device)
            ratio = pair["kernel"].median / pair["layer"].median
            rows.append(headline("P1", f"{cand.name} / fastest exact kernel ({best}), interleaved", ratio, ">= 0.97",
                                 shape=label, tflops=tflops(flops, pair["layer"].median),
                                 note=f"{best} {tflops(flops, pair['kernel'].median):.3g} TFLOP/s; {reps} pairs"))
        del sets, calls
        ctx.free()
    return rows


#: the static rule's sweep: keys per call x (D, H), the two kernels it chooses between on Hopper
CROSSOVER_KEYS = (1024, 2048, 3072, 4096, 5120, 6144, 8192, 12288)
CROSSOVER_PAIR = ("cudnn", "fa4 (flash_attn.cute)")


def crossover_part(ctx: Context) -> list[dict]:
    """FA4 against cuDNN, interleaved call by call, over the number of keys: where the static rule
    (``usp_attn.selector.fa_min_keys_hopper``) switches. On CPU: the CPU kernel against itself."""
    pair = CROSSOVER_PAIR if ctx.cuda else ("cpu flash (aten)", "cpu flash (aten)")
    keys = CROSSOVER_KEYS if ctx.cuda else (64, 128)
    rows = []
    for d, h in ((128, 24), (64, 48)) if ctx.cuda else ((64, 2),):
        for s in keys:
            label, flops = f"1,{h},{s},{d}", attention_flops(1, h, s, s, d)
            missing = [n for n in pair if by_name(n).reason(ctx.device)]
            if missing:
                rows.append(skipped(" vs ".join(pair), by_name(missing[0]).reason(ctx.device), shape=label))
                continue
            sets = qkv_sets(ctx, (1, h, s, d), ctx.dtype or torch.bfloat16, seed=4)
            calls = {n: (by_name(n).bind(h, d, scale=d**-0.5, causal=False), sets) for n in dict.fromkeys(pair)}
            reps = ctx.reps or (3 if ctx.dry_run else 200 if s <= 4096 else 60)
            timed = time_interleaved(calls, warmup=10, reps=reps, device=ctx.device)
            speed = {n: tflops(flops, timed[n].median) for n in calls}
            rows.append({"what": f"{pair[1]} vs {pair[0]}", "shape": label, f"{pair[0]} tflops": speed[pair[0]],
                         f"{pair[1]} tflops": speed[pair[1]], "speed ratio": speed[pair[1]] / speed[pair[0]]})
    return rows
