"""CUDA-graph capture of the sequence-parallel layers and of a DiT block using them: the cases of
test_multigpu_graphs.py (NCCL, one process per GPU, groups of 2 side by side) and the helpers of
test_gpu_graphs.py (one GPU).

What capture needs (README, "Compiling and capturing"): one eager call first (the cross-rank argument
check, the measured kernel choice, NCCL's communicators and the kernels' JIT), then the same shapes,
pattern and options at every replay; the inputs are static tensors the caller copies new values into.
Replay must be bit-identical to the eager layer on the same values (same kernels, same order).

Without CUDA (``USP_ATTN_MULTIGPU_CPU_RANKS``, the check script's dry run) the multi-rank cases run
their eager steps and report "no CUDA", so every line but the capture itself runs before a GPU is paid.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import usp_attn
from launch.tiny_dit import Block, TinyDiTConfig, rope_tables

__all__ = ["capture", "replays_vs_eager", "dit_block", "block_inputs", "layer_replay", "block_replay",
           "compiled_layer_replay"]

TIMEOUT_S = 60


def capture(fn, *static_args, warmup: int = 2):
    """``(graph, static output)`` of ``fn(*static_args)`` captured in a CUDA graph, after ``warmup``
    eager calls on a side stream (allocations, NCCL's stream set-up) as torch's graph docs advise."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*static_args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static_args)
    return graph, out


def replays_vs_eager(graph, captured, static, call, values, device=None, seeds=(1, 2)) -> str:
    """For each seed: ``values(seed)`` copied into the ``static`` inputs, the graph replayed, and its
    ``captured`` output (a tensor or a tuple) compared with ``call`` run eagerly on the same values.
    "equal" when every replay is bit-identical, else what differed first."""
    captured = captured if isinstance(captured, tuple) else (captured,)
    for seed in seeds:
        fresh = values(seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        eager = call(*fresh)
        eager = eager if isinstance(eager, tuple) else (eager,)
        torch.cuda.synchronize(device)
        for got, want in zip(captured, eager):
            if not torch.equal(got, want):
                return f"seed {seed}: max |replay - eager| {(got.float() - want.float()).abs().max().item():.3g}"
    return "equal"


def dit_block(hidden: int, heads: int, sequence_parallel: bool, device, dtype) -> Block:
    """The built-in Wan-style block (self-attention through ``USPAttention``, cross-attention, FFN, norms)
    with the same random weights on every rank."""
    torch.manual_seed(0)
    block = Block(TinyDiTConfig(hidden_size=hidden, num_heads=heads, ffn_size=4 * hidden), sequence_parallel)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))  # modulation starts at 0: make every branch count
    return block.to(device=device, dtype=dtype).eval()


