"""Part "layout": the layout cost model's kernel terms measured on this GPU, and its predictions.

For each model shape (Wan 1.3B 480p, Wan 14B 720p, HunyuanVideo 720p; usp_attn.layout.MODELS):

1. the kernel terms (``usp_attn.layout.measure_terms``): the kernel that ``LocalAttention``'s
   automatic choice runs, timed at the key lengths the candidates of 2, 4 and 8 GPUs call it with
   (S, S/2, S/4, S/8), with and without the LSE, plus one tiny call for the launch cost;
2. a check of the curve: the kernel timed at each 8-GPU candidate's own per-rank call (its local
   heads over its ring segment) against what the curve predicts for it (``curve_ratio`` =
   measured / predicted: the error of taking efficiency as a function of the key length only);
3. the predicted time per attention call and per step of every (cfg, U, R) layout of 2, 4 and 8
   GPUs (links assumed: one GPU cannot measure them), the pick marked;
4. the same for 2 nodes x 8 GPUs (Wan 14B 720p, HunyuanVideo 720p), the inter-node link assumed
   (400 Gb/s InfiniBand per GPU).

Part "layout-check" (under torchrun, N ranks): every (cfg, U, R) of N timed as one guided step of one
attention layer of Wan 1.3B 480p beside the model's prediction (kernel and links measured here), and
whether ``choose_layout``'s pick is the fastest measured (headline L1: measured pick / fastest <= 1.05).

    python -m benchmarks.run --parts layout --json layout.json      # one GPU
    python -m benchmarks.run --parts layout --dry-run               # CPU, a toy shape, fp32
    torchrun --nproc-per-node 2 benchmarks/run.py --parts layout-check --json layout_check.json
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

import usp_attn
from benchmarks.suite import Context, headline, short_error, skipped
from usp_attn import layout as L

__all__ = ["layout_part", "layout_check_part"]

GPU = dict(models=L.MODELS, gpus=(2, 4, 8), nodes_models=("Wan 14B 720p", "HunyuanVideo 720p"),
           dtype=torch.bfloat16, budget_ms=200.0)
_TOY = L.Workload(heads=4, tokens=256, head_size=16, guidance=True, layers=2)
CPU = dict(models={"toy": _TOY}, gpus=(2, 4, 8), nodes_models=("toy",), dtype=torch.float32, budget_ms=5.0)


def _prediction_rows(model: str, world: int, workload: L.Workload, terms: L.CostTerms, nodes: int = 1) -> list[dict]:
    costs = L.predict_layouts(world, workload, terms)
    pick = L.pick_layout(costs)
    where = "measured kernel, assumed links" if terms.measured() else "assumed terms"
    return [{"what": "predicted" + (f", {nodes} nodes" if nodes > 1 else ""), "model": model, "gpus": world,
             "layout": c.name, "call_ms": c.call_ms, "step_ms": c.step_ms, "kernel_ms": c.kernel_ms,
             "ulysses_ms": c.ulysses_ms, "ring_exposed_ms": c.ring_exposed_ms, "cfg_gather_ms": c.cfg_gather_ms,
             "pick": "*" if c is pick else "", "across_nodes": ",".join(c.spans_nodes), "pads": c.padding,
             "note": where} for c in costs]


def _curve_check_rows(ctx: Context, model: str, workload: L.Workload, terms: L.CostTerms, cfg: dict) -> list[dict]:
    """Each 8-GPU candidate's per-rank kernel call timed alone, against the curve's prediction."""
    rows, seen = [], set()
    for c in L.predict_layouts(8, workload, terms):
        segment = -(-workload.tokens // c.ring)
        key = (c.local_heads, segment, c.ring > 1)
        if key in seen:
            continue
        seen.add(key)
        if ctx.out_of_time():
            rows.append(skipped("kernel at a candidate's call", "time budget spent", model=model, layout=c.name))
            continue
        curve, found = L.measure_kernel_curve([segment], heads=c.local_heads, head_size=workload.head_size,
                                              dtype=cfg["dtype"], device=ctx.device, need_lse=c.ring > 1,
                                              budget_ms=cfg["budget_ms"])
        ms = found[0]["ms"]
        use = terms.kernel_lse if c.ring > 1 else terms.kernel
        predicted = use.ms(workload.batch, c.local_heads, segment, segment, workload.head_size)
        rows.append({"what": "kernel at a candidate's call", "model": model, "layout": c.name,
                     "shape": f"{workload.batch},{c.local_heads},{segment},{workload.head_size}", "lse": c.ring > 1,
                     "backend": found[0]["kernel"], "ms": ms, "predicted_ms": predicted, "curve_ratio": ms / predicted,
                     "tflops": found[0]["tflops"]})
    return rows


def layout_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    rows = []
    for model, workload in cfg["models"].items():
        if ctx.out_of_time():
            rows.append(skipped("kernel terms", "time budget spent", model=model))
            continue
        lengths = L.lengths_for(max(cfg["gpus"]), workload)
        terms = L.measure_terms(lengths, heads=workload.heads, head_size=workload.head_size, dtype=cfg["dtype"],
                                device=ctx.device, group=None, budget_ms=cfg["budget_ms"])
        for name, curve in (("kernel", terms.kernel), ("kernel_lse", terms.kernel_lse)):
            rows.append({"what": f"{name} term, launch", "model": model, "ms": curve.launch_ms,
                         "note": "1 head x 128 tokens"})
            rows += [{"what": f"{name} term", "model": model,
                      "shape": f"{workload.batch},{workload.heads},{n},{workload.head_size}", "tflops": t,
                      "note": terms.source(name) if i == 0 else ""} for i, (n, t) in enumerate(curve.points)]
        rows += _curve_check_rows(ctx, model, workload, terms, cfg)
        for world in cfg["gpus"]:
            rows += _prediction_rows(model, world, workload, terms)
        if model in cfg["nodes_models"]:
            two_nodes = terms.on_nodes(8, L.INFINIBAND_400G,
                                       "assumed: 400 Gb/s InfiniBand per GPU (all-to-all 40 GB/s, P2P 45 GB/s)")
            rows += _prediction_rows(model, 16, workload, two_nodes, nodes=2)
        ctx.free()
    return rows


# ---- several GPUs: predicted and measured side by side ---------------------------------------------
CHECK_GPU = dict(model="Wan 1.3B 480p", workload=dataclasses.replace(L.MODELS["Wan 1.3B 480p"], layers=1),
                 dtype=torch.bfloat16, budget_ms=200.0, mib=64)
CHECK_CPU = dict(model="toy", workload=dataclasses.replace(_TOY, layers=1), dtype=torch.float32, budget_ms=5.0, mib=1)


def _branches(workload: L.Workload, dtype, device) -> list[tuple[torch.Tensor, ...]]:
    """The two guidance branches' full q, k, v ``[B, S, H, D]``, the same on every rank."""
    w, out = workload, []
    for i in range(2):
        gen = torch.Generator(device=device).manual_seed(10 + i)
        out.append(tuple(torch.randn(w.batch, w.tokens, n, w.head_size, generator=gen, device=device).to(dtype)
                         for n in (w.heads, w.kv_heads, w.kv_heads)))
    return out


