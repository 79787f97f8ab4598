"""Issue 5's speed sections: P1 (default choice), P2 (layer overhead), P3 (ring hop efficiency).

Each returns ``{"table": markdown, "data": [...], "summary": [...]}``; see gpu_issue5.py.
"""

from __future__ import annotations

import torch

import usp_attn
from usp_attn import LocalAttention, USPAttention

from benchmarks.issue5_common import Ctx, auto_raw_kernel, measure, short_error
from benchmarks.kernels import RAW_KERNELS, kernel_by_name
from benchmarks.local_ring import merge_variant, run_local_ring, split_blocks
from benchmarks.report import markdown_table
from benchmarks.timing import (
    attention_flops,
    host_issue_time,
    plan_reps,
    random_qkv,
    rotation_count,
    tflops,
    time_interleaved,
)

__all__ = ["p1_default_choice", "p2_layer_overhead", "p3_ring_hops"]


def _sets(ctx: Ctx, shape, seed: int, *, kv_len=None):
    b, h, s, d = shape
    per_set = 3 * b * s * h * d * torch.tensor([], dtype=ctx.dtype).element_size()
    return random_qkv(shape, ctx.dtype, ctx.device, seed=seed, count=rotation_count(per_set, ctx.device), kv_len=kv_len)


def _bhsd_storage(sets):
    """The same values with [B, H, S, D]-contiguous storage, passed as [B, S, H, D] views."""
    return [tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv) for qkv in sets]


def p1_default_choice(ctx: Ctx) -> dict:
    rows, data, summary = [], [], []
    for shape in ctx.config["p1_shapes"]:
        if ctx.over_budget():
            rows.append([str(shape), "-", "-", "-", "-", "skipped: time budget spent"])
            continue
        b, h, s, d = shape
        flops = attention_flops(b, h, s, s, d)
        scale = d**-0.5
        sets = _sets(ctx, shape, seed=1)
        results: dict[str, float] = {}

        def record(name, fn, arg_sets, note=""):
            try:
                timing = measure(ctx, fn, arg_sets)
                tf = tflops(flops, timing.median)
                results[name] = tf
                rows.append([str(shape), name, timing.median * 1e3, tf, len(timing.times), note])
                data.append(dict(shape=shape, impl=name, tflops=tf, note=note, **timing.to_dict()))
            except Exception as exc:
                rows.append([str(shape), name, None, None, 0, f"error: {short_error(exc)}"])
                data.append(dict(shape=shape, impl=name, error=short_error(exc, 2000)))

        for kernel in RAW_KERNELS:
            reason = kernel.reason(ctx.device)
            if reason:
                rows.append([str(shape), kernel.name, None, None, 0, f"skipped: {reason}"])
                continue
            arg_sets = sets
            if kernel.mutates_k:  # Sage 1 smooths k in place: give it k of its own
                arg_sets = [(q, k.clone(), v) for q, k, v in sets]
            record(kernel.name, lambda q, k, v, kern=kernel: kern.call(q, k, v, scale=scale), arg_sets)
            del arg_sets
        if not kernel_by_name("cudnn").reason(ctx.device):
            bhsd = _bhsd_storage(sets)
            record("cudnn, BHSD-contiguous inputs", lambda q, k, v: kernel_by_name("cudnn").call(q, k, v, scale=scale),
                   bhsd, "same kernel; inputs stored [B,H,S,D]")
            del bhsd
        layer = LocalAttention(h, d)
        backend, _, desc = auto_raw_kernel(ctx.device, ctx.dtype, d)
        record("LocalAttention (auto)", layer, sets, f"picks {desc}")
        # The fastest kernel on the layer's own input layout ([B, S, H, D] storage, as DiT blocks give it).
        raw = {k: v for k, v in results.items() if not k.startswith("LocalAttention") and "BHSD" not in k}
        if raw and "LocalAttention (auto)" in results:
            # Head to head, call by call in turn, so drift hits both alike.
            best = max(raw, key=raw.get)
            kern = kernel_by_name(best)
            arg_sets = sets if not kern.mutates_k else [(q, k.clone(), v) for q, k, v in sets]
            reps = 3 if ctx.smoke else plan_reps(flops / (raw[best] * 1e12), target_s=2 * ctx.config["target_s"],
                                                  lo=5, hi=60)
            pair = time_interleaved({"fastest": (lambda q, k, v: kern.call(q, k, v, scale=scale), arg_sets),
                                     "auto": (layer, sets)}, warmup=2, reps=reps, device=ctx.device)
            ratio = pair["fastest"].median / pair["auto"].median
            rows.append([str(shape), f"head to head: LocalAttention (auto) vs {best}, interleaved",
                         pair["auto"].median * 1e3, tflops(flops, pair["auto"].median), reps,
                         f"ratio {ratio:.3f} ({best} {tflops(flops, pair['fastest'].median):.0f} TFLOP/s)"])
            summary.append(dict(row="P1", shape=shape, fastest=best, fastest_tflops=raw[best], auto_backend=desc,
                                auto_tflops=results["LocalAttention (auto)"], ratio=ratio,
                                ratio_separate_runs=results["LocalAttention (auto)"] / raw[best], target=">= 0.97"))
        del sets
        torch.cuda.empty_cache() if ctx.device.type == "cuda" else None
    table = markdown_table(["shape (B,H,S,D)", "kernel", "median ms", "TFLOP/s", "reps", "note"], rows)
    return {"table": table, "data": data, "summary": summary}


