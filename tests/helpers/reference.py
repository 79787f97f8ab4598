"""An fp64 reference for attention, written independently of ``usp_attn`` so tests can
compare any backend or layer against it.

Layout and semantics match the layers' public contract:

    q: ``[B, S_q, H, D]``; k, v: ``[B, S_k, H_kv, D]`` with ``H % H_kv == 0`` (GQA/MQA:
       query head ``h`` reads kv head ``h // (H // H_kv)``).
    mask (``True`` / finite = attend), any of:
       bool ``[B, S_k]``, bool ``[B, S_q, S_k]``, bool ``[B, 1 | H, S_q, S_k]``, or a
       float tensor of one of those shapes added to the scaled scores (``-inf`` = masked).
    causal: query ``i`` sees keys ``j <= i`` (top-left aligned; the layers require
       ``S_q == S_k`` for causal, where this is the usual lower triangle).

Everything is computed in float64 from the inputs as given (upcast, no rounding), so for
low-precision inputs the comparison measures only the kernel's own error.
"""

from __future__ import annotations

import math

import torch

__all__ = ["reference_attention", "reference_mask_4d"]


def reference_mask_4d(mask: torch.Tensor, *, batch: int, num_heads: int, s_q: int, s_k: int) -> torch.Tensor:
    """Any accepted mask form -> float64 additive bias ``[B, H, S_q, S_k]`` (0 or -inf for bool)."""
    if mask.dim() == 2:
        m = mask[:, None, None, :]
    elif mask.dim() == 3:
        m = mask[:, None, :, :]
    elif mask.dim() == 4:
        m = mask
    else:
        raise ValueError(f"reference: unsupported mask shape {list(mask.shape)}")
    m = m.expand(batch, num_heads, s_q, s_k)
    if m.dtype == torch.bool:
        bias = torch.zeros(m.shape, dtype=torch.float64, device=m.device)
        return bias.masked_fill(~m, -math.inf)
    return m.to(torch.float64)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float64.

    Args:
        q: ``[B, S_q, H, D]``; k, v: ``[B, S_k, H_kv, D]`` (any floating dtype).
        scale: multiplies ``q·k`` (default ``D ** -0.5``).
        causal: hide keys ``j > i`` from query ``i``.
        mask: optional mask in any form listed in the module docstring.
        return_lse: also return the natural-log log-sum-exp of the scaled, masked scores.

    Returns:
        out ``[B, S_q, H, D]`` float64; rows with no visible key are exactly 0.
        With ``return_lse``: ``(out, lse)``, lse ``[B, H, S_q]`` float64, ``-inf`` on such rows.
    """
    b, s_q, h, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    if h % h_kv:
        raise ValueError(f"reference: H={h} is not a multiple of H_kv={h_kv}")
    group = h // h_kv
    scale = d**-0.5 if scale is None else float(scale)

    qd = q.detach().to(torch.float64).permute(0, 2, 1, 3)  # [B, H, S_q, D]
    kd = k.detach().to(torch.float64).repeat_interleave(group, dim=2).permute(0, 2, 1, 3)  # [B, H, S_k, D]
    vd = v.detach().to(torch.float64).repeat_interleave(group, dim=2).permute(0, 2, 1, 3)

    scores = torch.einsum("bhqd,bhkd->bhqk", qd, kd) * scale
    if mask is not None:
        scores = scores + reference_mask_4d(mask.detach(), batch=b, num_heads=h, s_q=s_q, s_k=s_k)
    if causal:
        visible = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, -math.inf)

    lse = torch.logsumexp(scores, dim=-1)  # [B, H, S_q]; -inf where no key is visible
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse)[..., None])  # exp(-inf) = 0 on empty rows
    out = torch.einsum("bhqk,bhkd->bhqd", probs, vd).permute(0, 2, 1, 3).contiguous()  # [B, S_q, H, D]
    return (out, lse) if return_lse else out
