"""Attention-mask forms accepted by the layers, normalised to one broadcastable shape.

Accepted forms (``True`` = this query may attend this key):
    * bool ``[B, S_k]``               key padding (the usual DiT/text case)
    * bool ``[B, S_q, S_k]``          per-query mask
    * bool ``[B, 1 | H, S_q, S_k]``   per-head mask
    * bool ``[B, 1 | H, 1, S_k]``      broadcast over the queries (SDPA's key-padding form)
    * float with any of those shapes: additive bias (``-inf`` = masked)

Normalised form: a 4-D tensor broadcastable to ``[B, H, S_q, S_k]`` (dims of size 1
where the input had none), bool or the query's floating dtype. Kernels differ on
rows whose keys are all masked (NaN, 0, or garbage log-sum-exp), so backends use
:func:`rows_with_keys` to define those rows as output 0 and LSE ``-inf``.
"""

from __future__ import annotations

import torch

__all__ = ["normalize_mask", "rows_with_keys", "mask_to_additive", "describe_mask_forms"]


def describe_mask_forms() -> str:
    return "bool or float with shape [B, S_k], [B, S_q, S_k] or [B, 1|H, 1|S_q, S_k]"


def normalize_mask(
    mask: torch.Tensor,
    *,
    batch: int,
    num_heads: int,
    s_q: int,
    s_k: int,
    dtype: torch.dtype,
    device: torch.device,
    arg_name: str = "attn_mask",
) -> torch.Tensor:
    """Validate ``mask`` and return it as a 4-D tensor broadcastable to ``[B, H, S_q, S_k]``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{arg_name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device.type != torch.device(device).type:
        raise ValueError(f"{arg_name} is on {mask.device} but q is on {device}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{arg_name} must be bool (True = attend) or floating (additive), got {mask.dtype}")
    shape = tuple(mask.shape)
    if mask.dim() == 2 and shape == (batch, s_k):
        out = mask[:, None, None, :]
    elif mask.dim() == 3 and shape == (batch, s_q, s_k):
        out = mask[:, None, :, :]
    elif mask.dim() == 4 and shape[0] == batch and shape[1] in (1, num_heads) and shape[2] in (1, s_q) \
            and shape[3] == s_k:
        out = mask
    else:
        raise ValueError(
            f"{arg_name} has shape {list(shape)}; expected {describe_mask_forms()} "
            f"with B={batch}, H={num_heads}, S_q={s_q}, S_k={s_k}"
        )
    if out.is_floating_point() and out.dtype != dtype:
        out = out.to(dtype)
    return out


def mask_to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive bias (0 / -inf) in ``dtype``; float masks pass through."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))


def rows_with_keys(mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """``[B, 1|H, 1|S_q]`` bool: which query rows have at least one key they may attend.

    With ``causal`` (S_q == S_k), row i may only use keys 0..i, so a row can be empty
    even though the mask alone allows some key.
    """
    allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
    if not causal:
        return allowed.any(dim=-1)
    if allowed.shape[-2] == 1:  # key-padding form: row i is valid iff any key <= i is allowed
        return allowed[..., 0, :].cummax(dim=-1).values
    s_k = allowed.shape[-1]
    keep = torch.ones(allowed.shape[-2], s_k, dtype=torch.bool, device=allowed.device).tril()
    return (allowed & keep).any(dim=-1)
