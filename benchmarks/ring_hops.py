"""Part "ring-hops" (P3): one rank's ring work on one GPU against one call over all keys.

``usp_attn.ring.forward.ring_attention`` (what ``RingAttention`` runs on each rank) over R contiguous
K/V blocks, fed by ``benchmarks/local_ring.py``'s in-memory exchange instead of the network: the
same attention and merge calls, no communication. Queries: the rank's own S/R rows (the P3 row)
and, for information, all S rows. One call = the automatic pick's raw kernel on the same queries
and all S keys. Timed interleaved (one call, ring, blocks only); blocks only = the R LSE calls
without merging; the unfused-merge variant runs the same ring with the torch-ops merge.
"""

from __future__ import annotations

import torch

from usp_attn import LocalAttention

from benchmarks.kernels import raw_kernel_of
from benchmarks.local_ring import merge_variant, run_local_ring, split_blocks
from benchmarks.suite import Context, headline, short_error, skipped
from benchmarks.kernel_speed import GPU_SHAPES
from benchmarks.timing import attention_flops, plan_reps, random_qkv, tflops, time_interleaved

__all__ = ["ring_hops_part"]

GPU = dict(shapes=GPU_SHAPES[1:4], rings=(2, 4, 8), dtype=torch.bfloat16)  # the Wan shapes
CPU = dict(shapes=[(1, 2, 256, 64)], rings=(2, 4), dtype=torch.bfloat16)


def ring_hops_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    rows = []
    for shape in ctx.shapes or cfg["shapes"]:
        b, h, s, d = shape
        label = ",".join(map(str, shape))
        q, k, v = random_qkv(shape, cfg["dtype"], ctx.device, seed=3)[0]
        attn = LocalAttention(h, d)
        full_kernel, desc = raw_kernel_of(attn, q, k, v)
        attend = attn.attend
        full_fn = full_kernel.bind(h, d, scale=d**-0.5, causal=False)
        for ring in cfg["rings"]:
            if ctx.out_of_time():
                rows.append(skipped(f"ring R={ring}", "time budget spent", shape=label))
                continue
            blocks, lengths = split_blocks(k, v, ring)
            for q_rows in ("per-rank", "all"):
                qr = q[:, : lengths[0]] if q_rows == "per-rank" else q
                what = f"R={ring}, {q_rows} queries ({qr.shape[1]})"
                ring_call = lambda: run_local_ring(attend, qr, blocks, lengths)  # noqa: E731
                trio = {"full": (lambda: full_fn(qr, k, v), [()]), "ring": (ring_call, [()]),
                        "only": (lambda: [attend(qr, kb, vb, return_lse=True) for kb, vb in blocks], [()])}
                try:
                    per_call = ctx.measure(trio["full"][0], [()], target_s=0.05).median
                    reps = 3 if ctx.dry_run else plan_reps(3 * per_call, target_s=2 * ctx.target_s, lo=5, hi=40)
                    t = time_interleaved(trio, warmup=1, reps=reps, device=ctx.device)
                    unfused = None
                    if q_rows == "per-rank":
                        with merge_variant(fused=False):
                            unfused = ctx.measure(ring_call, [()], target_s=0.4 * ctx.target_s).median
                except Exception as exc:
                    rows.append({"what": what, "shape": label, "note": f"error: {short_error(exc)}"})
                    continue
                full, ring_t, only = t["full"].median, t["ring"].median, t["only"].median
                flops = attention_flops(b, h, qr.shape[1], s, d)
                rows.append({"what": what, "shape": label, "one_call_ms": full * 1e3, "ms": ring_t * 1e3,
                             "tflops": tflops(flops, ring_t), "one_call/ring": full / ring_t,
                             "one_call/blocks_only": full / only,
                             "one_call/ring_unfused": None if unfused is None else full / unfused,
                             "note": f"merge+copies {1e3 * (ring_t - only):.3g} ms; one call = raw {full_kernel.name} "
                                     f"({desc})"})
                if q_rows == "per-rank":
                    rows.append(headline("P3", f"one call / ring per-rank work, R={ring}", full / ring_t, ">= 0.95",
                                         shape=label))
        q = k = v = blocks = None
        ctx.free()
    return rows
