"""Attention-mask forms accepted by the layers, normalised to one broadcastable shape.

Accepted forms (``True`` = this query may attend this key):
    * bool ``[B, S_k]``               key padding (the usual DiT/text case)
    * bool ``[B, S_q, S_k]``          per-query mask
    * bool ``[B, 1 | H, S_q, S_k]``   per-head mask
    * bool ``[B, 1 | H, 1, S_k]``      broadcast over the queries (SDPA's key-padding form)
    * float with any of those shapes: additive bias (``-inf`` = masked)

Under sequence parallelism (:func:`sp_key_mask`) only key masks are accepted, ``[B, S_local_k]``
or ``[B, 1, 1, S_local_k]``: they follow k's rows, so each rank holds the columns of its
own keys and they can travel with the keys. A per-query mask (``[B, S_q, S_k]``,
``[B, H, S_q, S_k]``) would need every query row against every key of the sequence on every
rank (``S^2`` memory, and rows that Ulysses/ring move between ranks): refused here, accepted
with ``skip_sequence_parallel`` or on one rank.
On the way around the ring a bool mask travels as uint8 (:func:`key_mask_for_transfer`).
``replicated_key_mask`` masks only the replicated keys (:func:`replicated_key_mask`,
expanded to every key by :func:`full_key_mask` where one kernel call sees them all).

Normalised form: a 4-D tensor broadcastable to ``[B, H, S_q, S_k]`` (dims of size 1
where the input had none), bool or the query's floating dtype. Kernels differ on
rows whose keys are all masked (NaN, 0, or garbage log-sum-exp), so backends use
:func:`rows_with_keys` to define those rows as output 0 and LSE ``-inf``.
"""

from __future__ import annotations

import torch

__all__ = [
    "describe_mask_forms",
    "full_key_mask",
    "key_mask_4d",
    "key_mask_for_transfer",
    "mask_to_additive",
    "normalize_mask",
    "replicated_key_mask",
    "rows_with_keys",
    "sp_key_mask",
]

_MASK_FORMS = (
    "a key mask shaped [B, S_local_k] or [B, 1, 1, S_local_k] (S_local_k = k's rows on this rank), "
    "bool (True = attend) or additive float (0 = attend, -inf = masked)"
)


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
    # a NaN entry counts as attendable: its NaN must reach the output, not turn the row into a silent 0
    allowed = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    if not causal:
        return allowed.any(dim=-1)
    if allowed.shape[-2] == 1:  # key-padding form: row i is valid iff any key <= i is allowed
        return allowed[..., 0, :].cummax(dim=-1).values
    s_k = allowed.shape[-1]
    keep = torch.ones(allowed.shape[-2], s_k, dtype=torch.bool, device=allowed.device).tril()
    return (allowed & keep).any(dim=-1)


def sp_key_mask(attn_mask, q: torch.Tensor, k: torch.Tensor, grad: bool) -> torch.Tensor | None:
    """The key mask of a sequence-parallel call as ``[B, S_local_k]``: bool, or additive float in
    q's dtype. Raises ``TypeError``/``ValueError`` naming the forms accepted and why."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    batch, keys = q.shape[0], k.shape[1]
    shape = tuple(attn_mask.shape)
    if shape == (batch, keys):
        mask = attn_mask
    elif shape == (batch, 1, 1, keys):
        mask = attn_mask[:, 0, 0]
    else:
        raise ValueError(
            f"under sequence parallelism attn_mask must be {_MASK_FORMS}; got shape {list(shape)} for "
            f"B={batch}, S_local_k={keys}. Per-query or per-head masks ([B, S_q, S_k], [B, 1|H, S_q, S_k]) "
            "cannot be split with the keys (every rank would need every query row against every key), so "
            "they are accepted only with skip_sequence_parallel=True or on a single rank"
        )
    return _mask_values(mask, q, grad, "attn_mask", _MASK_FORMS)


def replicated_key_mask(mask, q: torch.Tensor, rows, attn_mask, grad: bool):
    """``replicated_key_mask`` as ``[B, n]`` over the ``n`` replicated keys (prefix rows, then suffix
    rows), bool or additive in q's dtype; None if not given."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"replicated_key_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if attn_mask is not None:
        raise ValueError("pass attn_mask (a mask over every key) or replicated_key_mask (over the replicated keys "
                         "only, every sharded key attended), not both")
    n = rows.key_prefix + rows.key_suffix
    if n == 0:
        raise ValueError("replicated_key_mask masks replicated keys, but this call has none; pass "
                         "num_replicated_prefix/suffix or num_replicated_kv_prefix/suffix")
    batch, shape = q.shape[0], tuple(mask.shape)
    if shape not in ((batch, n), (batch, 1, 1, n)):
        raise ValueError(f"replicated_key_mask must be shaped [B, n] or [B, 1, 1, n] with B={batch} and n={n} "
                         f"replicated keys ({rows.key_prefix} before the shard, then {rows.key_suffix} after it), "
                         f"got {list(shape)}")
    forms = "bool (True = attend) or additive float (0 = attend, -inf = masked)"
    return _mask_values(mask.reshape(batch, n), q, grad, "replicated_key_mask", forms)


def _mask_values(mask: torch.Tensor, q: torch.Tensor, grad: bool, name: str, forms: str) -> torch.Tensor:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be {forms}; got dtype {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{name} is on {mask.device} but q is on {q.device}")
    if mask.is_floating_point():
        if grad and mask.requires_grad:
            raise ValueError(f"{name} requires grad, but attention masks get no gradient here; pass "
                             f"{name}.detach()")
        mask = mask.to(q.dtype)
    return mask


def key_mask_for_transfer(key_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The key mask as it travels with its block: bool as uint8 (gloo and NCCL move no bool),
    an additive float mask as it is."""
    if key_mask is None:
        return []
    return [key_mask.to(torch.uint8) if key_mask.dtype == torch.bool else key_mask.contiguous()]


def key_mask_4d(mask: torch.Tensor | None, keys: slice = slice(None)) -> torch.Tensor | None:
    """A received ``[B, S_k]`` key mask (uint8, bool or additive float) -> ``[B, 1, 1, S_k]``
    for the kernel: bool, or the additive float as it is."""
    if mask is None:
        return None
    mask = mask[:, keys]
    if not mask.is_floating_point():
        mask = mask.bool()
    return mask[:, None, None, :]


def full_key_mask(text_mask: torch.Tensor, rows, num_keys: int) -> torch.Tensor:
    """``[B, n]`` over the replicated keys -> ``[B, num_keys]`` over all keys, the others attended."""
    keep = torch.ones if text_mask.dtype == torch.bool else torch.zeros  # bool True / additive 0: attend
    middle = keep((), dtype=text_mask.dtype, device=text_mask.device)
    middle = middle.expand(len(text_mask), num_keys - text_mask.shape[1])
    return torch.cat([text_mask[:, : rows.key_prefix], middle, text_mask[:, rows.key_prefix :]], dim=1)
