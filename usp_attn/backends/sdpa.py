"""``torch_sdpa``: PyTorch's own attention kernels, on every platform.

``F.scaled_dot_product_attention`` picks a sub-kernel by heuristics that prefer
torch's flash kernel, but on Hopper cuDNN attention is ~1.6x faster (570 vs 371 TFLOP/s on an H100, bf16),
and the public function cannot return the log-sum-exp that ring attention needs.
So on CUDA we call the aten sub-kernels directly, in this order:

    cuDNN   (SM90+, fp16/bf16, D <= 128, no mask)       fastest on Hopper, LSE optional
    flash   (SM80+, fp16/bf16, D <= 256, no mask)       LSE always computed
    efficient (any CUDA dtype, masks as additive bias)  LSE optional, padded to 32
    math    (anything else; also MPS when LSE is needed)

On CPU ``_scaled_dot_product_flash_attention_for_cpu`` returns the LSE. These aten
ops are registered operators (stable schemas used by torch's own context-parallel
code), not private Python functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from usp_attn.backends.base import (
    FLOAT_DTYPES,
    AttentionBackend,
    aligned_16,
    default_scale,
    dense_copy,
    expand_kv_heads,
    finite_lse,
)
from usp_attn.backends.enum import AttentionBackendEnum
from usp_attn.backends.sdpa_backward import cpu_flash_backward, cuda_fused_backward, math_backward
from usp_attn.masks import mask_to_additive, rows_with_keys

__all__ = ["TorchSDPABackend", "math_attention", "cuda_subkernel", "cuda_subkernels"]

_aten = torch.ops.aten


def math_attention(q, k, v, *, causal, scale, attn_mask=None, return_lse=False):
    """Plain attention in ``[B, S, H, D]``, computed in fp32 (fp64 for fp64 inputs); the
    fallback when no fused kernel fits. The LSE is returned as fp32 (fp64 for fp64 inputs,
    so a ring merge keeps their accuracy)."""
    h = q.shape[2]
    k = expand_kv_heads(k, h)
    v = expand_kv_heads(v, h)
    acc = torch.promote_types(q.dtype, torch.float32)  # never lose fp64 inputs' precision
    qf, kf, vf = (t.transpose(1, 2).to(acc) for t in (q, k, v))
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores + mask_to_additive(attn_mask, acc)
    if causal:
        s_q, s_k = scores.shape[-2:]
        keep = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Fully masked rows have lse = -inf; use 0 there so exp() gives 0, not NaN.
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


def cuda_subkernels(capability, dtype, head_size, has_mask) -> tuple[str, ...]:
    """The aten kernels that can run these properties on CUDA, in the static order
    (cuDNN > flash > memory-efficient > math)."""
    half = dtype in (torch.float16, torch.bfloat16)
    found = []
    if not has_mask and half and capability is not None:
        if capability >= (9, 0) and head_size <= 128 and head_size % 8 == 0:
            found.append("cudnn")
        if capability >= (8, 0) and head_size <= 256 and head_size % 8 == 0:
            found.append("flash")
    # The memory-efficient kernel has no fp64 and needs D aligned to 16 bytes' worth of
    # elements (8 for fp16/bf16, 4 for fp32); anything else would fail inside the aten op.
    if (half and head_size % 8 == 0) or (dtype == torch.float32 and head_size % 4 == 0):
        found.append("efficient")
    found.append("math")
    return tuple(found)


def cuda_subkernel(capability, dtype, head_size, has_mask) -> str:
    """Which aten kernel :class:`TorchSDPABackend` runs on CUDA for these properties by default."""
    return cuda_subkernels(capability, dtype, head_size, has_mask)[0]


class TorchSDPABackend(AttentionBackend):
    name = AttentionBackendEnum.TORCH_SDPA
    platform_kinds = frozenset({"cuda", "rocm", "mps", "cpu"})
    dtypes = FLOAT_DTYPES | {torch.float64}
    supports_gqa = True
    supports_mask = True

    @classmethod
    def supports_lse(cls, platform) -> bool:
        return True  # fused kernels where torch has them, the math path elsewhere

    @classmethod
    def kernels(cls, platform, head_size, dtype, *, need_mask=False):
        if platform.kind.value != "cuda":
            return ()
        # math is never faster than a fused kernel: not worth timing
        return tuple(k for k in cuda_subkernels(platform.capability, dtype, head_size, need_mask) if k != "math")

    def kernel_layout(self, t):
        # The aten CPU flash kernels take any other strides (broadcast ones included) but read
        # the head dim as unit-stride; the CUDA ones also load 16-byte vectors (the efficient
        # kernel checks that, the others assume it).
        if t.stride(-1) != 1 or (t.is_cuda and not aligned_16(t)):
            return dense_copy(t)
        return t

    def forward(self, q, k, v, *, causal=False, softmax_scale=None, attn_mask=None, return_lse=False):
        scale = default_scale(q.shape[-1], softmax_scale)
        device = q.device.type
        if device == "cpu":
            out, lse = self._cpu(q, k, v, causal, scale, attn_mask, return_lse)
        elif device == "cuda" and self.platform.kind.value == "cuda":
            out, lse = self._cuda(q, k, v, causal, scale, attn_mask, return_lse)
        elif return_lse:
            out, lse = math_attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=True)
        else:
            out, lse = self._public(q, k, v, causal, scale, attn_mask), None
        if attn_mask is not None:
            out, lse = _zero_fully_masked(out, lse, attn_mask, causal)
        return (out, lse) if return_lse else out

    # -- per device ------------------------------------------------------------------------
    @staticmethod
    def _public(q, k, v, causal, scale, attn_mask):
        h = q.shape[2]
        k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, is_causal=causal, scale=scale
        )
        return out.transpose(1, 2)

    def _cpu(self, q, k, v, causal, scale, attn_mask, return_lse):
        if not return_lse:
            return self._public(q, k, v, causal, scale, attn_mask), None
        if q.dtype == torch.float64 or (attn_mask is not None and attn_mask.shape[-2] not in (1, q.shape[1])):
            return math_attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=True)
        h = q.shape[2]
        k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
        bias = None if attn_mask is None else mask_to_additive(attn_mask, q.dtype)
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, attn_mask=bias, scale=scale
        )
        return out.transpose(1, 2), lse

    def _cuda(self, q, k, v, causal, scale, attn_mask, return_lse):
        h, s_q, d = q.shape[2], q.shape[1], q.shape[3]
        kernel = self.kernel
        if kernel is None or (attn_mask is not None and kernel in ("cudnn", "flash")):
            kernel = cuda_subkernel(self.platform.capability, q.dtype, d, attn_mask is not None)
        if kernel == "math":
            return math_attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=True)
        k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kernel == "cudnn":
            res = _aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, return_lse, 0.0, causal, False, scale=scale)
            out, lse = res[0], res[1]
        elif kernel == "flash":
            res = _aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)
            out, lse = res[0], res[1]
        else:
            bias = None if attn_mask is None else _aligned_bias(attn_mask, q.dtype, qt.shape, kt.shape[-2])
            res = _aten._scaled_dot_product_efficient_attention(qt, kt, vt, bias, return_lse, 0.0, causal, scale=scale)
            out, lse = res[0], res[1]
        if return_lse:
            if lse.dim() == 4:  # cuDNN returns [B, H, S, 1]
                lse = lse.squeeze(-1)
            lse = lse[..., :s_q]  # efficient pads the sequence to a multiple of 32
        return out.transpose(1, 2), (lse if return_lse else None)

    # -- gradients: the backward op of the sub-kernel the forward ran -----------------------
    @classmethod
    def supports_backward(cls, platform, kernel=None) -> bool:
        return True

    def backward(self, q, k, v, out, dout, lse, *, causal=False, softmax_scale=None, attn_mask=None):
        scale = default_scale(q.shape[-1], softmax_scale)
        lse = finite_lse(lse)
        args = (q, k, v, out, dout, lse)
        device = q.device.type
        if device == "cpu":
            per_query_mask = attn_mask is not None and attn_mask.shape[-2] not in (1, q.shape[1])
            if q.dtype != torch.float64 and not per_query_mask:
                bias = None if attn_mask is None else mask_to_additive(attn_mask, q.dtype)
                return cpu_flash_backward(*args, causal=causal, scale=scale, bias=bias)
        elif device == "cuda" and self.platform.kind.value == "cuda":
            kernel = self.kernel  # the sub-kernel the forward ran (same rule as _cuda)
            if kernel is None or (attn_mask is not None and kernel in ("cudnn", "flash")):
                kernel = cuda_subkernel(self.platform.capability, q.dtype, q.shape[3], attn_mask is not None)
            if kernel != "math":
                bias = None
                if attn_mask is not None:
                    bias = _aligned_bias(attn_mask, q.dtype, q.transpose(1, 2).shape, k.shape[1])
                return cuda_fused_backward(kernel, *args, causal=causal, scale=scale, bias=bias)
        return math_backward(*args, causal=causal, scale=scale, attn_mask=attn_mask)


def _aligned_bias(mask, dtype, q_shape, s_k):
    """Additive bias expanded to ``[B, H, S_q, S_k]`` whose row stride is 16-element aligned,
    as the memory-efficient kernel requires (torch's public SDPA pads the same way)."""
    bias = mask_to_additive(mask, dtype)
    pad = (-s_k) % 16
    if pad:
        bias = F.pad(bias, (0, pad))[..., :s_k]
    b, h, s_q, _ = q_shape
    return bias.expand(b, h, s_q, s_k)


def _zero_fully_masked(out, lse, attn_mask, causal):
    """Rows with no key to attend: output 0 and LSE -inf, whatever the kernel produced."""
    valid = rows_with_keys(attn_mask, causal)  # [B, 1|H, 1|S_q]
    out = torch.where(valid.transpose(1, 2)[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    if lse is not None:
        lse = torch.where(valid, lse, torch.full((), -math.inf, dtype=lse.dtype, device=lse.device))
    return out, lse
