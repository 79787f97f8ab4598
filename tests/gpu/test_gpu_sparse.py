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
