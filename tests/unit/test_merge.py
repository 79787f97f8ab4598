"""LSE merging of partial attention (what ring attention relies on): the torch-ops merge and the
fused Triton kernel (run through Triton's CPU interpreter when Triton is installed)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.reference import reference_attention
from usp_attn.ring import merge_triton
from usp_attn.ring.merge import PartialAttention

BOUNDS = [(0, 3), (3, 8), (8, 15), (15, 20)]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 24, generator=gen)
    k = torch.randn(2, 20, 4, 24, generator=gen)
    v = torch.randn(2, 20, 4, 24, generator=gen)
    mask = torch.rand(2, 20, generator=gen) > 0.4
    mask[1] = False  # batch 1: no key at all -> every row must come out 0, lse -inf
    mask[0, :8] = False  # batch 0: the first two blocks are empty for every row
    return q, k, v, mask


def _blocks(q, k, v, mask, bounds, odd_layouts=False):
    """Per-block (out, lse) from the fp64 reference, optionally in the layouts kernels return."""
    blocks = []
    for i, (lo, hi) in enumerate(bounds):
        out, lse = reference_attention(q, k[:, lo:hi], v[:, lo:hi], mask=mask[:, lo:hi], return_lse=True)
        out, lse = out.float(), lse.float()
        if odd_layouts and i == 1:
            out = out.to(torch.bfloat16)
        if odd_layouts and i == 2:  # [B, S, H, D] view of [B, H, S, D] memory; LSE padded like `efficient`
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
            lse = torch.cat([lse, torch.zeros(2, 4, 7)], dim=-1)[..., : q.shape[1]]
        blocks.append((out, lse))
    return blocks


@pytest.mark.parametrize("bounds", [[(0, 20)], [(0, 8), (8, 20)], BOUNDS])
@pytest.mark.parametrize("flag_last", [False, True])
def test_blockwise_merge_equals_full_attention(bounds, flag_last):
    q, k, v, mask = _inputs()
    full_out, full_lse = reference_attention(q, k, v, mask=mask, return_lse=True)
    acc = PartialAttention(fused=False)
    blocks = _blocks(q, k, v, mask, bounds)
    result = None
    for i, (out, lse) in enumerate(blocks):
        last = flag_last and i == len(blocks) - 1
        result = acc.add(out, lse, last_dtype=torch.float32 if last else None)
    if not flag_last:
        result = acc.result(torch.float32)
        lse = acc.lse()
        assert torch.equal(torch.isneginf(lse), torch.isneginf(full_lse))
        finite = torch.isfinite(full_lse)
        assert (lse.double()[finite] - full_lse[finite]).abs().max() < 1e-5
    assert not torch.isnan(result).any()
    # fp32 merge of fp64-computed blocks: a few fp32 ulps of O(1) values.
    assert (result.double() - full_out).abs().max() < 1e-6
    assert torch.count_nonzero(result[1]) == 0


def test_fused_merge_matches_torch_merge_in_triton_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed (the fused merge is CUDA-only otherwise)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    merge_triton._kernel.cache_clear()
    try:
        assert merge_triton.fused_merge_available(torch.device("cpu"))
        q, k, v, mask = _inputs()
        blocks = _blocks(q, k, v, mask, BOUNDS, odd_layouts=True)
        runs = {}
        for fused in (False, True):
            acc = PartialAttention(fused=fused)
            for out, lse in blocks[:-1]:
                acc.add(out, lse)
            mid_lse = acc.lse().clone()
            final = acc.add(*blocks[-1], last_dtype=torch.bfloat16)
            runs[fused] = (mid_lse, final)
        (lse_t, out_t), (lse_f, out_f) = runs[False], runs[True]
        assert out_f.dtype == torch.bfloat16 and not torch.isnan(out_f).any()
        # Same fp32 math, then one rounding to bf16: at most one bf16 ulp apart (2^-7 relative).
        assert ((out_f.float() - out_t.float()).abs() <= 2**-7 * out_t.float().abs() + 1e-6).all()
        assert torch.equal(torch.isneginf(lse_f), torch.isneginf(lse_t))
        finite = torch.isfinite(lse_t)
        assert (lse_f[finite] - lse_t[finite]).abs().max() < 1e-5
        full = reference_attention(q, k, v, mask=mask)
        assert (out_f.double() - full).abs().max() < 2**-7 * full.abs().max()
    finally:
        merge_triton._kernel.cache_clear()


def test_fused_merge_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not merge_triton.fused_merge_available(torch.device("cpu"))


def test_merge_never_produces_nan_for_all_masked_rows():
    acc = PartialAttention(fused=False)
    for _ in range(3):
        acc.add(torch.zeros(1, 2, 1, 4), torch.full((1, 1, 2), -math.inf))
    assert torch.count_nonzero(acc.result(torch.float32)) == 0
    assert torch.isneginf(acc.lse()).all()
