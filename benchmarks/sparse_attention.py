"""Part "sparse": sliding-tile sparse attention against dense attention, on one GPU.

Rows, at the Wan 14B 720p grid (21 x 45 x 80 = 75,600 tokens, H 40) and the HunyuanVideo 720p grid
(33 x 45 x 80 = 118,800 tokens, H 24), D 128, bf16, tiles (4, 4, 8) = 128 tokens:

* ``LocalAttention(sparsity=SlidingTileSparsity(...))`` with windows keeping about 25 % and about
  12.5 % of the (query, key) pairs, against ``LocalAttention`` dense (the automatic pick, FA4 on an
  H200), timed interleaved. Everything included: the tokens come in row-major order and the timed
  call reorders q, k, v to tile-major order and the output back; the block tensors come from the
  cache after the first call. The grid is not a multiple of the tile, so the edge tiles' blocks are
  only partly kept and FA4 masks them token by token.
* Per-rank work emulated on one GPU: Ulysses-8 (H / 8 heads, every token) and ring-2 / ring-4
  (the rank's S / R queries against each hop's S / R keys, a hop without kept pairs skipped),
  sparse and dense, and the sparse speed-up kept relative to one GPU's.

Part "sparse-sp" (under torchrun, N ranks): ``USPAttention`` sparse vs dense in every layout U x R = N at
the Wan 14B 720p grid, with all its transfers; the tokens in tile-major order and sharded on 128-token
blocks (``shard_sequence(..., align=128)``). Each rank also times the one-GPU speed-up on its own GPU
(``LocalAttention`` on the whole sequence), so S2 is the measured ratio, not an emulation.
"""

from __future__ import annotations

import torch

import usp_attn
from usp_attn import LocalAttention
from usp_attn.sparse import SlidingTileSparsity, VideoGrid, tile_major_inverse_permutation, tile_major_permutation
from usp_attn.distributed.state import shard_sizes
from usp_attn.sparse.attend import attend_sparse, block_plan

from benchmarks.suite import (Context, headline, layout_name, layouts_of, rel_err, sequence_parallel, short_error,
                              skipped)
from benchmarks.timing import plan_reps, time_interleaved

__all__ = ["sparse_part", "sparse_sp_part", "windows_for"]

TILE = (4, 4, 8)
GPU = dict(models=[("Wan 14B 720p", (21, 45, 80), 40), ("HunyuanVideo 720p", (33, 45, 80), 24)],
           densities=(0.25, 0.125), dtype=torch.bfloat16, ulysses=8, rings=(2, 4))
CPU = dict(models=[("toy", (5, 6, 16), 4)], densities=(0.25,), dtype=torch.float32, ulysses=2, rings=(2,))


