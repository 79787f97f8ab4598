"""Backward kernels of ``torch_sdpa``: the aten backward op matching each forward sub-kernel.

Every function takes one key block and the output / log-sum-exp of the WHOLE query row
(see :meth:`AttentionBackend.backward`) and returns that block's ``dq, dk, dv``:

    P  = exp(scale * q k^T + bias - lse)          this block's exact probabilities
    dv = P^T dout
    dS = P * (dout v^T - rowsum(dout * out))      rowsum over the head dim: the "delta" term
    dq = scale * dS k          dk = scale * dS^T q

The fused ops compute exactly this from ``(q, k, v, out, dout, lse)``; :func:`math_backward`
writes it out for the cases no fused op covers (fp64, MPS, ROCm, per-query masks).
``lse`` arrives with ``+inf`` on rows that have no key at all (:func:`finite_lse`), so their
probabilities and gradients are 0. All tensors are ``[B, S, H, D]`` at this interface;
the aten ops take ``[B, H, S, D]`` views and GQA kv heads expanded to ``H`` (their gradients
are summed back per kv head).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from usp_attn.backends.base import expand_kv_heads, sum_kv_heads
from usp_attn.masks import mask_to_additive

__all__ = ["math_backward", "cpu_flash_backward", "cuda_fused_backward"]

_aten = torch.ops.aten


def math_backward(q, k, v, out, dout, lse, *, causal, scale, attn_mask=None):
    """The backward of :func:`~usp_attn.backends.sdpa.math_attention`, in fp32 (fp64 for fp64)."""
    h, h_kv = q.shape[2], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, of, gf = (
        t.transpose(1, 2).to(acc) for t in (q, expand_kv_heads(k, h), expand_kv_heads(v, h), out, dout)
    )
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores + mask_to_additive(attn_mask, acc)
    if causal:
        s_q, s_k = scores.shape[-2:]
        above = torch.arange(s_k, device=q.device)[None, :] > torch.arange(s_q, device=q.device)[:, None]
        scores = scores.masked_fill(above, float("-inf"))
    probs = torch.exp(scores - lse.to(acc)[..., None])  # [B, H, S_q, S_k]
    delta = (gf * of).sum(dim=-1, keepdim=True)
    dscores = probs * (torch.matmul(gf, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(dscores, kf) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), qf) * scale
    dv = torch.matmul(probs.transpose(-1, -2), gf)
    dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    return dq.to(q.dtype), sum_kv_heads(dk, h_kv).to(k.dtype), sum_kv_heads(dv, h_kv).to(v.dtype)


def cpu_flash_backward(q, k, v, out, dout, lse, *, causal, scale, bias=None):
    """``_scaled_dot_product_flash_attention_for_cpu_backward`` (the CPU flash forward's op)."""
    h, h_kv = q.shape[2], k.shape[2]
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2), expand_kv_heads(k, h).transpose(1, 2),
        expand_kv_heads(v, h).transpose(1, 2), out.transpose(1, 2), lse, 0.0, causal,
        attn_mask=bias, scale=scale,
    )
    return dq.transpose(1, 2), sum_kv_heads(dk.transpose(1, 2), h_kv), sum_kv_heads(dv.transpose(1, 2), h_kv)


def cuda_fused_backward(kernel, q, k, v, out, dout, lse, *, causal, scale, bias=None):
    """The CUDA aten backward matching forward sub-kernel ``kernel`` (``cudnn``/``flash``/``efficient``).

    Dropout is 0, so the philox seed/offset the ops take are never read; empty tensors
    stand in for the ones the forward returned. ``bias`` (efficient only) is the aligned
    ``[B, H, S_q, S_k]`` additive mask the forward used.
    """
    h, h_kv = q.shape[2], k.shape[2]
    s_q, s_k = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), expand_kv_heads(k, h).transpose(1, 2), expand_kv_heads(v, h).transpose(1, 2)
    # The output and its gradient in the layout the forward ops write ([B, S, H, D] in memory): the efficient
    # backward reads an `out` laid out [B, H, S, D] in memory wrongly, without an error (dq and dk off by 15-50 %
    # on an H200, or an illegal memory access), and a masked forward's zeroing of empty rows can return that layout.
    ot, gt = out.contiguous().transpose(1, 2), dout.contiguous().transpose(1, 2)
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    offset = torch.empty((), dtype=torch.int64, device=q.device)
    if kernel == "cudnn":
        if _cudnn_lse_is_4d(q.device.index or 0):
            lse = lse[..., None]
        dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
            gt, qt, kt, vt, ot, lse, seed, offset, None, None, None, s_q, s_k, 0.0, causal, scale=scale
        )
    elif kernel == "flash":
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            gt, qt, kt, vt, ot, lse, None, None, s_q, s_k, 0.0, causal, seed, offset, scale=scale
        )
    elif kernel == "efficient":
        # The forward allocates the LSE padded to a multiple of 32 rows; keep that layout.
        pad = (-s_q) % 32
        lse_padded = F.pad(lse, (0, pad), value=float("inf")) if pad else lse
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            gt, qt, kt, vt, bias, ot, lse_padded, seed, offset, 0.0, [True, True, True, False], causal, scale=scale
        )
    else:
        raise ValueError(f"no fused CUDA backward for sub-kernel {kernel!r}")
    return dq.transpose(1, 2), sum_kv_heads(dk.transpose(1, 2), h_kv), sum_kv_heads(dv.transpose(1, 2), h_kv)


@functools.lru_cache(maxsize=None)
def _cudnn_lse_is_4d(device_index: int) -> bool:
    """Whether this torch's cuDNN attention returns (and its backward takes) the LSE as
    ``[B, H, S, 1]`` (older releases) rather than ``[B, H, S]``: asked once per device
    with a tiny forward call, since the backward must get the forward's own layout."""
    x = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16, device=torch.device("cuda", device_index))
    lse = _aten._scaled_dot_product_cudnn_attention(x, x, x, None, True, 0.0, False, False, scale=0.125)[1]
    return lse.dim() == 4