def block_inputs(seq: int, hidden: int, heads: int, grid, device, dtype, seed: int):
    """``x [1, seq, hidden]``, ``mod [1, 6, hidden]``, ``context [1, 16, hidden]``, rotary ``(cos, sin)``."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, seq, hidden, generator=g, device=device, dtype=dtype)
    mod = torch.randn(1, 6, hidden, generator=g, device=device, dtype=dtype)
    context = torch.randn(1, 16, hidden, generator=g, device=device, dtype=dtype)
    rope = tuple(t.to(device) for t in rope_tables(grid, hidden // heads, 10000.0))
    return x, mod, context, rope


def _device():
    from tests.gpu.multigpu import device

    return device()


def _groups(k: int) -> list[list[int]]:
    world = dist.get_world_size()
    return [list(range(g, g + k)) for g in range(0, world, k)]


def layer_replay(u: int, r: int) -> str:
    """``USPAttention`` (text prefix, the LSE) captured at U x R = 2; replays with new values equal eager bit
    for bit. "equal", or what differed."""
    dev = _device()
    usp_attn.init_sequence_parallel(u, r, ranks=_groups(2), timeout=TIMEOUT_S)
    try:
        cuda = dev.type == "cuda"
        s, h, d, dtype = (4096, 12, 128, torch.bfloat16) if cuda else (64, 4, 16, torch.float32)
        text = 77
        layer = usp_attn.USPAttention(h, d)

        def local(seed):
            g = torch.Generator(device=dev).manual_seed(seed)
            full = [torch.randn(1, text + s, h, d, generator=g, device=dev, dtype=dtype) for _ in range(3)]
            return [torch.cat([t[:, :text], usp_attn.shard_sequence(t[:, text:])], 1) for t in full]

        def call(q, k, v):
            return layer(q, k, v, num_replicated_prefix=text, return_lse=True)

        static = local(0)
        first = call(*static)  # eager: the checked first call and the kernel choice
        if not cuda:
            again = call(*static)
            return "no CUDA" if all(torch.equal(a, b) for a, b in zip(first, again)) else "eager differs"
        graph, out = capture(call, *static)
        return replays_vs_eager(graph, out, static, call, local, dev)
    finally:
        usp_attn.destroy_sequence_parallel()


def block_replay(u: int, r: int) -> str:
    """A DiT block with USPAttention at U x R = 2 captured; replays equal its eager run bit for bit."""
    dev = _device()
    state = usp_attn.init_sequence_parallel(u, r, ranks=_groups(2), timeout=TIMEOUT_S)
    try:
        cuda = dev.type == "cuda"
        hidden, heads, grid, dtype = (1536, 12, (4, 32, 32), torch.bfloat16) if cuda else (64, 4, (2, 4, 8),
                                                                                            torch.float32)
        seq = grid[0] * grid[1] * grid[2]
        block = dit_block(hidden, heads, True, dev, dtype)

        def local(seed):
            x, mod, context, rope = block_inputs(seq, hidden, heads, grid, dev, dtype, seed)
            rope = tuple(usp_attn.shard_sequence(t, dim=0, state=state, record_length=False) for t in rope)
            return [usp_attn.shard_sequence(x), mod, context, *rope]

        def step(x, mod, context, cos, sin):
            with torch.no_grad():
                return block(x, mod, context, (cos, sin))

        static = local(0)
        first = step(*static)
        if not cuda:
            return "no CUDA" if torch.equal(first, step(*static)) else "eager differs"
        graph, out = capture(step, *static)
        return replays_vs_eager(graph, out, static, step, local, dev)
    finally:
        usp_attn.destroy_sequence_parallel()


def compiled_layer_replay(u: int, r: int) -> str:
    """``torch.compile(mode="reduce-overhead", fullgraph=True)`` of USPAttention at U x R = 2 (CUDA graphs
    through torch's graph trees): equal to eager bit for bit, one graph."""
    dev = _device()
    usp_attn.init_sequence_parallel(u, r, ranks=_groups(2), timeout=TIMEOUT_S)
    try:
        if dev.type != "cuda":
            return "no CUDA"
        torch._dynamo.reset()
        s, h, d, dtype = 4096, 12, 128, torch.bfloat16
        layer = usp_attn.USPAttention(h, d)
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
        for seed in range(4):
            g = torch.Generator(device=dev).manual_seed(seed)
            q, k, v = (usp_attn.shard_sequence(torch.randn(1, s, h, d, generator=g, device=dev, dtype=dtype))
                       for _ in range(3))
            eager = layer(q, k, v)
            out = compiled(q, k, v).clone()  # graph trees reuse the output's memory at the next replay
            torch.cuda.synchronize(dev)
            if not torch.equal(out, eager):
                return f"call {seed}: max |compiled - eager| {(out.float() - eager.float()).abs().max().item():.3g}"
        return "equal"
    finally:
        usp_attn.destroy_sequence_parallel()
        torch._dynamo.reset()


def pipeline_equals_unpipelined(u: int, r: int) -> str:
    """USPAttention pipelined over every head-group count (and the automatic count) against the unpipelined layer
    at U x R = 2, bf16 at Wan 1.3B's heads: "equal" (bit for bit), or what differed. Also captured in a graph."""
    dev = _device()
    usp_attn.init_sequence_parallel(u, r, ranks=_groups(2), timeout=TIMEOUT_S)
    try:
        cuda = dev.type == "cuda"
        s, h, d, dtype = (32760, 12, 128, torch.bfloat16) if cuda else (64, 4, 16, torch.float32)
        g = torch.Generator(device=dev).manual_seed(3)
        q, k, v = (usp_attn.shard_sequence(torch.randn(1, s, h, d, generator=g, device=dev, dtype=dtype))
                   for _ in range(3))
        expected = usp_attn.USPAttention(h, d, ulysses_pipeline=1)(q, k, v)
        layers = [usp_attn.USPAttention(h, d, ulysses_pipeline=n) for n in range(2, h // u + 1)]
        layers.append(usp_attn.USPAttention(h, d))  # the automatic count
        for layer in layers:
            out = layer(q, k, v)
            if not (torch.equal(out, expected) or r > 1 and not cuda):
                return f"ulysses_pipeline={layer.ulysses_pipeline}: differs"
        if not cuda:
            return "no CUDA"
        piped = usp_attn.USPAttention(h, d, ulysses_pipeline=3)
        piped(q, k, v)
        graph, out = capture(lambda: piped(q, k, v))
        graph.replay()
        torch.cuda.synchronize(dev)
        return "equal" if torch.equal(out, expected) else "captured pipeline differs"
    finally:
        usp_attn.destroy_sequence_parallel()
