"""Backward kernels on the GPU: every torch_sdpa sub-kernel and fa (when installed), used the
way the ring uses them (keys in two blocks, each given the output and LSE of the whole row),
and LocalAttention's recorded forward + backward, against fp64 autograd of full attention.

Bounds (relative norm error, tests/gpu/common.py's metric): gradients go through two more
half-precision roundings than the output (the probabilities and dS are rounded before
their matrix products), so bf16/fp16 get twice the forward bound: 2e-2 / 4e-3; fp32 1e-3
(TF32 matrix units); fp64 (math path, LSE kept in fp32) 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.common import BF16, FP16, FP32, GPU, fa_with_backward, key_padding_mask, make_qkv, rel_err
from tests.helpers.reference_grad import reference_grads
from usp_attn import AttentionBackendEnum, LocalAttention, global_force_attn_backend_context_manager
from usp_attn.backends import BACKEND_CLASSES, make_backend
from usp_attn.backends.sdpa import cuda_subkernel
from usp_attn.masks import normalize_mask
from usp_attn.platforms import current_platform

pytestmark = GPU

GRAD_TOL = {BF16: 2e-2, FP16: 4e-3, FP32: 1e-3, torch.float64: 1e-6}
B, S, H, H_KV = 2, 777, 8, 2  # S not a multiple of any tile; GQA

# (dtype, head size, masked) -> the sub-kernel torch_sdpa runs (cuda_subkernel decides)
SDPA_CASES = [(BF16, 128, False), (FP16, 64, False), (BF16, 192, False), (BF16, 128, True), (FP32, 64, False),
              (torch.float64, 32, False)]


def _blockwise(impl, q, k, v, dout, mask, causal):
    out, lse = impl.forward(q, k, v, causal=causal, attn_mask=mask, return_lse=True)
    cut = k.shape[1] // 3
    dq = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    dks, dvs = [], []
    for a, b in ((0, cut), (cut, k.shape[1])) if not causal else ((0, k.shape[1]),):
        m = None if mask is None else mask[..., a:b]
        bdq, bdk, bdv = impl.backward(q, k[:, a:b], v[:, a:b], out, dout, lse, causal=causal, attn_mask=m)
        dq += bdq.double()
        dks.append(bdk)
        dvs.append(bdv)
    return dq, torch.cat(dks, 1), torch.cat(dvs, 1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,head_size,masked", SDPA_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_sdpa_backward_blockwise(dtype, head_size, masked, causal):
    platform = current_platform()
    kernel = cuda_subkernel(platform.capability, dtype, head_size, masked)
    q, k, v = make_qkv(B, S, H, head_size, dtype, h_kv=H_KV, seed=11)
    dout = make_qkv(B, S, H, head_size, dtype, seed=12)[0]
    keep = key_padding_mask(B, S, empty_batch=None) if masked else None
    mask = None if keep is None else normalize_mask(keep, batch=B, num_heads=H, s_q=S, s_k=S, dtype=dtype,
                                                    device=q.device)
    got = _blockwise(make_backend(AttentionBackendEnum.TORCH_SDPA, platform), q, k, v, dout, mask, causal)
    _, *ref = reference_grads(q, k, v, dout, causal=causal, mask=keep)
    errors = [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errors) <= GRAD_TOL[dtype], (kernel, errors)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_fa_backward_blockwise(dtype, causal):
    impl = fa_with_backward(dtype)
    q, k, v = make_qkv(B, S, H, 128, dtype, h_kv=H_KV, seed=13)
    dout = make_qkv(B, S, H, 128, dtype, seed=14)[0]
    got = _blockwise(impl, q, k, v, dout, None, causal)
    _, *ref = reference_grads(q, k, v, dout, causal=causal)
    errors = [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errors) <= GRAD_TOL[dtype], (impl.generation, errors)


@pytest.mark.parametrize("backend", [AttentionBackendEnum.TORCH_SDPA, AttentionBackendEnum.FA], ids=str)
def test_local_attention_training_step(backend):
    reason = BACKEND_CLASSES[backend].unsupported_reason(current_platform(), 128, BF16)
    if reason:
        pytest.skip(f"{backend} cannot run here: {reason}")
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2048, H, 128, BF16, h_kv=H_KV, seed=15))
    dout = make_qkv(1, 2048, H, 128, BF16, seed=16)[0]
    layer = LocalAttention(H, 128, H_KV, causal=True)
    with global_force_attn_backend_context_manager(backend):
        out = layer(q, k, v)
    assert layer.backend == backend
    out.backward(dout)
    _, *ref = reference_grads(q, k, v, dout, causal=True)
    errors = [rel_err(t.grad, r) for t, r in zip((q, k, v), ref)]
    assert max(errors) <= GRAD_TOL[BF16], errors


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_per_head_mask_gradients_through_the_layer(dtype):
    """A mask that differs per head ([B, H, S_q, S_k]) under autograd: the masked forward's zeroing of empty rows
    returned its output laid out [B, H, S, D] in memory, which the efficient backward read wrongly without an
    error (dq, dk off by 15-50 % on an H200 before the backward put `out` back in the forward's layout)."""
    s, h, d = 480, 4, 64
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(B, h, s, s, generator=gen) > 0.5
    keep[..., 0] = True
    keep = keep.cuda()
    q, k, v = (t.requires_grad_() for t in make_qkv(B, s, h, d, dtype, seed=13))
    dout = make_qkv(B, s, h, d, dtype, seed=14)[0]
    with global_force_attn_backend_context_manager(AttentionBackendEnum.TORCH_SDPA):
        out = LocalAttention(h, d)(q, k, v, attn_mask=keep)
    got = torch.autograd.grad(out, (q, k, v), dout)
    _, *ref = reference_grads(q, k, v, dout, mask=keep)
    errors = [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errors) <= GRAD_TOL[dtype], errors