def windows_for(grid: VideoGrid, tile, density: float) -> tuple[tuple[int, int, int], float]:
    """The window whose density is closest to ``density`` (exact densities, small search)."""
    n = [-(-s // t) for s, t in zip(grid.shape, tile)]
    best = None
    for wf in range(1, n[0] + 1):
        for wh in range(1, n[1] + 1):
            for ww in range(1, n[2] + 1):
                d = SlidingTileSparsity(grid, tile, (wf, wh, ww)).density()
                if best is None or abs(d - density) < abs(best[1] - density):
                    best = ((wf, wh, ww), d)
    return best


def sparse_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    rows = []
    for model, dims, heads in cfg["models"]:
        grid = VideoGrid(*dims)
        s, d = grid.num_tokens, 128 if ctx.cuda else 32
        gen = torch.Generator(device=ctx.device).manual_seed(5)
        q, k, v = (torch.randn(1, s, heads, d, generator=gen, device=ctx.device, dtype=cfg["dtype"]) for _ in range(3))
        perm = tile_major_permutation(grid, TILE, device=ctx.device)
        inv = tile_major_inverse_permutation(grid, TILE, device=ctx.device)
        layer = LocalAttention(heads, d)
        label = f"1,{heads},{s},{d}"
        for target in cfg["densities"]:
            if ctx.out_of_time():
                rows.append(skipped(f"{model} sparse {target:.3g}", "time budget spent", shape=label))
                continue
            window, density = windows_for(grid, TILE, target)
            pattern = SlidingTileSparsity(grid, TILE, window, token_order="tile_major")

            def sparse_call():  # row-major tokens in and out: the reorder is part of the cost
                out = layer(q[:, perm], k[:, perm], v[:, perm], sparsity=pattern)
                return out[:, inv]

            try:
                with torch.no_grad():
                    sparse_call()  # compile and cache the block tensors
                    per_call = ctx.measure(lambda: layer(q, k, v), [()], target_s=0.05).median
                    reps = 3 if ctx.dry_run else plan_reps(2 * per_call, target_s=2 * ctx.target_s, lo=5, hi=30)
                    t = time_interleaved({"dense": (lambda: layer(q, k, v), [()]), "sparse": (sparse_call, [()])},
                                         warmup=1, reps=reps, device=ctx.device)
            except Exception as exc:
                rows.append({"what": f"{model} sliding tile {window}", "shape": label, "note": f"error: {short_error(exc)}"})
                continue
            speedup = t["dense"].median / t["sparse"].median
            rows.append({"what": f"{model} sliding tile {TILE} window {window}", "shape": label,
                         "density": density, "dense_ms": t["dense"].median * 1e3, "ms": t["sparse"].median * 1e3,
                         "speedup": speedup, "backend": str(layer.backend),
                         "note": "row-major in and out (reorder timed); edge tiles masked in-kernel"})
            goal = 3.0 if target >= 0.2 else 5.0
            rows.append(headline("S1", f"{model}: sparse {density:.1%} vs dense", speedup, f">= {goal:g}",
                                 shape=label))
            rows.extend(_per_rank(ctx, cfg, model, layer, pattern, q[:, perm], k[:, perm], v[:, perm], speedup, label))
        q = k = v = None
        ctx.free()
    return rows


def _per_rank(ctx, cfg, model, layer, pattern, q, k, v, one_gpu, label) -> list[dict]:
    """One rank's sparse and dense work under Ulysses-U and ring-R, emulated on this GPU."""
    s, heads, d = q.shape[1], q.shape[2], q.shape[3]
    out = []
    u = cfg["ulysses"]
    cases = [(f"Ulysses-{u}", q[:, :, : heads // u], k[:, :, : heads // u], v[:, :, : heads // u], 1)]
    cases += [(f"ring-{r}", q, k, v, r) for r in cfg["rings"]]
    for name, qh, kh, vh, ring in cases:
        if ctx.out_of_time():
            out.append(skipped(f"{model} {name}", "time budget spent", shape=label))
            continue
        h = qh.shape[2]
        heads_of = tuple(range(h))
        sizes = shard_sizes(s, ring, 128)  # shard_sequence(..., align=128): every hop's blocks start whole
        spans = [(sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(ring)]
        mine = max(spans, key=lambda m: _kept_blocks(pattern, m, spans, heads_of, q.device))  # the slowest rank
        block = layer._block_kernel(qh, kh, vh)
        local = LocalAttention(h, d)
        nothing = (0, 0)

        def sparse_rank():
            results = []
            for span in spans:
                if ring > 1 and block_plan(pattern, mine, span, heads_of, q.device).empty:
                    continue
                results.append(attend_sparse(local._attend_lse, qh[:, mine[0] : mine[1]], kh[:, span[0] : span[1]],
                                             vh[:, span[0] : span[1]], pattern, q_text=nothing, k_text=nothing,
                                             q_range=mine, k_range=span, heads=heads_of, scale=d**-0.5,
                                             block_kernel=block))
            return results

        def dense_rank():
            return local(qh[:, mine[0] : mine[1]], kh, vh)

        try:
            with torch.no_grad():
                sparse_rank()
                reps = 3 if ctx.dry_run else 10
                t = time_interleaved({"dense": (dense_rank, [()]), "sparse": (sparse_rank, [()])}, warmup=1, reps=reps,
                                     device=ctx.device)
        except Exception as exc:
            out.append({"what": f"{model} {name} per-rank", "shape": label, "note": f"error: {short_error(exc)}"})
            continue
        speedup = t["dense"].median / t["sparse"].median
        hops = sum(not block_plan(pattern, mine, span, heads_of, q.device).empty for span in spans)
        out.append({"what": f"{model} {name} per-rank work", "shape": label, "dense_ms": t["dense"].median * 1e3,
                    "ms": t["sparse"].median * 1e3, "speedup": speedup, "kept_of_one_gpu": speedup / one_gpu,
                    "note": f"the busiest rank; {hops} of {len(spans)} hops with kept pairs" if ring > 1
                    else "one rank's heads"})
        out.append(headline("S2", f"{model} {name}: per-rank sparse speed-up / one GPU's", speedup / one_gpu,
                            ">= 0.9", shape=label))
    return out


def _kept_blocks(pattern, mine, spans, heads, device) -> int:
    total = 0
    for span in spans:
        plan = block_plan(pattern, mine, span, heads, device)
        total += int(plan.full_cnt.sum()) + (0 if plan.partial_cnt is None else int(plan.partial_cnt.sum()))
    return total


SP_GPU = dict(models=[("Wan 14B 720p", (21, 45, 80), 40)], densities=(0.25, 0.125), dtype=torch.bfloat16, align=128,
              reps=10)
SP_CPU = dict(models=[("toy", (5, 6, 16), 4)], densities=(0.25,), dtype=torch.float32, align=16, reps=3)


def sparse_sp_part(ctx: Context) -> list[dict]:
    """USPAttention sparse vs dense in every layout of the world (see the module doc)."""
    if ctx.world == 1:
        return [skipped("sparse under sequence parallelism", "needs torchrun with 2 or more ranks")]
    cfg = ctx.sizes(SP_GPU, SP_CPU)
    rows = []
    for model, dims, heads in cfg["models"]:
        grid = VideoGrid(*dims)
        s, d = grid.num_tokens, 128 if ctx.cuda else 32
        gen = torch.Generator(device=ctx.device).manual_seed(5)  # the same sequence on every rank
        perm = tile_major_permutation(grid, TILE, device=ctx.device)
        q, k, v = (torch.randn(1, s, heads, d, generator=gen, device=ctx.device, dtype=cfg["dtype"])[:, perm]
                   for _ in range(3))
        label = f"1,{heads},{s},{d}"
        local = LocalAttention(heads, d)
        for target in cfg["densities"]:
            window, density = windows_for(grid, TILE, target)
            pattern = SlidingTileSparsity(grid, TILE, window, token_order="tile_major")
            if ctx.out_of_time():
                rows.append(skipped(f"{model} sparse {density:.1%}", "time budget spent", shape=label))
                continue
            with torch.no_grad():
                whole = local(q, k, v, sparsity=pattern)  # also the reference of the layouts' outputs
                t = time_interleaved({"dense": (lambda: local(q, k, v), [()]),
                                      "sparse": (lambda: local(q, k, v, sparsity=pattern), [()])},
                                     warmup=1, reps=cfg["reps"], device=ctx.device)
            one_gpu = ctx.max_over_ranks(t["dense"].median) / ctx.max_over_ranks(t["sparse"].median)
            for u, r in layouts_of(ctx.world):
                row = {"what": f"{model} {layout_name(u, r)} sparse {density:.1%}", "shape": label,
                       "layout": layout_name(u, r), "gpus": ctx.world, "density": density}
                if ctx.out_of_time():
                    rows.append(skipped(row.pop("what"), "time budget spent", **row))
                    continue
                with sequence_parallel(ctx, u, r) as state:
                    try:
                        layer = usp_attn.USPAttention(heads, d)
                        shards = [usp_attn.shard_sequence(x, align=cfg["align"]) for x in (q, k, v)]
                        with torch.no_grad():
                            out = layer(*shards, sparsity=pattern)
                            err = ctx.max_over_ranks(rel_err(usp_attn.gather_sequence(out), whole))
                            t = time_interleaved({"dense": (lambda: layer(*shards), [()]),
                                                  "sparse": (lambda: layer(*shards, sparsity=pattern), [()])},
                                                 warmup=1, reps=cfg["reps"], device=ctx.device)
                        dense_s, sparse_s = (ctx.max_over_ranks(t[n].median) for n in ("dense", "sparse"))
                    except Exception as exc:
                        rows.append({**row, "backend": str(state.backend), "note": f"error: {short_error(exc)}"})
                        continue
                speedup = dense_s / sparse_s
                rows.append({**row, "dense_ms": dense_s * 1e3, "ms": sparse_s * 1e3, "speedup": speedup,
                             "kept_of_one_gpu": speedup / one_gpu, "rel_err": err,
                             "note": f"one GPU's sparse speed-up {one_gpu:.2f}x; the slowest rank's times"})
                rows.append(headline("S2", f"{model} {layout_name(u, r)}: sparse speed-up / one GPU's",
                                     speedup / one_gpu, ">= 0.9", shape=label))
        q = k = v = None
        ctx.free()
    return rows