def layout_check_part(ctx: Context) -> list[dict]:
    """Under torchrun: every (cfg, U, R) of the world timed as one guided step of one attention layer
    (the branches' calls, then one CFG gather of a prediction-sized tensor when cfg = 2) beside the cost
    model's prediction from terms measured here (kernel on each rank, links over the world), and
    whether the automatic pick (``choose_layout``) is the fastest measured layout."""
    if ctx.world < 2:
        return [skipped("predicted vs measured layouts", "needs torchrun with 2 or more ranks")]
    cfg = CHECK_GPU if ctx.cuda else CHECK_CPU
    w, model = cfg["workload"], cfg["model"]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world))  # torchrun: ranks per node, node-major
    lengths = L.lengths_for(ctx.world, w)
    if per_node < ctx.world and ctx.world % per_node == 0:  # several nodes: probe inside and between them
        intra, inter = L.measure_node_links(per_node, mib=cfg["mib"])
        terms = L.measure_terms(lengths, heads=w.heads, head_size=w.head_size, dtype=cfg["dtype"], device=ctx.device,
                                budget_ms=cfg["budget_ms"])
        terms = L.with_measured_links(terms, intra=intra, inter=inter, gpus_per_node=per_node,
                                      where=f"{per_node} ranks of a node")
    else:
        terms = L.measure_terms(lengths, heads=w.heads, head_size=w.head_size, dtype=cfg["dtype"],
                                device=ctx.device, group=dist.group.WORLD, budget_ms=cfg["budget_ms"],
                                measure_links_on="cuda" if ctx.cuda else "any")
    predicted = {c.layout: c for c in L.predict_layouts(ctx.world, w, terms)}
    pick = L.choose_layout(ctx.world, heads=w.heads, kv_heads=w.kv_heads, tokens=w.tokens, head_size=w.head_size,
                           guidance=w.guidance, layers=w.layers, terms=terms).layout  # rank 0's terms, broadcast
    full = _branches(w, cfg["dtype"], ctx.device)
    gather_rows = torch.empty(max(1, w.gather_bytes // 4), dtype=torch.float32, device=ctx.device)
    rows = [{"what": f"term {name}", "model": model, "note": source} for name, source in terms.sources]
    measured = {}
    one = usp_attn.LocalAttention(w.heads, w.head_size, num_kv_heads=w.kv_heads)
    seconds = ctx.max_over_ranks(ctx.measure(lambda: [one(*qkv) for qkv in full], [()]).median)
    alone = L.predict_layouts(1, w, terms)[0]
    rows.append({"what": "guided attention step", "model": model, "gpus": 1, "layout": "1 GPU",
                 "predicted_ms": alone.step_ms, "ms": seconds * 1e3, "ratio": seconds * 1e3 / alone.step_ms})
    one_gpu_ms = seconds * 1e3
    for layout, cost in predicted.items():
        c, u, r = layout
        row = {"what": "guided attention step", "model": model, "gpus": ctx.world, "layout": cost.name}
        if ctx.out_of_time():
            rows.append(skipped(**row, why="time budget spent"))
            continue
        state = usp_attn.init_sequence_parallel(u, r, cfg_degree=c)
        try:
            attn = usp_attn.USPAttention(w.heads, w.head_size, num_kv_heads=w.kv_heads)
            mine = [full[state.cfg_rank]] if c > 1 else full
            shards = [tuple(usp_attn.shard_sequence(x).contiguous() for x in qkv) for qkv in mine]

            def step():
                for qkv in shards:
                    attn(*qkv)
                if c > 1:
                    usp_attn.cfg_gather(gather_rows[None])

            seconds = ctx.max_over_ranks(ctx.measure(step, [()]).median)
        except Exception as exc:  # a layout failing here is a result, not a crash
            rows.append({**row, "note": f"error: {short_error(exc)}"})
            continue
        finally:
            usp_attn.destroy_sequence_parallel()
            dist.barrier()
        measured[layout] = seconds * 1e3
        rows.append({**row, "predicted_ms": cost.step_ms, "ms": seconds * 1e3, "ratio": seconds * 1e3 / cost.step_ms,
                     "speedup": one_gpu_ms / (seconds * 1e3), "pick": "*" if layout == pick else "",
                     "pads": cost.padding, "across_nodes": ",".join(cost.spans_nodes),
                     "note": "links measured" if "alltoall" in terms.measured() else "links assumed"})
    if measured and pick in measured:
        fastest = min(measured, key=measured.get)
        rows.append(headline("L1", f"automatic layout cfg{pick[0]} x U{pick[1]} x R{pick[2]}: measured time / the "
                             f"fastest measured (cfg{fastest[0]} x U{fastest[1]} x R{fastest[2]})",
                             measured[pick] / measured[fastest], "<= 1.05", model=model, gpus=ctx.world))
    ctx.free()
    return rows
