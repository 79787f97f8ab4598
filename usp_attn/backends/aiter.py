"""``aiter``: AMD's AI Tensor Engine kernels (ROCm). Chosen only on request.

``aiter.flash_attn_func`` takes ``[B, S, H, D]``, supports GQA and causal, and
returns the LSE with ``return_lse=True``. ``softmax_scale`` is always passed
through (the reference implementation dropped it for bf16).
"""

from __future__ import annotations

import importlib

from usp_attn.backends.base import HALF_DTYPES, AttentionBackend, finite_lse
from usp_attn.backends.enum import AttentionBackendEnum
from usp_attn.backends.flash_backward import aiter_backward

__all__ = ["AiterBackend"]


class AiterBackend(AttentionBackend):
    name = AttentionBackendEnum.AITER
    platform_kinds = frozenset({"rocm"})
    dtypes = HALF_DTYPES
    supports_gqa = True
    package = "aiter"

    @classmethod
    def head_size_reason(cls, platform, head_size):
        if head_size > 256 or head_size % 8:
            return f"aiter supports head sizes up to 256 in multiples of 8, not {head_size}"
        return None

    @classmethod
    def supports_lse(cls, platform) -> bool:
        return True

    def forward(self, q, k, v, *, causal=False, softmax_scale=None, attn_mask=None, return_lse=False):
        if attn_mask is not None:
            raise ValueError("aiter does not take attn_mask; route masked calls to torch_sdpa")
        fn = importlib.import_module("aiter").flash_attn_func
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        res = fn(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_lse=return_lse)
        if return_lse:
            return res[0], res[1]
        return res[0] if isinstance(res, tuple) else res

    # -- gradients ---------------------------------------------------------------------------
    @classmethod
    def supports_backward(cls, platform, kernel=None) -> bool:
        return True

    def backward(self, q, k, v, out, dout, lse, *, causal=False, softmax_scale=None, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("aiter does not take attn_mask; route masked calls to torch_sdpa")
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        return aiter_backward(q, k, v, out, dout, finite_lse(lse), causal=causal, scale=scale)
