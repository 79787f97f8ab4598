"""``sage_attn`` and ``sage_attn_3``: quantised attention from SageAttention.

SageAttention quantises K to INT8 after "smoothing" it: subtracting the mean key
``m`` of each (batch, head). Softmax is unchanged because every score of a query row
shifts by the same ``q·m``. Version 1 smooths by ``k -= m`` **in place on the
caller's tensor**; we therefore smooth out of place ourselves and pass
``smooth_k=False``, which also tells us the shift needed to correct the LSE:

    lse(q, k) = lse(q, k - m) + scale * (q · m)

SageAttention3 (Blackwell, FP4) takes no scale argument: it always uses D**-0.5,
so a custom ``softmax_scale`` is honoured by scaling q by ``softmax_scale * sqrt(D)``.
"""

from __future__ import annotations

import importlib

import torch

from usp_attn.backends.base import HALF_DTYPES, AttentionBackend
from usp_attn.backends.enum import AttentionBackendEnum

__all__ = ["SageAttentionBackend", "SageAttention3Backend", "sage_major_version"]


def sage_major_version(platform) -> int | None:
    version = platform.package_version("sageattention")
    if version is None:
        return None
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 2  # unknown version string: assume the current (2.x) API


class SageAttentionBackend(AttentionBackend):
    name = AttentionBackendEnum.SAGE_ATTN
    platform_kinds = frozenset({"cuda"})
    dtypes = HALF_DTYPES
    package = "sageattention"
    head_sizes = (64, 96, 128)

    @classmethod
    def machine_reason(cls, platform):
        reason = super().machine_reason(platform)
        if reason:
            return reason
        if platform.capability is None or platform.capability < (8, 0):
            return "sage_attn needs compute capability >= 8.0"
        return None

    @classmethod
    def head_size_reason(cls, platform, head_size):
        if head_size not in cls.head_sizes:
            return f"sage_attn supports head sizes {', '.join(map(str, cls.head_sizes))}, not {head_size}"
        return None

    @classmethod
    def supports_lse(cls, platform) -> bool:
        return (sage_major_version(platform) or 0) >= 2  # v1 has no return_lse

    def forward(self, q, k, v, *, causal=False, softmax_scale=None, attn_mask=None, return_lse=False):
        if attn_mask is not None:
            raise ValueError("sage_attn does not take attn_mask; route masked calls to torch_sdpa")
        sageattn = importlib.import_module("sageattention").sageattn
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        k_mean = k.mean(dim=1, keepdim=True)  # [B, 1, H, D]
        k_smooth = k - k_mean  # new tensor: the caller's k is never touched
        kwargs = dict(tensor_layout="NHD", is_causal=causal, sm_scale=scale, smooth_k=False)
        if not return_lse:
            return sageattn(q, k_smooth, v, **kwargs)
        out, lse = sageattn(q, k_smooth, v, return_lse=True, **kwargs)
        shift = torch.einsum("bshd,bhd->bhs", q.float(), k_mean[:, 0].float()) * scale
        return out, lse.float() + shift


class SageAttention3Backend(AttentionBackend):
    name = AttentionBackendEnum.SAGE_ATTN_3
    platform_kinds = frozenset({"cuda"})
    dtypes = HALF_DTYPES
    package = "sageattn3"

    @classmethod
    def machine_reason(cls, platform):
        reason = super().machine_reason(platform)
        if reason:
            return reason
        if platform.capability is None or platform.capability[0] < 10:
            return "sage_attn_3 (SageAttention3) needs a Blackwell GPU (compute capability >= 10.0)"
        return None

    @classmethod
    def head_size_reason(cls, platform, head_size):
        if head_size not in (64, 128):
            return f"sage_attn_3 supports head sizes 64 and 128, not {head_size}"
        return None

    def forward(self, q, k, v, *, causal=False, softmax_scale=None, attn_mask=None, return_lse=False):
        if attn_mask is not None or return_lse:
            raise ValueError("sage_attn_3 supports neither attn_mask nor return_lse")
        kernel = importlib.import_module("sageattn3").sageattn3_blackwell
        d = q.shape[-1]
        if softmax_scale is not None and abs(softmax_scale * d**0.5 - 1.0) > 1e-12:
            q = q * (softmax_scale * d**0.5)
        out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)
