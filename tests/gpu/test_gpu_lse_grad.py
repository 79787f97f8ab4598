"""Gradients through the returned LSE on the GPU's own backward kernels.

``block_backward`` (usp_attn/layers/attention_grad.py) gets the LSE's share of dq/dk from a
second call of the backend's backward with ``V = 0``, ``dO = e_0`` and ``O = -dlse * e_0``: exact
only if the kernel reads ``O`` solely through ``delta = rowsum(dO * O)``. The CPU kernels are
checked in tests/unit/test_return_lse.py; here every CUDA torch_sdpa sub-kernel (cuDNN, flash,
memory-efficient, math) and fa (when installed), keys in two blocks as the ring uses them, and
LocalAttention's recorded forward + backward, against fp64 autograd of a loss through the output
AND the LSE. Bounds: tests/gpu/test_gpu_backward.py's (the LSE term adds one more call of the
same kernel, rounded like the first).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.common import BF16, FP16, FP32, GPU, fa_with_backward, make_qkv, rel_err
from tests.helpers.reference_lse import attention_lse_fp64
from usp_attn import AttentionBackendEnum, LocalAttention, global_force_attn_backend_context_manager
from usp_attn.backends import BACKEND_CLASSES, make_backend
from usp_attn.backends.sdpa import cuda_subkernel
from usp_attn.kernels import block_backward
from usp_attn.platforms import current_platform

pytestmark = GPU

GRAD_TOL = {BF16: 2e-2, FP16: 4e-3, FP32: 1e-3, torch.float64: 1e-6}
B, S, H, H_KV = 2, 777, 8, 2
SDPA_CASES = [(BF16, 128), (FP16, 64), (BF16, 192), (FP32, 64), (torch.float64, 32)]


def _reference(q, k, v, dout, dlse, causal):
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = attention_lse_fp64(*ref, causal=causal)
    ((out * dout.double()).sum() + (lse * dlse.double()).sum()).backward()
    return [t.grad for t in ref]


def _blockwise(impl, q, k, v, dout, dlse, causal):
    out, lse = impl.forward(q, k, v, causal=causal, return_lse=True)
    cut = k.shape[1] // 3
    dq = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    dks, dvs = [], []
    for a, b in ((0, cut), (cut, k.shape[1])) if not causal else ((0, k.shape[1]),):
        bdq, bdk, bdv = block_backward(impl.backward, q, k[:, a:b], v[:, a:b], out, dout, lse, dlse, causal=causal)
        dq += bdq.double()
        dks.append(bdk)
        dvs.append(bdv)
    return dq, torch.cat(dks, 1), torch.cat(dvs, 1)


def _inputs(dtype, head_size, seed):
    q, k, v = make_qkv(B, S, H, head_size, dtype, h_kv=H_KV, seed=seed)
    dout = make_qkv(B, S, H, head_size, dtype, seed=seed + 1)[0]
    dlse = torch.randn(B, H, S, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed + 2))
    return q, k, v, dout, dlse


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,head_size", SDPA_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_sdpa_backward_with_dlse(dtype, head_size, causal):
    platform = current_platform()
    kernel = cuda_subkernel(platform.capability, dtype, head_size, False)
    q, k, v, dout, dlse = _inputs(dtype, head_size, 21)
    got = _blockwise(make_backend(AttentionBackendEnum.TORCH_SDPA, platform), q, k, v, dout, dlse, causal)
    errors = [rel_err(g, r) for g, r in zip(got, _reference(q, k, v, dout, dlse, causal))]
    assert max(errors) <= GRAD_TOL[dtype], (kernel, errors)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_fa_backward_with_dlse(dtype, causal):
    impl = fa_with_backward(dtype)
    q, k, v, dout, dlse = _inputs(dtype, 128, 23)
    got = _blockwise(impl, q, k, v, dout, dlse, causal)
    errors = [rel_err(g, r) for g, r in zip(got, _reference(q, k, v, dout, dlse, causal))]
    assert max(errors) <= GRAD_TOL[dtype], (impl.generation, errors)


@pytest.mark.parametrize("backend", [AttentionBackendEnum.TORCH_SDPA, AttentionBackendEnum.FA], ids=str)
def test_local_attention_loss_through_lse(backend):
    reason = BACKEND_CLASSES[backend].unsupported_reason(current_platform(), 128, BF16, need_lse=True)
    if reason:
        pytest.skip(f"{backend} cannot run here: {reason}")
    q, k, v, dout, dlse = _inputs(BF16, 128, 25)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    layer = LocalAttention(H, 128, H_KV, causal=True)
    with global_force_attn_backend_context_manager(backend):
        out, lse = layer(q, k, v, return_lse=True)
    assert layer.backend == backend and lse.dtype == torch.float32
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    errors = [rel_err(t.grad, r) for t, r in zip((q, k, v), _reference(q, k, v, dout, dlse, True))]
    assert max(errors) <= GRAD_TOL[BF16], errors
