"""fp64 stays fp64 through the ring: the math kernel returns an fp64 LSE for fp64 inputs and the
merge accumulates in fp64 (it used to merge in fp32: errors of 1e-7..5e-7 against fp64)."""

from __future__ import annotations

import torch

from tests.helpers.reference import reference_attention
from usp_attn.backends.sdpa import TorchSDPABackend
from usp_attn.ring.merge import PartialAttention
from usp_attn.platforms import Platform

BOUNDS = [(0, 7), (7, 13), (13, 24)]
SDPA = TorchSDPABackend(Platform.make("cpu"))


def _inputs():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 11, 3, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 24, 3, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 24, 3, 16, generator=gen, dtype=torch.float64)
    return q, k, v


def test_sdpa_returns_fp64_lse_for_fp64_inputs():
    q, k, v = _inputs()
    out, lse = SDPA.forward(q, k, v, return_lse=True)
    want_out, want_lse = reference_attention(q, k, v, return_lse=True)
    assert out.dtype == lse.dtype == torch.float64
    assert (lse - want_lse).abs().max() < 1e-13 and (out - want_out).abs().max() < 1e-13


def test_fp32_inputs_keep_an_fp32_lse():
    q, k, v = (t.float() for t in _inputs())
    assert SDPA.forward(q, k, v, return_lse=True)[1].dtype == torch.float32


def test_fp64_blocks_merge_in_fp64_even_when_fused_is_requested():
    # fused=True would run the fp32 Triton kernel (and fail on CPU without its interpreter):
    # fp64 blocks must take the torch-ops merge in fp64 instead.
    q, k, v = _inputs()
    full_out, full_lse = reference_attention(q, k, v, return_lse=True)
    for last in (False, True):
        acc = PartialAttention(fused=True)
        result = None
        for i, (lo, hi) in enumerate(BOUNDS):
            out, lse = SDPA.forward(q, k[:, lo:hi], v[:, lo:hi], return_lse=True)
            flag = torch.float64 if last and i == len(BOUNDS) - 1 else None
            result = acc.add(out, lse, last_dtype=flag)
        if not last:
            assert acc.lse().dtype == torch.float64
            assert (acc.lse() - full_lse).abs().max() < 1e-13
            result = acc.result(torch.float64)
        assert result.dtype == torch.float64
        assert (result - full_out).abs().max() < 1e-13  # fp32 merging: ~1e-7
