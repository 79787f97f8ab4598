"""LSE merging of partial attention (what ring attention relies on), unfused and the fused Triton
kernel (run through Triton's CPU interpreter when Triton is installed)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.reference import reference_attention
from usp_attn.layers import merge_triton
from usp_attn.layers.merge import PartialAttention


def _blockwise(q, k, v, mask, bounds, fused):
    acc = PartialAttention(fused=fused)
    for lo, hi in bounds:
        out, lse = reference_attention(q, k[:, lo:hi], v[:, lo:hi], mask=mask[:, lo:hi], return_lse=True)
        acc.add(out.float(), lse.float())
    return acc


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 24, generator=gen)
    k = torch.randn(2, 20, 4, 24, generator=gen)
    v = torch.randn(2, 20, 4, 24, generator=gen)
    mask = torch.rand(2, 20, generator=gen) > 0.4
    mask[1] = False  # batch 1: no key at all -> every row must come out 0, lse -inf
    mask[0, :8] = False  # batch 0: the first block is empty for every row
    return q, k, v, mask


@pytest.mark.parametrize("bounds", [[(0, 20)], [(0, 8), (8, 20)], [(0, 3), (3, 8), (8, 15), (15, 20)]])
def test_blockwise_merge_equals_full_attention(bounds):
    q, k, v, mask = _inputs()
    full_out, full_lse = reference_attention(q, k, v, mask=mask, return_lse=True)
    acc = _blockwise(q, k, v, mask, bounds, fused=False)
    out = acc.result(torch.float32)
    assert not torch.isnan(out).any()
    # fp32 merge of fp64-computed blocks: a few fp32 ulps of O(1) values.
    assert (out.double() - full_out).abs().max() < 1e-6
    assert torch.equal(torch.isneginf(acc.lse), torch.isneginf(full_lse))
    finite = torch.isfinite(full_lse)
    assert (acc.lse.double()[finite] - full_lse[finite]).abs().max() < 1e-5
    assert torch.count_nonzero(out[1]) == 0


def test_fused_merge_matches_unfused_in_triton_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed (the fused merge is CUDA-only otherwise)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    merge_triton._kernel.cache_clear()
    try:
        assert merge_triton.fused_merge_available(torch.device("cpu"))
        q, k, v, mask = _inputs()
        bounds = [(0, 3), (3, 8), (8, 15), (15, 20)]
        fused = PartialAttention(fused=True)
        for i, (lo, hi) in enumerate(bounds):
            out, lse = reference_attention(q, k[:, lo:hi], v[:, lo:hi], mask=mask[:, lo:hi], return_lse=True)
            out = out.to(torch.bfloat16 if i == 2 else torch.float32)
            if i == 3:  # the layouts kernels really return: [B, S, H, D] view of [B, H, S, D], padded LSE
                out = out.transpose(1, 2).contiguous().transpose(1, 2)
                lse = torch.cat([lse, torch.zeros(2, 4, 7, dtype=lse.dtype)], dim=-1)[..., : q.shape[1]]
            fused.add(out, lse.float())
        unfused = PartialAttention(fused=False)
        for i, (lo, hi) in enumerate(bounds):
            out, lse = reference_attention(q, k[:, lo:hi], v[:, lo:hi], mask=mask[:, lo:hi], return_lse=True)
            unfused.add(out.to(torch.bfloat16 if i == 2 else torch.float32), lse.float())
        assert not torch.isnan(fused.out).any()
        assert (fused.out - unfused.out).abs().max() < 1e-5
        assert torch.equal(torch.isneginf(fused.lse), torch.isneginf(unfused.lse))
        finite = torch.isfinite(unfused.lse)
        assert (fused.lse[finite] - unfused.lse[finite]).abs().max() < 1e-5
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
    assert torch.isneginf(acc.lse).all()
