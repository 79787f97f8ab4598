"""fp64 autograd of full attention: the gradient reference for the layers' backward.

Same semantics as :func:`tests.helpers.reference.reference_attention` (``[B, S, H, D]``,
GQA by ``h // (H // H_kv)``, any mask form, top-left causal, rows with no visible key
give 0), but differentiable: the probabilities are a plain softmax in float64, and rows
with no visible key are computed from all-zero scores and then zeroed, so their
gradients are exactly 0 instead of NaN.
"""

from __future__ import annotations

import math

import torch

from tests.helpers.reference import reference_mask_4d

__all__ = ["attention_fp64", "reference_grads"]


def attention_fp64(q, k, v, *, scale=None, causal=False, mask=None):
    """Differentiable fp64 attention: q ``[B, S_q, H, D]``, k/v ``[B, S_k, H_kv, D]`` (float64)."""
    b, s_q, h, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    qt = q.permute(0, 2, 1, 3)
    kt = k.repeat_interleave(h // h_kv, dim=2).permute(0, 2, 1, 3)
    vt = v.repeat_interleave(h // h_kv, dim=2).permute(0, 2, 1, 3)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + reference_mask_4d(mask, batch=b, num_heads=h, s_q=s_q, s_k=s_k).to(scores.device)
    if causal:
        above = torch.arange(s_k, device=q.device)[None, :] > torch.arange(s_q, device=q.device)[:, None]
        scores = scores.masked_fill(above, -math.inf)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.matmul(probs, vt).permute(0, 2, 1, 3)


def reference_grads(q, k, v, dout, **kwargs):
    """``(out, dq, dk, dv)`` in float64 for the loss ``sum(out * dout)``."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention_fp64(q64, k64, v64, **kwargs)
    out.backward(dout.detach().double())
    return out.detach(), q64.grad, k64.grad, v64.grad
