"""Host cost: eager vs CUDA-graph-captured attention, and Ulysses with and without its pipeline.

    python -m benchmarks.run --parts host-cost --out DIR                                   # one GPU
    torchrun --nproc-per-node 2 -m benchmarks.run --parts ulysses-overlap --json FILE       # two GPUs

Part "host-cost" (one GPU): at the Flux 1024² (1, 24, 4608, 128), one Ulysses-8 rank's Flux (1, 3, 4608, 128) and
Wan 1.3B 480p (1, 12, 32760, 128) shapes, bf16, the raw kernel the automatic choice runs (its public function) and
``LocalAttention``, each eager and replayed from a CUDA graph, in call-and-wait timing (every call alone: the
device idle before it, waited for after it, so the host's launch work counts as it does at a diffusion step's
first layer) and, eager, back to back (50 calls issued without waiting: where the host sets the pace); headlines
raw / layer time (eager and captured). Then
the built-in Wan-style DiT block (hidden 1536, 12 heads, the Wan 1.3B 480p token count) eager, compiled
(``torch.compile``, inductor) and captured, per step; and the host µs per call of each layer path.

Part "ulysses-overlap" (two ranks): Ulysses-2 at Wan 14B 720p (1, 40, 75600, 128), bf16: one GPU's attention over
the whole sequence against ``USPAttention`` unpipelined, pipelined over 2, 3, 4, 5, 7 head groups and with the
automatic count; efficiency = one GPU's time / (2 × the layer's time). On one rank it measures the pipeline's
compute cost alone: a Ulysses-2 rank's 20 heads over the whole sequence as one call against the same heads in
2, 3, 4, 5, 7 groups called one after another (the transfers the groups would overlap need the second GPU).

Without a GPU (or ``--dry-run``) both run at toy sizes on the CPU (capture and inductor skipped there).
"""

from __future__ import annotations

import statistics
import time

import torch

import usp_attn
from benchmarks.kernels import raw_kernel_of
from benchmarks.suite import Context, headline, skipped
from benchmarks.timing import random_qkv, synchronize

__all__ = ["host_cost_part", "ulysses_overlap_part", "call_and_wait"]

GPU = dict(shapes=[(1, 24, 4608, 128), (1, 3, 4608, 128), (1, 12, 32760, 128)], dtype=torch.bfloat16, reps=50,
           block=dict(hidden=1536, heads=12, grid=(21, 30, 52)))
CPU = dict(shapes=[(1, 2, 64, 16)], dtype=torch.float32, reps=5, block=dict(hidden=64, heads=4, grid=(2, 4, 8)))
OVERLAP_GPU = dict(shape=(1, 40, 75600, 128), dtype=torch.bfloat16, reps=10, counts=(2, 3, 4, 5, 7))
OVERLAP_CPU = dict(shape=(1, 4, 256, 16), dtype=torch.float32, reps=3, counts=(2, 4))


def call_and_wait(variants: dict, *, reps: int, device) -> dict[str, float]:
    """Median seconds of each ``fn()`` timed alone (device synchronised before and after), interleaved."""
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _host_us(fn, device, calls: int = 20) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    synchronize(device)
    return elapsed / calls * 1e6


