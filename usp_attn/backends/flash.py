"""``fa``: FlashAttention, generation chosen by the GPU and what is installed.

    FA4  ``flash_attn.cute``        Blackwell (SM100+)        hdim 64/96/128
    FA3  ``flash_attn_interface``   Hopper (SM90)             hdim <= 256, multiple of 8
    FA2  ``flash_attn``             SM80+ CUDA, or ROCm build hdim <= 256, multiple of 8

All take ``[B, S, H, D]`` natively, support GQA and causal, and return the LSE
(``[B, H, S]`` fp32). None takes an arbitrary mask; masked calls go to a backend
that does (the layer handles that). Packages are imported on first use only.
"""

from __future__ import annotations

import importlib

from usp_attn.backends.base import HALF_DTYPES, AttentionBackend, default_scale, finite_lse
from usp_attn.backends.enum import AttentionBackendEnum
from usp_attn.backends.flash_backward import flash_backward

__all__ = ["FlashAttentionBackend", "flash_generation"]


def flash_generation(platform) -> str | None:
    """``"fa4"``, ``"fa3"``, ``"fa2"`` or ``None``: the newest generation this platform can run."""
    kind = platform.kind.value
    if kind == "rocm":
        return "fa2" if platform.has_package("flash_attn") else None
    if kind != "cuda" or platform.capability is None or platform.capability < (8, 0):
        return None
    major = platform.capability[0]
    if major >= 10 and platform.has_package("flash_attn.cute"):
        return "fa4"
    if major == 9 and platform.has_package("flash_attn_interface"):
        return "fa3"
    if platform.has_package("flash_attn"):
        return "fa2"
    return None


class FlashAttentionBackend(AttentionBackend):
    name = AttentionBackendEnum.FA
    platform_kinds = frozenset({"cuda", "rocm"})
    dtypes = HALF_DTYPES
    supports_gqa = True

    @classmethod
    def machine_reason(cls, platform):
        reason = super().machine_reason(platform)
        if reason:
            return reason
        cap = platform.capability
        if platform.kind.value == "cuda" and (cap is None or cap < (8, 0)):
            return f"fa needs compute capability >= 8.0, this GPU is {cap[0]}.{cap[1]}" if cap else "fa needs SM80+"
        if flash_generation(platform) is None:
            wanted = "flash_attn (ROCm build)" if platform.kind.value == "rocm" else _wanted_package(cap)
            return f"fa needs the {wanted} package, which is not installed"
        return None

    @classmethod
    def head_size_reason(cls, platform, head_size):
        gen = flash_generation(platform)
        if gen == "fa4" and head_size not in (64, 96, 128):
            return f"fa (FA4) supports head sizes 64, 96 and 128, not {head_size}"
        if head_size > 256 or head_size % 8:
            return f"fa ({gen.upper() if gen else 'FA'}) supports head sizes up to 256 in multiples of 8, not {head_size}"
        return None

    @classmethod
    def supports_lse(cls, platform) -> bool:
        return True

    def __init__(self, platform):
        super().__init__(platform)
        self.generation = flash_generation(platform)
        self._fn = None

    def _function(self):
        if self._fn is None:
            module = {"fa4": "flash_attn.cute", "fa3": "flash_attn_interface", "fa2": "flash_attn"}[self.generation]
            self._fn = importlib.import_module(module).flash_attn_func
        return self._fn

    def forward(self, q, k, v, *, causal=False, softmax_scale=None, attn_mask=None, return_lse=False):
        if attn_mask is not None:
            raise ValueError("fa does not take attn_mask; route masked calls to torch_sdpa")
        fn = self._function()
        if self.generation == "fa2":
            res = fn(q, k, v, softmax_scale=softmax_scale, causal=causal, return_attn_probs=return_lse)
            return (res[0], res[1]) if return_lse else res
        res = fn(q, k, v, softmax_scale=softmax_scale, causal=causal)
        # FA3/FA4 return (out, lse) in most releases, only out in some.
        if isinstance(res, tuple):
            out, lse = res[0], res[1]
        else:
            out, lse = res, None
            if return_lse:
                out, lse = fn(q, k, v, softmax_scale=softmax_scale, causal=causal, return_attn_probs=True)[:2]
        return (out, lse) if return_lse else out

    # -- gradients: each generation's own backward kernel ------------------------------------
    @classmethod
    def supports_backward(cls, platform) -> bool:
        gen = flash_generation(platform)
        if gen == "fa4":  # FA4's backward kernels exist for SM90 and newer only
            return platform.capability is not None and platform.capability >= (9, 0)
        return gen is not None

    def backward(self, q, k, v, out, dout, lse, *, causal=False, softmax_scale=None, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("fa does not take attn_mask; route masked calls to torch_sdpa")
        scale = default_scale(q.shape[-1], softmax_scale)
        return flash_backward(self.generation, q, k, v, out, dout, finite_lse(lse), causal=causal, scale=scale)


def _wanted_package(capability) -> str:
    if capability and capability[0] >= 10:
        return "flash_attn.cute (FA4) or flash_attn"
    if capability and capability[0] == 9:
        return "flash_attn_interface (FA3) or flash_attn"
    return "flash_attn"
