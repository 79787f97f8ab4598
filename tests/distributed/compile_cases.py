"""Cases of test_compile_sp.py: ``torch.compile(fullgraph=True)`` of ``USPAttention`` and of a DiT block
using it, run on every rank of a gloo group (fp32, CPU).

Each case counts what dynamo compiled with a counting backend (one frame = one graph; a graph break
under ``fullgraph=True`` raises, a recompile adds a frame) and compares with the eager layer.
"""

from __future__ import annotations

import functools

import torch

import usp_attn
from launch.tiny_dit import Block, TinyDiTConfig, rope_tables

HEADS, HEAD = 4, 16
CALLS = 50


def _in_layout(case):
    """Run ``case(u, r, ...)`` inside ``init_sequence_parallel(u, r)`` with dynamo's caches fresh."""

    @functools.wraps(case)
    def run(u: int, r: int, *args):
        torch._dynamo.reset()
        usp_attn.init_sequence_parallel(ulysses_degree=u, ring_degree=r)
        try:
            return case(u, r, *args)
        finally:
            usp_attn.destroy_sequence_parallel()
            torch._dynamo.reset()

    return run


def _counter(backend: str):
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend(backend)


def _inputs(seed: int, batch: int, seq: int, heads: int = HEADS, kv_heads: int = HEADS, text: int = 0):
    """Full ``q, k, v`` (``[B, text + seq, H, D]``, text rows first, identical on every rank)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, text + seq, heads, HEAD, generator=g)
    k, v = (torch.randn(batch, text + seq, kv_heads, HEAD, generator=g) for _ in range(2))
    return q, k, v


def _local(t: torch.Tensor, text: int) -> torch.Tensor:
    """This rank's rows: the text rows, then its shard of the rest."""
    return torch.cat([t[:, :text], usp_attn.shard_sequence(t[:, text:])], dim=1)


@_in_layout
def layer_steady_state(u: int, r: int, backend: str = "aot_eager") -> dict:
    """Eager first call, then 50 compiled calls at fixed shapes (text rows, GQA, the LSE), then one changed
    shape: one graph, no recompile, then exactly one more graph; every result equal to eager."""
    text = 3
    layer = usp_attn.USPAttention(HEADS, HEAD, num_kv_heads=2)
    q, k, v = (_local(t, text) for t in _inputs(0, 1, 24, kv_heads=2, text=text))
    eager_out, eager_lse = layer(q, k, v, num_replicated_prefix=text, return_lse=True)
    counter = _counter(backend)
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    equal = True
    for _ in range(CALLS):
        out, lse = compiled(q, k, v, num_replicated_prefix=text, return_lse=True)
        equal &= torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
    graphs_steady = counter.frame_count
    # A new batch size: one more graph (dynamo may make it dynamic), still the eager values.
    q2, k2, v2 = (_local(t, text) for t in _inputs(1, 2, 24, kv_heads=2, text=text))
    out2 = compiled(q2, k2, v2, num_replicated_prefix=text)
    out2_again = compiled(q2, k2, v2, num_replicated_prefix=text)
    eager2 = layer(q2, k2, v2, num_replicated_prefix=text)
    return {"graphs_steady": graphs_steady, "graphs_after_change": counter.frame_count, "equal": bool(equal),
            "changed_close": (out2 - eager2).abs().max().item(), "changed_equal": torch.equal(out2_again, out2),
            "op_in_graph": counter.op_count > 0}


@_in_layout
def graph_breaks(u: int, r: int) -> dict:
    """``torch._dynamo.explain`` of the layer with a key mask and the LSE, compiled before any eager call
    (the argument check and the kernel choice run in the op's eager body at run time)."""
    layer = usp_attn.USPAttention(HEADS, HEAD)
    q, k, v = (usp_attn.shard_sequence(t) for t in _inputs(2, 2, 21))
    keep = torch.ones(2, 21, dtype=torch.bool)
    keep[1, 15:] = False
    mask = usp_attn.shard_sequence(keep)
    explained = torch._dynamo.explain(layer)(q, k, v, mask, return_lse=True)
    out, lse = layer(q, k, v, mask, return_lse=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    c_out, c_lse = compiled(q, k, v, mask, return_lse=True)
    return {"breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "equal": torch.equal(c_out, out) and torch.equal(c_lse, lse)}


def _block(sp: bool) -> Block:
    torch.manual_seed(0)  # the same weights on every rank and for the reference
    block = Block(TinyDiTConfig(hidden_size=HEADS * HEAD, num_heads=HEADS, ffn_size=128), sequence_parallel=sp)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))  # modulation starts at 0: make every branch count
    return block.eval()


@_in_layout
def block_compiled(u: int, r: int, backend: str = "aot_eager") -> dict:
    """A DiT block (self-attention through USPAttention, cross-attention local, FFN, norms, rotary)
    compiled whole: one graph over the calls, equal to its eager run and close to one process."""
    state = usp_attn.get_sequence_parallel_state()
    cfg_dim, seq, ctx = HEADS * HEAD, 24, 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, seq, cfg_dim, generator=g)
    mod = torch.randn(1, 6, cfg_dim, generator=g)
    context = torch.randn(1, ctx, cfg_dim, generator=g)
    rope = rope_tables((2, 3, 4), HEAD, 10000.0)
    block = _block(True)
    x_r = usp_attn.shard_sequence(x)
    rope_r = tuple(usp_attn.shard_sequence(t, dim=0, state=state, record_length=False) for t in rope)
    with torch.no_grad():
        eager = block(x_r, mod, context, rope_r)
        counter = _counter(backend)
        compiled = torch.compile(block, fullgraph=True, backend=counter)
        equal, worst = True, 0.0
        for _ in range(10):
            out = compiled(x_r, mod, context, rope_r)
            worst = max(worst, (out - eager).abs().max().item())
            equal &= torch.equal(out, eager)
        single = _block(False)(x, mod, context, rope)
    full = usp_attn.gather_sequence(out)
    return {"graphs": counter.frame_count, "equal": bool(equal), "vs_eager": worst,
            "vs_one_process": (full - single).abs().max().item(), "scale": single.abs().max().item()}
