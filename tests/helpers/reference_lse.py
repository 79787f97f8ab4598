"""fp64 attention that returns a differentiable log-sum-exp: the reference for ``return_lse=True``.

Same semantics as :func:`tests.helpers.reference.reference_attention` (``[B, S, H, D]``, GQA by
``h // (H // H_kv)``, any mask form, top-left causal), differentiable (``reference_grad.attention_fp64``
is its output); ``lse [B, H, S_q]`` is the natural log of
each row's softmax denominator over the scaled, masked scores. Rows with no visible key give
out 0 and lse -inf, and no gradient flows through them (the gradient of -inf is undefined: the
tests put no loss weight there).
"""

from __future__ import annotations

import math

import torch

from tests.helpers.reference import reference_mask_4d

__all__ = ["attention_lse_fp64", "finite"]


def attention_lse_fp64(q, k, v, *, scale=None, causal=False, mask=None):
    """``(out [B, S_q, H, D], lse [B, H, S_q])`` in float64, differentiable in q, k and v."""
    b, s_q, h, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    qt = q.double().permute(0, 2, 1, 3)
    kt = k.double().repeat_interleave(h // h_kv, dim=2).permute(0, 2, 1, 3)
    vt = v.double().repeat_interleave(h // h_kv, dim=2).permute(0, 2, 1, 3)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + reference_mask_4d(mask, batch=b, num_heads=h, s_q=s_q, s_k=s_k).to(scores.device)
    if causal:
        above = torch.arange(s_k, device=scores.device)[None, :] > torch.arange(s_q, device=scores.device)[:, None]
        scores = scores.masked_fill(above, -math.inf)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    safe = scores.masked_fill(empty, 0.0)
    lse = torch.logsumexp(safe, dim=-1).masked_fill(empty[..., 0], -math.inf)
    probs = torch.softmax(safe, dim=-1).masked_fill(empty, 0.0)
    return torch.matmul(probs, vt).permute(0, 2, 1, 3), lse


def finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with -inf rows replaced by 0 (differentiable elsewhere): what a loss may use."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype))
