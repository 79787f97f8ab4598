"""Part "communication": the layers' transfers against their byte counts and the measured links.

For every group size d > 1 dividing the world (groups side by side): probes with large messages
(``all_to_all_single``, and a P2P ring step in one ``batch_isend_irecv``), then the layers' own
transfers at the attention shape as Ulysses-d / ring-d run them (fused q,k,v all-to-all with its
packing copy, output all-to-all, one ring hop of K and V); once for the world, ``all_reduce`` as
nccl-tests' bus bandwidth 2(N-1)/N x bytes / time. GB/s = bytes each rank sends to other ranks /
time; of_probe: / the same pattern's probe at this d; of_link: / the best probe here.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from usp_attn.ring.exchange import RingExchange
from usp_attn.ulysses.comm import heads_to_sequence, sequence_to_heads

from benchmarks.suite import Context
from benchmarks.timing import time_fn

__all__ = ["communication_part"]

GPU = dict(shape=(1, 40, 75600, 128), dtype=torch.bfloat16, probe_mib=256, warmup=3, reps=20)
CPU = dict(shape=(1, 8, 256, 32), dtype=torch.float32, probe_mib=1, warmup=1, reps=3)
PROBE_OF = {"ulysses q,k,v all-to-all": "probe all_to_all", "ulysses output all-to-all": "probe all_to_all",
            "ring hop (K and V)": "probe p2p ring"}


def _seconds(ctx: Context, cfg: dict, fn) -> float:
    dist.barrier()
    return ctx.max_over_ranks(time_fn(fn, [()], warmup=cfg["warmup"], reps=cfg["reps"], device=ctx.device).median)


def _row(pattern: str, d: int, sent: float, seconds: float, note: str) -> dict:
    return {"what": pattern, "gpus": d, "MiB_sent": sent / 2**20, "ms": seconds * 1e3, "GB/s": sent / seconds / 1e9,
            "note": note}


def _group_rows(ctx: Context, cfg: dict, d: int) -> list[dict]:
    group = mine = None
    for members in (list(range(g, g + d)) for g in range(0, ctx.world, d)):  # every rank makes every group
        made = dist.new_group(members)
        if ctx.rank in members:
            group, mine = made, members
    pos = mine.index(ctx.rank)
    exchange = RingExchange(tuple(mine), pos, group, datetime.timedelta(minutes=2))
    dtype, probe = cfg["dtype"], f"{cfg['probe_mib']} MiB per rank"
    elem = torch.tensor([], dtype=dtype).element_size()
    n = cfg["probe_mib"] * 2**20 // elem // d * d
    src, dst = (torch.randn(n, device=ctx.device).to(dtype) for _ in range(2))

    def hop(*tensors):
        exchange.start(list(tensors), [(t.shape, t.dtype) for t in tensors])
        return exchange.wait()

    rows = [_row("probe all_to_all", d, n * elem * (d - 1) / d,
                 _seconds(ctx, cfg, lambda: dist.all_to_all_single(dst, src, group=group)), probe),
            _row("probe p2p ring", d, n * elem, _seconds(ctx, cfg, lambda: hop(src)), probe)]
    b, h, s, hd = cfg["shape"]
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.rank)
    q, k, v = (torch.randn(b, s // d, h, hd, generator=gen, device=ctx.device).to(dtype) for _ in range(3))
    out = torch.randn(b, s // d * d, h // d, hd, generator=gen, device=ctx.device).to(dtype)
    lengths = (s // d,) * d
    shard = q.numel() * elem
    rows += [_row("ulysses q,k,v all-to-all", d, 3 * shard * (d - 1) / d,
                  _seconds(ctx, cfg, lambda: sequence_to_heads([q, k, v], lengths, group)),
                  f"shards [{b}, {s // d}, {h}, {hd}] x3, packing copy included"),
             _row("ulysses output all-to-all", d, out.numel() * elem * (d - 1) / d,
                  _seconds(ctx, cfg, lambda: heads_to_sequence(out, lengths, pos, group)),
                  f"[{b}, {s // d * d}, {h // d}, {hd}]"),
             _row("ring hop (K and V)", d, 2 * shard, _seconds(ctx, cfg, lambda: hop(k, v)),
                  f"blocks [{b}, {s // d}, {h}, {hd}] x2")]
    dist.destroy_process_group(group)
    return rows


def communication_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    if ctx.world == 1:
        return [{"what": "communication", "note": "skipped: one rank, nothing to measure"}]
    elem = torch.tensor([], dtype=cfg["dtype"]).element_size()
    x = torch.randn(cfg["probe_mib"] * 2**20 // elem, device=ctx.device).to(cfg["dtype"])
    n = ctx.world
    rows = [_row("probe all_reduce (bus bw)", n, 2 * (n - 1) / n * x.numel() * elem,
                 _seconds(ctx, cfg, lambda: dist.all_reduce(x)), f"{cfg['probe_mib']} MiB, whole world")]
    for d in range(2, n + 1):
        if n % d == 0:
            rows += _group_rows(ctx, cfg, d)
    link = max(r["GB/s"] for r in rows if r["what"].startswith("probe"))
    for r in rows:
        probe = next((p for p in rows if p["what"] == PROBE_OF.get(r["what"]) and p["gpus"] == r["gpus"]), None)
        r["of_probe"] = r["GB/s"] / probe["GB/s"] if probe else None
        r["of_link"] = r["GB/s"] / link
    return rows
