"""Part "layer-overhead" (P2): what the layers add to the raw kernel they run.

The raw kernel automatic selection runs (on a Hopper GPU without flash-attn: aten cuDNN),
``LocalAttention`` and ``USPAttention`` after ``init_sequence_parallel(1, 1)``, at a shape where
the host cost could show (B=1, H=12, S=4096, D=128). Calls are interleaved (raw, local, usp, raw,
...) in several rounds; each round gives a ratio layer / raw, and the median round is reported
with the spread. Also the host time to issue one call without waiting for the GPU.
"""

from __future__ import annotations

import torch

import usp_attn
from usp_attn import LocalAttention, USPAttention

from benchmarks.kernel_speed import qkv_sets
from benchmarks.kernels import raw_kernel_of
from benchmarks.suite import Context, headline
from benchmarks.timing import attention_flops, host_issue_time, tflops, time_interleaved

__all__ = ["layer_overhead_part"]

GPU = dict(shape=(1, 12, 4096, 128), dtype=torch.bfloat16, reps=300, rounds=5)
CPU = dict(shape=(1, 2, 256, 64), dtype=torch.bfloat16, reps=5, rounds=2)


def layer_overhead_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    shape = cfg["shape"]
    b, h, s, d = shape
    label = ",".join(map(str, shape))
    sets = qkv_sets(ctx, shape, cfg["dtype"], seed=2)
    kernel, desc = raw_kernel_of(LocalAttention(h, d), *sets[0])
    if kernel is None or kernel.reason(ctx.device):
        raise RuntimeError(f"no raw kernel for the automatic pick {desc}")
    if kernel.mutates_k:
        sets = [(q, k.clone(), v) for q, k, v in sets]
    raw_name = f"raw {kernel.name}"
    usp_attn.init_sequence_parallel(1, 1)  # a 1-rank group (NCCL on CUDA, gloo on CPU)
    try:
        variants = {raw_name: kernel.bind(h, d, scale=d**-0.5, causal=False), "LocalAttention": LocalAttention(h, d),
                    "USPAttention (world 1)": USPAttention(h, d)}
        reps = ctx.reps or cfg["reps"]
        medians: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(cfg["rounds"]):
            timed = time_interleaved({n: (fn, sets) for n, fn in variants.items()}, warmup=max(3, reps // 10),
                                     reps=reps, device=ctx.device)
            for name in variants:
                medians[name].append(timed[name].median)
        host = {n: host_issue_time(fn, sets, calls=min(50, reps), device=ctx.device) for n, fn in variants.items()}
    finally:
        usp_attn.destroy_sequence_parallel()
    flops = attention_flops(b, h, s, s, d)
    rows = []
    for name in variants:
        ratios = sorted(m / r for m, r in zip(medians[name], medians[raw_name]))
        mid = sorted(medians[name])[len(ratios) // 2]
        rows.append({"what": name, "shape": label, "ms": mid * 1e3, "tflops": tflops(flops, mid),
                     "host_us": host[name] * 1e6, "ratio_min": ratios[0], "ratio_max": ratios[-1],
                     "note": f"{cfg['rounds']} rounds of {reps} interleaved calls, {len(sets)} input sets; auto = {desc}"})
        if name != raw_name:
            rows.append(headline("P2", f"{name} time / {raw_name} time", ratios[len(ratios) // 2], "<= 1.03",
                                 shape=label, note=f"rounds {ratios[0]:.3f} ... {ratios[-1]:.3f}"))
    return rows
