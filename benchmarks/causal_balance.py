"""Causal ring attention with contiguous vs load-balanced (zigzag) shards: every rank's work, on one GPU.

A causal ring is as fast as its slowest rank. With contiguous shards ring rank r attends r
earlier blocks in full plus its diagonal block, so the last rank does ~(2R-1)/R times the mean
work; with ``shard_sequence(..., load_balance=True)`` (usp_attn/distributed/zigzag.py) every
rank does the same.

For each shape ``(B, H, S, D)``, ring degree R and layout, every ring rank's forward is run on
this one GPU: ``usp_attn.ring.forward.ring_attention`` (exactly what ``RingAttention`` runs per
rank, with the layout's per-hop kernel calls from ``usp_attn.ring.plan``) over the
rank's queries, with the other ranks' K/V blocks handed over from memory instead of received
(no communication). Every call uses one kernel, chosen once per (shape, R) like the layer does.
Columns per (shape, R, layout):

    rank_ms           median ms of each ring rank's forward
    slowest_ms        the largest: the ring's compute time per layer call
    imbalance         slowest / mean of the ranks
    ideal_ms          one causal kernel call over the whole sequence / R
    efficiency        ideal_ms / slowest_ms (1.0: the split costs nothing)
    speedup           contiguous slowest_ms / this layout's slowest_ms
    pairs_imbalance   the same ratio for the (query, key) pairs each rank attends (counted)
    out_rel_err       every rank's rows put together vs the full causal call (bf16 ~1e-2)

    python3 benchmarks/run.py --parts causal-balance --json causal_balance.json   # one GPU: the Wan shapes
    python3 benchmarks/run.py --parts causal-balance --dry-run                      # CPU, a tiny shape
"""

from __future__ import annotations

import functools
import statistics

import torch

from benchmarks.local_ring import LocalRingExchange
from benchmarks.suite import Context
from benchmarks.timing import time_interleaved
from usp_attn import LocalAttention
from usp_attn.distributed.state import shard_sizes
from usp_attn.distributed.zigzag import rank_chunks, shard_zigzag, to_global_order, zigzag_sizes
from usp_attn.ring.plan import ring_front_lengths
from usp_attn.ring.forward import ring_attention
from usp_attn.ring.plan import RingLayout, pairs_attended

WAN_SHAPES = [(1, 12, 32760, 128), (1, 40, 75600, 128)]  # Wan 1.3B 480p, Wan 14B 720p
DRY_SHAPES = [(1, 2, 200, 16)]
RING_DEGREES = (2, 4)
LAYOUTS = ("contiguous", "zigzag")


def _split(x: torch.Tensor, ring: int, layout: str) -> list[torch.Tensor]:
    """Every ring rank's rows of ``x [B, S, ...]`` (U = 1: ring rank = SP rank)."""
    if layout == "zigzag":
        return [shard_zigzag(x, 1, ring, r).contiguous() for r in range(ring)]
    return [t.contiguous() for t in torch.tensor_split(x, ring, dim=1)]


def causal_balance_rows(shapes, rings, device, dtype, *, warmup: int, reps: int) -> list[dict]:
    """One row per (shape, R, layout); see the module doc for the columns."""
    rows = []
    for b, h, s, d in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
        attn = LocalAttention(h, d, causal=True)
        with torch.no_grad():
            full_kernel = attn.kernel_for(q, k, v, causal=True, need_lse=True)
            full = functools.partial(attn.attend, q, k, v, causal=True, return_lse=True, kernel=full_kernel)
            full_ms = _median_ms({"full": full}, device, warmup=warmup, reps=reps)["full"]
            want = full()[0].float()
            for ring in rings:
                rows += _ring_rows(attn, (q, k, v), want, full_ms, ring, device, warmup=warmup, reps=reps)
    return rows


