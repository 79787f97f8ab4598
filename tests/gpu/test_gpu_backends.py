"""Every backend that can run on this GPU, through ``LocalAttention``, against fp64.

Bounds and their reasons: tests/gpu/common.py. Backends this machine cannot run (a
package not installed, another GPU generation) are skipped with the selector's reason.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.gpu.common import BF16, FP16, FP32, GPU, LSE_ATOL, REL_TOL, SAGE_TOL, key_padding_mask, make_qkv, rel_err
from tests.helpers.reference import reference_attention
from usp_attn import AttentionBackendEnum, LocalAttention, global_force_attn_backend_context_manager
from usp_attn.backends import BACKEND_CLASSES
from usp_attn.backends.sdpa import cuda_subkernel
from usp_attn.platforms import current_platform

pytestmark = GPU

B, S, H, D = 2, 1024, 8, 128  # B=2 catches batch-stride mistakes; S not a multiple of every tile


def skip_unless_runs(backend: AttentionBackendEnum, head_size: int, dtype, *, need_lse=False, need_mask=False):
    reason = BACKEND_CLASSES[backend].unsupported_reason(
        current_platform(), head_size, dtype, need_lse=need_lse, need_mask=need_mask
    )
    if reason:
        pytest.skip(f"{backend} cannot run on this machine: {reason}")


def bound(backend, dtype):
    return SAGE_TOL if backend == AttentionBackendEnum.SAGE_ATTN else REL_TOL[dtype]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", list(AttentionBackendEnum), ids=str)
def test_backend_matches_fp64(backend, dtype, causal):
    skip_unless_runs(backend, D, dtype)
    seed = zlib.crc32(f"{backend}-{dtype}-{causal}".encode())  # fresh inputs per case, reproducible
    q, k, v = make_qkv(B, S, H, D, dtype, seed=seed)
    layer = LocalAttention(H, D, causal=causal)
    with global_force_attn_backend_context_manager(backend):
        out = layer(q, k, v)
    assert layer.backend == backend, f"asked for {backend}, ran {layer.backend}"
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = rel_err(out, reference_attention(q, k, v, causal=causal))
    assert err < bound(backend, dtype), f"{backend} {dtype} causal={causal}: rel err {err:.2e}"


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", list(AttentionBackendEnum), ids=str)
def test_backend_lse_matches_fp64(backend, dtype):
    """The per-hop call of ring attention: out and the natural-log LSE ``[B, H, S]`` fp32."""
    skip_unless_runs(backend, D, dtype, need_lse=True)
    q, k, v = make_qkv(B, S, H, D, dtype, seed=11, s_k=S + 40)
    layer = LocalAttention(H, D)
    with global_force_attn_backend_context_manager(backend):
        out, lse = layer.attend(q, k, v, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, return_lse=True)
    assert lse.shape == (B, H, S) and lse.dtype == FP32
    assert rel_err(out, ref) < bound(backend, dtype)
    assert float((lse.double() - ref_lse).abs().max()) < LSE_ATOL


# The torch_sdpa backend picks an aten kernel per call (usp_attn/backends/sdpa.py); drive each one.
SUBKERNEL_CASES = {
    # name: (dtype, head size, with mask)
    "cudnn bf16 D=128": (BF16, 128, False),
    "flash bf16 D=256": (BF16, 256, False),
    "efficient bf16 D=128 masked": (BF16, 128, True),
    "efficient fp32 D=64": (FP32, 64, False),
    "efficient fp32 D=64 masked": (FP32, 64, True),
    "math fp16 D=100": (FP16, 100, False),
}


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("case", list(SUBKERNEL_CASES))
def test_torch_sdpa_subkernels(case, return_lse):
    dtype, d, masked = SUBKERNEL_CASES[case]
    expected = case.split()[0]
    cap = current_platform().capability
    if cuda_subkernel(cap, dtype, d, masked) != expected:
        pytest.skip(f"this GPU (sm{cap[0]}{cap[1]}) runs {cuda_subkernel(cap, dtype, d, masked)} for {case}")
    b, s, h = 2, 333, 4
    q, k, v = make_qkv(b, s, h, d, dtype, seed=3)
    # batch entry 1 has no key at all: its rows must come out as 0 (LSE -inf), not NaN
    mask = key_padding_mask(b, s, empty_batch=1) if masked else None
    layer = LocalAttention(h, d)
    with global_force_attn_backend_context_manager(AttentionBackendEnum.TORCH_SDPA):
        mask4d = None if mask is None else mask[:, None, None, :]
        res = layer.attend(q, k, v, mask=mask4d, return_lse=return_lse)
    out, lse = res if return_lse else (res, None)
    ref, ref_lse = reference_attention(q, k, v, mask=mask, return_lse=True)
    assert torch.isfinite(out).all()
    keep = slice(0, 1) if masked else slice(None)  # rows that have keys
    assert rel_err(out[keep], ref[keep]) < REL_TOL[dtype], case
    if masked:
        assert (out[1] == 0).all()
    if return_lse:
        assert lse.shape == (b, h, s) and lse.dtype == FP32
        assert float((lse[keep].double() - ref_lse[keep]).abs().max()) < LSE_ATOL
        if masked:
            assert torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("h_kv", [1, 2], ids=["mqa", "gqa"])
def test_torch_sdpa_gqa(h_kv):
    q, k, v = make_qkv(1, 512, 8, 128, BF16, h_kv=h_kv, seed=4)
    layer = LocalAttention(8, 128, num_kv_heads=h_kv)
    with global_force_attn_backend_context_manager(AttentionBackendEnum.TORCH_SDPA):
        out = layer(q, k, v)
    assert rel_err(out, reference_attention(q, k, v)) < REL_TOL[BF16]


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_sage_leaves_callers_k_untouched(dtype):
    """SageAttention 1 smooths K in place by default (smooth_k=True); the backend must not."""
    skip_unless_runs(AttentionBackendEnum.SAGE_ATTN, D, dtype)
    q, k, v = make_qkv(1, S, H, D, dtype, seed=5)
    k = k + 0.5  # a large mean, so smoothing in place would change every element
    before = k.clone()
    layer = LocalAttention(H, D)
    with global_force_attn_backend_context_manager(AttentionBackendEnum.SAGE_ATTN):
        out = layer(q, k, v)
    assert layer.backend == AttentionBackendEnum.SAGE_ATTN
    assert torch.equal(k, before)
    assert rel_err(out, reference_attention(q, k, v)) < SAGE_TOL


# ---- the measured automatic choice and the FlashAttention generations ----------------------------------
@pytest.mark.parametrize("s", [1024, 16384])
def test_measured_choice_runs_the_fastest_exact_kernel(s):
    from usp_attn import measured_choice

    measured_choice.clear_measurements()
    q, k, v = make_qkv(1, s, 8, 128, BF16, seed=31)
    layer = LocalAttention(8, 128)
    out = layer(q, k, v)
    sel = layer._last
    times = [ms for _, ms in sel.timings if ms is not None]
    assert sel.source == "measured" and len(times) >= 2, sel
    assert sel.kernel == sel.timings[0][0] and times == sorted(times)
    assert rel_err(out, reference_attention(q, k, v)) < REL_TOL[BF16]


@pytest.mark.parametrize("head_size", [8, 64, 80, 96, 128, 192, 256, 264])
def test_fa_generations_take_the_head_sizes_we_declare(head_size):
    """Our per-generation head-size rules against the installed kernels themselves."""
    from usp_attn.backends import make_backend
    from usp_attn.backends.flash import flash_generations, generation_head_size_reason

    platform = current_platform()
    gens = flash_generations(platform)
    if not gens:
        pytest.skip("no FlashAttention generation is installed here")
    q, k, v = make_qkv(1, 256, 2, head_size, BF16, seed=32)
    for gen in gens:
        impl = make_backend(AttentionBackendEnum.FA, platform, gen)
        declared = generation_head_size_reason(gen, platform, head_size) is None
        try:
            out, lse = impl.forward(q, k, v, return_lse=True)
            ran = True
        except Exception:  # the kernel refused the head size
            ran = False
        assert ran == declared, f"{gen} D={head_size}: declared {declared}, ran {ran}"
        if ran:
            ref, ref_lse = reference_attention(q, k, v, return_lse=True)
            assert rel_err(out, ref) < REL_TOL[BF16] and lse.shape == (1, 2, 256)
            assert float((lse.double() - ref_lse).abs().max()) < LSE_ATOL
