"""Sparse patterns in the layers on one process: LocalAttention/USPAttention(sparsity=...) equal the fp64 masked
reference on the exact masked path (CPU) and through the block-sparse kernel (FA4's stand-in, which keeps only
the listed blocks and evaluates the mask function's meaning), including edge tiles, per-head windows, text rows
and GQA, gradients included (on the masked path); the block plan is what the pattern says; bad calls are clear
errors."""

from __future__ import annotations

import pytest
import torch

import usp_attn
from usp_attn import LocalAttention, ReplicatedRows, global_force_attn_backend
from usp_attn.backends import flash
from usp_attn.platforms import Platform, override_platform
from usp_attn.sparse import SlidingTileSparsity, TopMassSparsity, VideoGrid, masked_reference
from usp_attn.sparse.attend import BLOCK, block_plan

from tests.helpers import fake_kernels
from tests.helpers.state import reset_usp_attn_state

HOPPER_FA4 = Platform.make("cuda", capability=(9, 0), packages=["flash_attn.cute"], device_name="H200")
FP32_RTOL = 1e-5  # fp32 softmax against fp64: one rounding per step, as for dense attention


@pytest.fixture(autouse=True)
def _fresh():
    reset_usp_attn_state()
    yield
    reset_usp_attn_state()


def _qkv(s, heads=4, kv_heads=2, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, s, h, d, generator=gen, dtype=dtype) for h in (heads, kv_heads, kv_heads))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


PATTERNS = [
    SlidingTileSparsity(VideoGrid(4, 6, 5), tile=(2, 2, 2), window=(1, 2, 2)),
    SlidingTileSparsity(VideoGrid(5, 6, 7), tile=(2, 4, 3), window=[(1, 1, 1), (2, 1, 2), (1, 2, 3), (3, 2, 1)],
                        token_order="tile_major"),
    TopMassSparsity(0.8, block=16),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=["tile", "tile_major_per_head", "top_mass"])
@pytest.mark.parametrize("text", [(0, 0), (3, 2)])
def test_masked_path_equals_the_reference(pattern, text):
    n = pattern.grid.num_tokens if hasattr(pattern, "grid") else 120
    q, k, v = _qkv(text[0] + n + text[1])
    with torch.no_grad():
        out, lse = LocalAttention(4, 16, 2)(q, k, v, sparsity=pattern, replicated=ReplicatedRows(*text),
                                            return_lse=True)
        via_usp = usp_attn.USPAttention(4, 16, 2)(q, k, v, num_replicated_prefix=text[0],
                                                   num_replicated_suffix=text[1], sparsity=pattern)
    ref, ref_lse = masked_reference(q.double(), k.double(), v.double(), pattern, num_replicated_prefix=text[0],
                                    num_replicated_suffix=text[1], return_lse=True)
    assert _rel(out, ref) <= FP32_RTOL and _rel(via_usp, ref) <= FP32_RTOL
    assert (lse.double() - ref_lse).abs().max() <= 1e-5