def _ring_rows(attn, qkv, want, full_ms, ring, device, *, warmup, reps) -> list[dict]:
    q, k, v = qkv
    b, s, h, d = q.shape
    setups = {}
    for layout in LAYOUTS:
        qs, ks, vs = (_split(t, ring, layout) for t in (q, k, v))
        lengths = tuple(t.shape[1] for t in ks)
        assert lengths == (zigzag_sizes(s, ring) if layout == "zigzag" else shard_sizes(s, ring))
        fronts = ring_front_lengths(s, 1, ring) if layout == "zigzag" else None
        setups[layout] = (qs, list(zip(ks, vs)), lengths, fronts)
    # One kernel for every block call of this R, as the layer chooses it (class of the longest block).
    longest = max(setups["contiguous"][2])
    q0, (k0, v0) = setups["contiguous"][0][0], setups["contiguous"][1][0]
    kernel = attn.kernel_for(q0, k0, v0, causal=True, need_lse=True, lengths=(longest, longest))
    attend = functools.partial(attn.attend, kernel=kernel)

    def rank_call(layout, r):
        qs, blocks, lengths, fronts = setups[layout]

        def call():  # a fresh exchange per call: it walks the ring from this rank's own block
            exchange = LocalRingExchange(blocks, r) if ring > 1 else None
            return ring_attention(attend, qs[r], *blocks[r], exchange=exchange, ring_rank=r, block_lengths=lengths,
                                  causal=True, front_lengths=fronts)

        return call

    calls = {(layout, r): rank_call(layout, r) for layout in LAYOUTS for r in range(ring)}
    ms = _median_ms(calls, device, warmup=warmup, reps=reps)
    rows, slowest_contiguous = [], max(ms[("contiguous", r)] for r in range(ring))
    for layout in LAYOUTS:
        qs, blocks, lengths, fronts = setups[layout]
        rank_ms = [ms[(layout, r)] for r in range(ring)]
        out = torch.cat([calls[(layout, r)]().float() for r in range(ring)], dim=1)
        if layout == "zigzag":
            out = to_global_order(out, [rank_chunks(s, ring, r) for r in range(ring)], dim=1)
        plan = RingLayout(lengths, True, fronts)
        pairs = [pairs_attended(plan, r, lengths[r]) for r in range(ring)]
        slowest, ideal = max(rank_ms), full_ms / ring
        rows.append({
            "shape": f"{b},{h},{s},{d}", "dtype": str(q.dtype).replace("torch.", ""), "ring_degree": ring,
            "layout": layout, "kernel": f"{kernel[0].backend}/{kernel[0].kernel or 'default'}",
            "rank_ms": [round(t, 3) for t in rank_ms], "slowest_ms": round(slowest, 3),
            "imbalance": round(slowest / statistics.mean(rank_ms), 3), "ideal_ms": round(ideal, 3),
            "efficiency": round(ideal / slowest, 3), "speedup": round(slowest_contiguous / slowest, 3),
            "pairs_imbalance": round(max(pairs) / statistics.mean(pairs), 4),
            "out_rel_err": float((out - want).abs().max() / want.abs().max()),
        })
    return rows


def _median_ms(calls: dict, device, *, warmup: int, reps: int) -> dict:
    """Median ms of each no-argument call, the calls interleaved round by round (drift hits all alike)."""
    timings = time_interleaved({n: (fn, [()]) for n, fn in calls.items()}, warmup=warmup, reps=reps, device=device)
    return {n: t.median * 1e3 for n, t in timings.items()}


def causal_balance_part(ctx: Context) -> list[dict]:
    size = ctx.sizes(dict(shapes=WAN_SHAPES, dtype=torch.bfloat16, warmup=2, reps=10),
                     dict(shapes=DRY_SHAPES, dtype=torch.float32, warmup=1, reps=2))
    with torch.no_grad():
        return causal_balance_rows(ctx.shapes or size["shapes"], RING_DEGREES, ctx.device, size["dtype"],
                                   warmup=size["warmup"], reps=ctx.reps or size["reps"])
