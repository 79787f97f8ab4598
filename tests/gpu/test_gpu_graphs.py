"""One GPU: ``LocalAttention`` and ``USPAttention`` (no sequence-parallel state: world 1) and a DiT block
captured in CUDA graphs; replays with new values are bit-identical to eager calls on those values.
``pytest -m gpu tests/gpu/test_gpu_graphs.py``."""

from __future__ import annotations

import pytest
import torch

import usp_attn
from tests.gpu.common import GPU
from tests.gpu.graph_cases import block_inputs, capture, dit_block, replays_vs_eager

pytestmark = GPU

SHAPES = [(1, 24, 4608, 128), (2, 12, 1000, 64)]  # Flux 1024²; an odd length


def _qkv(shape, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(*shape[:1], shape[2], shape[1], shape[3], generator=g, device="cuda", dtype=dtype)
            for _ in range(3)]


@pytest.mark.parametrize("layer_cls", [usp_attn.LocalAttention, usp_attn.USPAttention])
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_replay_is_bit_identical(layer_cls, return_lse, shape):
    layer = layer_cls(shape[1], shape[3])

    def call(q, k, v):
        return layer(q, k, v, return_lse=return_lse)

    static = _qkv(shape, 0)
    call(*static)  # eager first: the measured kernel choice happens here, never inside the capture
    graph, out = capture(call, *static)
    assert replays_vs_eager(graph, out, static, call, lambda seed: _qkv(shape, seed)) == "equal"


def test_dit_block_replay_is_bit_identical():
    hidden, heads, grid, dtype = 1536, 12, (4, 32, 32), torch.bfloat16
    block = dit_block(hidden, heads, True, torch.device("cuda"), dtype)

    def step(x, mod, context, cos, sin):
        with torch.no_grad():
            return block(x, mod, context, (cos, sin))

    def values(seed):
        x, mod, context, rope = block_inputs(grid[0] * grid[1] * grid[2], hidden, heads, grid, "cuda", dtype, seed)
        return [x, mod, context, *rope]

    static = values(0)
    step(*static)
    graph, out = capture(step, *static)
    assert replays_vs_eager(graph, out, static, step, values) == "equal"


@pytest.mark.parametrize("causal,zigzag", [(False, False), (True, False), (True, True)],
                         ids=["full", "causal", "zigzag-causal"])
def test_ring_merges_replay_are_bit_identical(causal, zigzag):
    """The ring's per-hop work without its transfer (one GPU cannot hold two NCCL ranks): this rank's block and
    three local key blocks attended with their LSE and merged on the side stream (``record_stream``, the fp32
    accumulator, the final cast; zigzag: two query-row groups, each its own merge), captured. Replays equal eager
    bit for bit, and eager equals fp64 attention over all the keys at once. The NCCL cases in
    test_multigpu_graphs.py add the transfers."""
    from usp_attn.ring.forward import ring_attention

    b, h, s, d, extra = 1, 8, 1024, 128, (256, 512, 640)
    layer = usp_attn.LocalAttention(h, d)

    def call(q, k, v, *blocks):
        local = [(blocks[i], blocks[i + 1], None) for i in range(0, len(blocks), 2)]
        return ring_attention(layer.attend, q, k, v, exchange=None, ring_rank=0, block_lengths=(s,), causal=causal,
                              local_blocks=local, return_lse=True, front_lengths=(s // 2,) if zigzag else None)

    def values(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        lengths = [s, s, s, *[n for n in extra for _ in (0, 1)]]
        return [torch.randn(b, n, h, d, generator=g, device="cuda", dtype=torch.bfloat16) for n in lengths]

    static = values(0)
    call(*static)
    graph, (out, lse) = capture(call, *static)
    assert replays_vs_eager(graph, (out, lse), static, call, values) == "equal"
    fresh = values(2)  # the last replay's inputs: out and lse hold their result
    q, k, v = (t.double() for t in fresh[:3])
    keys = torch.cat([k] + [t.double() for t in fresh[3::2]], 1)
    vals = torch.cat([v] + [t.double() for t in fresh[4::2]], 1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) * d ** -0.5
    if causal:  # causal over this rank's own block; the local (text) blocks are seen by every row
        own = torch.ones(s, s, dtype=torch.bool, device="cuda").tril()
        allowed = torch.cat([own, torch.ones(s, keys.shape[1] - s, dtype=torch.bool, device="cuda")], 1)
        logits = logits.masked_fill(~allowed, float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), vals)
    assert (out.double() - ref).abs().max().item() < 2e-2  # bf16 output: one ulp of |out| in [2, 4) is 1.6e-2
    assert (lse.double() - logits.logsumexp(-1)).abs().max().item() < 1e-2