@pytest.mark.parametrize("pattern", PATTERNS, ids=["tile", "tile_major_per_head", "top_mass"])
@pytest.mark.parametrize("layer_cls", [LocalAttention, usp_attn.USPAttention])
def test_gradients_equal_the_reference(pattern, layer_cls):
    """Training through a pattern (text rows, GQA; the output and the LSE both carry a gradient): fp64 inputs,
    so the layer's q, k, v gradients match the fp64 reference's autograd to rounding."""
    n, text = (pattern.grid.num_tokens if hasattr(pattern, "grid") else 120), (3, 2)
    q, k, v = (t.requires_grad_() for t in _qkv(text[0] + n + text[1], dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    g_out, g_lse = torch.randn(q.shape, generator=gen, dtype=torch.float64), None
    rows = dict(num_replicated_prefix=text[0], num_replicated_suffix=text[1])
    if layer_cls is LocalAttention:
        out, lse = LocalAttention(4, 16, 2)(q, k, v, sparsity=pattern, replicated=ReplicatedRows(*text),
                                            return_lse=True)
    else:
        out, lse = usp_attn.USPAttention(4, 16, 2)(q, k, v, sparsity=pattern, return_lse=True, **rows)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    ref, ref_lse = masked_reference(q, k, v, pattern, return_lse=True, **rows)
    want = torch.autograd.grad((ref * g_out).sum() + (ref_lse * g_lse).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-12, name


def test_gradients_never_take_the_forward_only_block_kernel(monkeypatch):
    fake = fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    monkeypatch.setitem(__import__("sys").modules, "flash_attn.cute.block_sparsity", fake.block_sparsity)
    q, k, v = _qkv(32, dtype=torch.bfloat16)
    with override_platform(HOPPER_FA4):
        layer = LocalAttention(4, 16, 2)
        assert layer._block_kernel(q, k, v) is not None  # inference: FA4's block sparsity
        assert layer._block_kernel(q.requires_grad_(), k, v) is None  # training: the exact masked path


@pytest.mark.parametrize("dims, window, whole", [
    ((2, 8, 16), (1, 1, 1), True),  # tiles of 128 tokens fill whole blocks: no mask function
    ((3, 9, 17), (1, 2, 1), False),  # edge tiles: partly kept blocks through the mask function
    ((3, 9, 17), [(1, 1, 1), (2, 2, 2), (1, 3, 1), (2, 1, 2)], False),
])
def test_block_kernel_equals_the_reference(monkeypatch, dims, window, whole):
    fake = fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    monkeypatch.setitem(__import__("sys").modules, "flash_attn.cute.block_sparsity", fake.block_sparsity)
    # The real mask function is CuTe DSL (compiled on the GPU); the stand-in evaluates its meaning instead.
    monkeypatch.setattr(flash, "_tile_table_mask", lambda *args: "tile table mask")
    pattern = SlidingTileSparsity(VideoGrid(*dims), tile=(2, 8, 8), window=window, token_order="tile_major")
    n = pattern.grid.num_tokens
    q, k, v = _qkv(4 + n + 3, dtype=torch.bfloat16)
    with override_platform(HOPPER_FA4):
        global_force_attn_backend("fa")
        with torch.no_grad():
            out = LocalAttention(4, 16, 2)(q, k, v, sparsity=pattern, replicated=ReplicatedRows(4, 3))
    block_calls = [c for c in fake.calls if c["block_sparse"]]
    assert len(block_calls) == 1 and block_calls[0]["mask_mod"] is (not whole)
    ref = masked_reference(q.double(), k.double(), v.double(), pattern, num_replicated_prefix=4,
                           num_replicated_suffix=3)
    assert _rel(out, ref) <= 1e-2  # bf16 inputs and output, fp64 inside the stand-in


def test_block_plan_is_the_pattern_at_block_granularity():
    pattern = SlidingTileSparsity(VideoGrid(3, 9, 17), tile=(2, 8, 8), window=(1, 2, 1), token_order="tile_major")
    n, heads = pattern.grid.num_tokens, (0, 1)
    plan = block_plan(pattern, (0, n), (0, n), heads, "cpu")
    mask = pattern.token_mask(torch.arange(n), torch.arange(n), heads).expand(2, -1, -1)
    nb = -(-n // BLOCK)
    padded = torch.zeros(2, nb * BLOCK, nb * BLOCK, dtype=torch.bool)
    padded[:, :n, :n] = mask
    blocks = padded.view(2, nb, BLOCK, nb, BLOCK)
    pairs = torch.zeros(nb * BLOCK, nb * BLOCK, dtype=torch.bool)
    pairs[:n, :n] = True
    pairs = pairs.view(nb, BLOCK, nb, BLOCK).sum(dim=(1, 3))
    counts = blocks.sum(dim=(2, 4))
    full, partial = counts == pairs, (counts > 0) & (counts < pairs)
    for h in range(2):
        for m in range(nb):
            got_full = set(plan.full_idx[0, h, m, : plan.full_cnt[0, h, m]].tolist())
            got_partial = set(plan.partial_idx[0, h, m, : plan.partial_cnt[0, h, m]].tolist())
            assert got_full == set(torch.nonzero(full[h, m]).flatten().tolist())
            assert got_partial == set(torch.nonzero(partial[h, m]).flatten().tolist())
    q_tile, k_tile, table = plan.tiles
    assert q_tile.numel() % BLOCK == 0 and table.dtype == torch.int32  # padded so the kernel reads in bounds


@pytest.mark.parametrize("case, message", [
    ("mask", "attn_mask cannot be combined"),
    ("causal", "causal"),
    ("grid", "grid"),
    ("type", "sparsity must be"),
    ("rows_only", "pass sparsity="),
])
def test_bad_sparse_calls_are_clear_errors(case, message):
    pattern = PATTERNS[0]
    n = pattern.grid.num_tokens
    q, k, v = _qkv(n)
    layer, kwargs = LocalAttention(4, 16, 2), {"sparsity": pattern}
    if case == "mask":
        kwargs["attn_mask"] = torch.ones(2, n, dtype=torch.bool)
    elif case == "causal":
        layer = LocalAttention(4, 16, 2, causal=True)
    elif case == "grid":
        q, k, v = _qkv(n + 1)
    elif case == "type":
        kwargs["sparsity"] = (1, 2, 2)
    elif case == "rows_only":
        kwargs = {"replicated": ReplicatedRows(1)}
    with pytest.raises((ValueError, TypeError), match=message):
        layer(q, k, v, **kwargs)
