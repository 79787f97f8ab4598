"""Attention whose replicated keys carry a key mask while the sharded keys carry none.

Joint text + video attention (HunyuanVideo, Qwen-Image, LTX) masks only the padding of the
text, which every rank holds as replicated rows; the video keys are all attended. The fast
kernels (FA4, cuDNN) take no mask, so one masked call over all keys would run the slow
memory-efficient kernel over the whole sequence. Instead (``USPAttention(...,
replicated_key_mask=...)``): the sharded keys run unmasked on the layer's kernel, the few
replicated keys masked on a kernel that takes masks, and the two partial results merge
exactly by their log-sum-exps ``l1``, ``l2``:

    lse = log(exp(l1) + exp(l2)),    out = exp(l1 - lse) * o1 + exp(l2 - lse) * o2

With ring_degree > 1 the ring does the same (the replicated keys are its local block); this
module is the ring_degree == 1 case. Differentiable: each call records its own backward, LSE
included, and the merge is torch ops.
"""

from __future__ import annotations

from usp_attn.kernels import BlockKernels
from usp_attn.masks import key_mask_4d
from usp_attn.ring.merge import merge

__all__ = ["attend_with_masked_replicated_keys"]


def attend_with_masked_replicated_keys(kernels: BlockKernels, q, k, v, text_k, text_v, text_mask, *,
                                       return_lse: bool = False):
    """``q [B, S_q, H, D]`` over ``k, v [B, S_k, H_kv, D]`` (no mask) and ``text_k, text_v
    [B, n, H_kv, D]`` under ``text_mask [B, n]`` (bool or additive). Returns ``out [B, S_q, H, D]``
    in q's dtype, and with ``return_lse`` the LSE ``[B, H, S_q]`` (fp32; fp64 for fp64 inputs)."""
    out_a, lse_a = kernels.attend(q, k, v, return_lse=True)
    out_b, lse_b = kernels.attend(q, text_k, text_v, mask=key_mask_4d(text_mask), return_lse=True)
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
