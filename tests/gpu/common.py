"""Shared pieces of the GPU tests: the skip marker, inputs and the error bounds.

Errors are relative: ‖out − ref‖ / ‖ref‖ against the fp64 reference computed from the
*same* low-precision inputs (tests/helpers/reference.py), so input rounding is not
counted, only the kernel's own arithmetic. Bounds:

* bf16 1e-2: the output is rounded to bf16 (2**-9 relative) and fused kernels round the
  softmax probabilities to bf16 before P·V; measured on an H100: 2.2e-3 for flash, cuDNN
  and efficient at S=2048. 1e-2 is 4-5x that, and an fp16/bf16 mix-up of V or a lost
  scale gives errors far above it.
* fp16 2e-3: the same roundings with 3 more mantissa bits (8x finer), plus margin.
* fp32 1e-3: exact fp32 arithmetic errs ~1e-6; TF32 matrix units, if a kernel uses them,
  ~3e-4. Any half-precision step would exceed it.
* SageAttention 3e-2 (bf16 and fp16): it quantises Q and K to INT8 per block;
  measured 1.3e-2 on an H100.
* LSE: max absolute error 1e-3. It is accumulated in fp32 from exact inputs (~1e-5
  here); a log-sum-exp kept in bf16 would be off by ~2e-2 at |lse| ~ 8.
"""

from __future__ import annotations

import pytest
import torch

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
REL_TOL = {BF16: 1e-2, FP16: 2e-3, FP32: 1e-3}
SAGE_TOL = 3e-2
LSE_ATOL = 1e-3

GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none"),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def make_qkv(b, s, h, d, dtype, *, h_kv=None, s_k=None, seed=0):
    """Standard-normal ``[B, S, H, D]`` q and ``[B, S_k, H_kv, D]`` k, v on the GPU (never zeros)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    h_kv = h if h_kv is None else h_kv
    s_k = s if s_k is None else s_k
    q = torch.randn(b, s, h, d, generator=g, device="cuda").to(dtype)
    k = torch.randn(b, s_k, h_kv, d, generator=g, device="cuda").to(dtype)
    v = torch.randn(b, s_k, h_kv, d, generator=g, device="cuda").to(dtype)
    return q, k, v


def key_padding_mask(b, s_k, *, seed=1, drop=0.3, empty_batch=None):
    """bool ``[B, S_k]`` (True = attend); ``empty_batch`` masks every key of that batch entry."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, s_k, generator=g) > drop
    mask[:, 0] = True
    if empty_batch is not None:
        mask[empty_batch] = False
    return mask.cuda()


def fa_with_backward(dtype: torch.dtype):
    """This GPU's ``fa`` backend, or a skip saying why it cannot run a backward with the LSE at ``dtype`` here."""
    from usp_attn import AttentionBackendEnum
    from usp_attn.backends import BACKEND_CLASSES, make_backend
    from usp_attn.platforms import current_platform

    reason = BACKEND_CLASSES[AttentionBackendEnum.FA].unsupported_reason(current_platform(), 128, dtype, need_lse=True)
    if reason:
        pytest.skip(f"fa cannot run here: {reason}")
    impl = make_backend(AttentionBackendEnum.FA, current_platform())
    if not impl.supports_backward(impl.platform):
        pytest.skip(f"fa ({impl.generation}) has no backward on this GPU")
    return impl