def p2_layer_overhead(ctx: Ctx) -> dict:
    shape = ctx.config["p2_shape"]
    b, h, s, d = shape
    scale = d**-0.5
    sets = _sets(ctx, shape, seed=2)
    backend, kernel, desc = auto_raw_kernel(ctx.device, ctx.dtype, d)
    if kernel is None or kernel.reason(ctx.device):
        raise RuntimeError(f"no raw kernel for the automatic pick {desc}")
    if kernel.mutates_k:
        sets = [(q, k.clone(), v) for q, k, v in sets]
    local = LocalAttention(h, d)
    usp_attn.init_sequence_parallel(1, 1)  # a 1-rank group (NCCL on CUDA, gloo on CPU)
    try:
        usp = USPAttention(h, d)
        variants = {
            f"raw {kernel.name}": lambda q, k, v: kernel.call(q, k, v, scale=scale),
            "LocalAttention": local,
            "USPAttention (world 1)": usp,
        }
        reps = ctx.config["p2_reps"]
        medians: dict[str, list[float]] = {name: [] for name in variants}
        hosts: dict[str, float] = {}
        for _round in range(ctx.config.get("p2_rounds", 5)):  # interleaved call by call; rounds show the noise
            timed = time_interleaved({name: (fn, sets) for name, fn in variants.items()},
                                     warmup=max(3, reps // 10), reps=reps, device=ctx.device)
            for name in variants:
                medians[name].append(timed[name].median)
        for name, fn in variants.items():
            hosts[name] = host_issue_time(fn, sets, calls=min(50, reps), device=ctx.device)
        flops = attention_flops(b, h, s, s, d)
        raw_name = f"raw {kernel.name}"
        rows, summary = [], []
        for name in variants:
            ratio = sorted(m / r for m, r in zip(medians[name], medians[raw_name]))
            mid = ratio[len(ratio) // 2]
            rows.append([name, medians[name][0] * 1e6, sorted(medians[name])[len(ratio) // 2] * 1e6,
                         tflops(flops, min(medians[name])), hosts[name] * 1e6, ratio[0], mid])
            if name != raw_name:
                summary.append(dict(row="P2", shape=shape, impl=name, raw=raw_name, ratio=mid,
                                    ratio_min=ratio[0], ratio_max=ratio[-1], target="<= 1.03"))
    finally:
        usp_attn.destroy_sequence_parallel()
    table = markdown_table(["variant", "median µs (round 1)", "median µs (median round)", "TFLOP/s",
                            "host µs/call", "ratio to raw (best round)", "ratio to raw (median round)"], rows)
    note = (f"\nshape {shape}, {str(ctx.dtype).replace('torch.', '')}, auto = {desc}, {reps} calls per round, "
            f"{len(sets)} rotating input sets; host µs/call = time to issue one call without waiting for the GPU.")
    return {"table": table + note, "data": {"medians": medians, "host": hosts}, "summary": summary}


def p3_ring_hops(ctx: Ctx) -> dict:
    rows, data, summary = [], [], []
    _, full_kernel, desc = auto_raw_kernel(ctx.device, ctx.dtype, ctx.config["p3_shapes"][0][3])
    for shape in ctx.config["p3_shapes"]:
        b, h, s, d = shape
        q, k, v = random_qkv(shape, ctx.dtype, ctx.device, seed=3)[0]
        attend = LocalAttention(h, d).attend
        scale = d**-0.5
        for ring in ctx.config["ring_sizes"]:
            if ctx.over_budget():
                rows.append([str(shape), ring, "-", None, None, None, None, None, None, "skipped: time budget spent"])
                continue
            blocks, lengths = split_blocks(k, v, ring)
            for q_rows in ("per-rank", "all"):
                qr = q[:, : lengths[0]] if q_rows == "per-rank" else q
                try:
                    trio = {
                        "full": (lambda: full_kernel.call(qr, k, v, scale=scale), [()]),
                        "ring": (lambda: run_local_ring(attend, qr, blocks, lengths), [()]),
                        "only": (lambda: [attend(qr, blk[0], blk[1], return_lse=True) for blk in blocks], [()]),
                    }
                    per_call = measure(ctx, trio["full"][0], [()], target_s=0.05).median
                    reps = 3 if ctx.smoke else plan_reps(3 * per_call, target_s=2.0, lo=5, hi=40)
                    timed = time_interleaved(trio, warmup=1, reps=reps, device=ctx.device)
                    full, ring_t, only = timed["full"], timed["ring"], timed["only"]
                except Exception as exc:
                    rows.append([str(shape), ring, q_rows, None, None, None, None, None, None,
                                 f"error: {short_error(exc)}"])
                    continue
                unfused = None
                if q_rows == "per-rank":
                    try:
                        with merge_variant(fused=False):
                            unfused = measure(ctx, lambda: run_local_ring(attend, qr, blocks, lengths), [()],
                                              target_s=0.8).median
                    except Exception as exc:
                        unfused = None
                        print(f"p3: unfused-merge variant failed: {short_error(exc)}", flush=True)
                flops = attention_flops(b, h, qr.shape[1], s, d)
                ratio = full.median / ring_t.median
                rows.append([str(shape), ring, f"{q_rows} ({qr.shape[1]})", full.median * 1e3, ring_t.median * 1e3,
                             tflops(flops, ring_t.median), ratio, full.median / only.median,
                             None if unfused is None else full.median / unfused,
                             f"merge+copies {1e3 * (ring_t.median - only.median):.3g} ms"])
                data.append(dict(shape=shape, ring=ring, q_rows=q_rows, full=full.to_dict(), ring_=ring_t.to_dict(),
                                 blocks_only=only.to_dict()))
                if q_rows == "per-rank":
                    summary.append(dict(row="P3", shape=shape, ring=ring, ratio=ratio, target=">= 0.95",
                                        ring_tflops=tflops(flops, ring_t.median)))
    table = markdown_table(["shape (B,H,S,D)", "R", "queries", "one call ms", "ring ms", "ring TFLOP/s",
                            "one call / ring", "one call / blocks only", "one call / ring (unfused merge)", "note"],
                           rows)
    note = (f"\none call = raw {full_kernel.name} (the automatic pick, {desc}) of the same queries over all S keys; "
            "ring = usp_attn.layers.ring.ring_attention over R contiguous K/V blocks with the in-memory "
            "exchange (R attention calls with LSE + the fp32 merge); blocks only = the R LSE calls without merging; "
            "unfused merge = the same ring with the torch-ops merge instead of the fused Triton kernel.")
    return {"table": table + note, "data": data, "summary": summary}
