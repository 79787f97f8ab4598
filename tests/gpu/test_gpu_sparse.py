"""Sparse attention on a GPU: FlashAttention 4's block-sparse kernel against the exact masked reference.

Grids whose tiles fill whole 128-token blocks run wholly kept blocks only; grids that are not a
multiple of the tile put their edge tiles last (tile-major order) and FA4 masks those blocks token
by token with the pattern's tile table. Both must equal the masked reference within the dense
kernels' bf16 bound; per-head windows and every row layout (text rows, GQA) included.
"""

from __future__ import annotations

import pytest
import torch

from usp_attn import LocalAttention, ReplicatedRows
from usp_attn.platforms import current_platform
from usp_attn.sparse import SlidingTileSparsity, VideoGrid, masked_reference
from usp_attn.sparse.attend import block_plan

from tests.gpu.common import GPU, REL_TOL, rel_err

pytestmark = GPU


def _fa4_block_sparse():
    from usp_attn.backends.flash import FlashAttentionBackend

    reason = FlashAttentionBackend.machine_reason(current_platform()) or \
        FlashAttentionBackend.block_sparse_reason(current_platform())
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dims, window", [
    ((8, 16, 32), (1, 2, 2)),  # whole blocks only
    ((9, 15, 30), (2, 3, 3)),  # edge tiles: partly kept blocks, masked in the kernel
    ((9, 15, 30), [(1, 1, 1), (2, 3, 3), (3, 2, 1), (1, 4, 4)]),  # per-head windows
])
@pytest.mark.parametrize("text", [(0, 0), (77, 5)])
def test_block_sparse_equals_masked_reference(dims, window, text):
    _fa4_block_sparse()
    grid, h, h_kv, d = VideoGrid(*dims), 4, 2, 128
    pattern = SlidingTileSparsity(grid, (4, 4, 8), window, token_order="tile_major")
    s = text[0] + grid.num_tokens + text[1]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(2, s, h_kv, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    with torch.no_grad():
        out, lse = LocalAttention(h, d, h_kv)(q, k, v, sparsity=pattern, replicated=ReplicatedRows(*text),
                                              return_lse=True)
    ref, ref_lse = masked_reference(q.double(), k.double(), v.double(), pattern, num_replicated_prefix=text[0],
                                    num_replicated_suffix=text[1], return_lse=True)
    assert rel_err(out, ref) <= REL_TOL[torch.bfloat16]
    assert (lse.double() - ref_lse).abs().max() <= 1e-3
    plan = block_plan(pattern, (0, grid.num_tokens), (0, grid.num_tokens), tuple(range(h)), q.device)
    assert plan.whole == (dims == (8, 16, 32))  # the case is what it claims to test


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gradients_equal_masked_reference(dtype):
    """Training through a pattern on the GPU: the exact masked path and its kernels' backward (FA4's block-sparse
    call is skipped under autograd), text rows, GQA, per-head windows, the LSE differentiable too. Bounds: the
    dense backward kernels' (tests/gpu/test_gpu_backward.py: 2e-2 bf16, 4e-3 fp16)."""
    grid, h, h_kv, d, text = VideoGrid(5, 8, 12), 4, 2, 64, (16, 3)
    pattern = SlidingTileSparsity(grid, (1, 4, 4), [(1, 1, 1), (3, 2, 3), (1, 2, 1), (5, 1, 2)])
    s = text[0] + grid.num_tokens + text[1]
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, s, h, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    k, v = (torch.randn(2, s, h_kv, d, device="cuda", dtype=dtype, generator=gen).requires_grad_() for _ in range(2))
    g_out = torch.randn(q.shape, device="cuda", dtype=torch.float64, generator=gen)
    g_lse = torch.randn(2, h, s, device="cuda", dtype=torch.float64, generator=gen)
    out, lse = LocalAttention(h, d, h_kv)(q, k, v, sparsity=pattern, replicated=ReplicatedRows(*text),
                                          return_lse=True)
    got = torch.autograd.grad((out.double() * g_out).sum() + (lse.double() * g_lse).sum(), (q, k, v))
    full = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = masked_reference(*full, pattern, num_replicated_prefix=text[0], num_replicated_suffix=text[1],
                                    return_lse=True)
    want = torch.autograd.grad((ref * g_out).sum() + (ref_lse * g_lse).sum(), full)
    bound = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) <= bound, (name, rel_err(a, b))