def _back_to_back(fn, device, calls: int = 50, rounds: int = 5) -> float:
    """Median seconds per call of ``calls`` calls issued back to back (waited for once at the end): where
    the host's work per call exceeds the kernel's time, the host sets the pace."""
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _captured(fn, warmup: int = 2):
    """``fn`` captured in a CUDA graph (after eager warm-up on a side stream): a callable that replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def host_cost_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    reps = ctx.reps or cfg["reps"]
    rows = []
    for shape in ctx.shapes or cfg["shapes"]:
        if ctx.out_of_time():
            rows.append(skipped("host cost", "time budget spent", shape=",".join(map(str, shape))))
            break
        rows += _layer_rows(ctx, shape, cfg["dtype"], reps)
        ctx.free()
    rows += _block_rows(ctx, cfg["block"], cfg["dtype"], reps)
    return rows


def _layer_rows(ctx: Context, shape, dtype, reps: int) -> list[dict]:
    b, h, s, d = shape
    label = ",".join(map(str, shape))
    q, k, v = random_qkv(shape, dtype, ctx.device, seed=5)[0]
    layer = usp_attn.LocalAttention(h, d)
    layer(q, k, v)  # eager first: the measured choice (CUDA) happens here
    kernel, desc = raw_kernel_of(layer, q, k, v)
    variants = {"LocalAttention eager": lambda: layer(q, k, v)}
    if kernel is not None and not kernel.reason(ctx.device):
        raw = kernel.bind(h, d, scale=d**-0.5, causal=False)
        kq = k.clone() if kernel.mutates_k else k
        variants = {"raw kernel eager": lambda: raw(q, kq, v), **variants}
    if ctx.cuda:
        variants.update({name.replace("eager", "captured"): _captured(fn) for name, fn in list(variants.items())})
    medians = call_and_wait(variants, reps=reps, device=ctx.device)
    rows = [{"what": name, "shape": label, "ms": ms * 1e3,
             "host_us": _host_us(variants[name], ctx.device) if "eager" in name else None,
             "note": f"call-and-wait, median of {reps}; auto = {desc}"} for name, ms in medians.items()]
    for name in [n for n in variants if "eager" in n]:  # a stream of calls: does the host keep the GPU busy?
        rows.append({"what": name.replace("eager", "eager, back to back"), "shape": label,
                     "ms": _back_to_back(variants[name], ctx.device) * 1e3,
                     "note": "per call, 50 calls issued without waiting, median of 5"})
    for mode, target in (("eager", ">= 0.97"), ("captured", ">= 0.99")):
        raw_ms, layer_ms = medians.get(f"raw kernel {mode}"), medians.get(f"LocalAttention {mode}")
        if raw_ms and layer_ms:
            rows.append(headline("H1", f"raw kernel / LocalAttention time, {mode}", raw_ms / layer_ms, target,
                                 shape=label))
    return rows


def _block_rows(ctx: Context, cfg: dict, dtype, reps: int) -> list[dict]:
    from launch.tiny_dit import Block, TinyDiTConfig, rope_tables

    hidden, heads, grid = cfg["hidden"], cfg["heads"], cfg["grid"]
    seq = grid[0] * grid[1] * grid[2]
    torch.manual_seed(0)
    block = Block(TinyDiTConfig(hidden_size=hidden, num_heads=heads, ffn_size=4 * hidden), sequence_parallel=True)
    block = block.to(device=ctx.device, dtype=dtype).eval()
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    x = torch.randn(1, seq, hidden, generator=gen, device=ctx.device, dtype=dtype)
    mod = torch.randn(1, 6, hidden, generator=gen, device=ctx.device, dtype=dtype)
    context = torch.randn(1, 512, hidden, generator=gen, device=ctx.device, dtype=dtype)
    rope = tuple(t.to(ctx.device) for t in rope_tables(grid, hidden // heads, 10000.0))

    def eager():
        with torch.no_grad():
            return block(x, mod, context, rope)

    eager()
    compiled_block = torch.compile(block, fullgraph=True, backend="inductor" if ctx.cuda else "aot_eager")

    def compiled():
        with torch.no_grad():
            return compiled_block(x, mod, context, rope)

    start = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - start
    variants = {"DiT block eager": eager, "DiT block compiled": compiled}
    if ctx.cuda:
        variants["DiT block captured"] = _captured(eager)
    medians = call_and_wait(variants, reps=reps, device=ctx.device)
    label = f"hidden {hidden}, {heads} heads, {seq} tokens"
    rows = [{"what": name, "shape": label, "ms": ms * 1e3, "speedup": medians["DiT block eager"] / ms,
             "note": f"compile {compile_s:.1f} s" if "compiled" in name else f"call-and-wait, median of {reps}"}
            for name, ms in medians.items()]
    torch._dynamo.reset()
    return rows


# ---- Ulysses with and without its pipeline ------------------------------------------------------------------

def ulysses_overlap_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(OVERLAP_GPU, OVERLAP_CPU)
    if ctx.world == 1:
        return _head_split_rows(ctx, cfg)
    if ctx.world != 2:
        return [skipped("ulysses overlap", f"needs 1 or 2 ranks (torchrun --nproc-per-node 2), got {ctx.world}")]
    b, h, s, d = (ctx.shapes or [cfg["shape"]])[0]
    label = f"{b},{h},{s},{d}"
    reps = ctx.reps or cfg["reps"]
    q, k, v = random_qkv((b, h, s, d), cfg["dtype"], ctx.device, seed=7)[0]
    one = usp_attn.LocalAttention(h, d)
    one(q, k, v)
    one_gpu = ctx.max_over_ranks(call_and_wait({"one": lambda: one(q, k, v)}, reps=reps, device=ctx.device)["one"])
    rows = [{"what": "one GPU (LocalAttention, whole sequence)", "shape": label, "ms": one_gpu * 1e3}]
    usp_attn.init_sequence_parallel(2, 1, timeout=300)
    try:
        ql, kl, vl = (usp_attn.shard_sequence(t) for t in (q, k, v))
        del q, k, v
        layers = {"Ulysses-2 unpipelined": usp_attn.USPAttention(h, d, ulysses_pipeline=1)}
        for count in cfg["counts"]:
            layers[f"Ulysses-2 pipelined, {count} groups"] = usp_attn.USPAttention(h, d, ulysses_pipeline=count)
        layers["Ulysses-2 pipelined, automatic"] = usp_attn.USPAttention(h, d)
        for layer in layers.values():
            layer(ql, kl, vl)  # checked first call; the automatic count is measured here
        auto = layers["Ulysses-2 pipelined, automatic"].__dict__.get("_pipeline", (None, 1))[1]
        medians = call_and_wait({name: (lambda layer=layer: layer(ql, kl, vl)) for name, layer in layers.items()},
                                reps=reps, device=ctx.device)
        base = ctx.max_over_ranks(medians["Ulysses-2 unpipelined"])
        for name, seconds in medians.items():
            seconds = ctx.max_over_ranks(seconds)
            rows.append({"what": name, "shape": label, "ms": seconds * 1e3, "efficiency": one_gpu / (2 * seconds),
                         "vs_unpipelined": base / seconds,
                         "note": f"automatic count: {auto}" if "automatic" in name else f"median of {reps}"})
        best = min(ctx.max_over_ranks(t) for t in medians.values())
        rows.append({"what": "Ulysses-2 efficiency, unpipelined", "shape": label, "value": one_gpu / (2 * base)})
        rows.append(headline("U2", "Ulysses-2 efficiency, best pipeline", one_gpu / (2 * best), ">= 0.97",
                             shape=label))
    finally:
        usp_attn.destroy_sequence_parallel()
    return rows


def _head_split_rows(ctx: Context, cfg: dict) -> list[dict]:
    """What one GPU can say about the pipeline: its compute cost. A Ulysses-2 rank's attention (half the heads,
    the whole sequence) as one call against the same heads cut into each count's groups (``head_groups``, each
    group's q/k/v its own contiguous tensors, as after its all-to-all), called one after another; no transfer."""
    from usp_attn.ulysses.heads import HeadPlan
    from usp_attn.ulysses.pipelined import head_groups

    b, h, s, d = (ctx.shapes or [cfg["shape"]])[0]
    local = h // 2
    label = f"{b},{local},{s},{d}"
    reps = ctx.reps or cfg["reps"]
    q, k, v = random_qkv((b, local, s, d), cfg["dtype"], ctx.device, seed=7)[0]
    layer = usp_attn.LocalAttention(local, d)
    variants = {"one call, every local head": lambda: layer(q, k, v)}
    for count in (c for c in cfg["counts"] if c <= local):
        parts = [tuple(t[:, :, g.start:g.stop].contiguous() for t in (q, k, v))
                 for g in head_groups(HeadPlan.make(h, h, 2), count)]
        layers = [usp_attn.LocalAttention(part[0].shape[2], d) for part in parts]
        variants[f"{count} head groups, one after another"] = (
            lambda parts=parts, layers=layers: [lay(*part) for lay, part in zip(layers, parts)])
    for fn in variants.values():
        fn()  # the measured kernel choice per head count happens here
    medians = call_and_wait(variants, reps=reps, device=ctx.device)
    whole = medians["one call, every local head"]
    rows = [{"what": name, "shape": label, "ms": seconds * 1e3, "vs_one_call": whole / seconds,
             "note": f"one GPU, no transfer; median of {reps}"} for name, seconds in medians.items()]
    rows.append(skipped("ulysses overlap", "the pipeline itself needs 2 ranks (torchrun --nproc-per-node 2)",
                        shape=label))
    return rows
