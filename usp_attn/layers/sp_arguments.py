"""Arguments of the sequence-parallel layers' forward: replicated rows and key masks.

Row layout of one rank's tensors (``s_r`` = its shard of the sequence):

    q     [ pre | shard s_r | suf ]
    k, v  [ kv_pre | pre | shard s_r | suf | kv_suf ]

``pre``/``suf`` (``num_replicated_prefix/suffix``) are tokens replicated on every rank in q
AND k/v (text in MM-DiT joint attention): they attend and are attended. ``kv_pre``/``kv_suf``
(``num_replicated_kv_prefix/suffix``) are replicated keys/values without queries (xDiT's joint
K/V, sglang's ``num_replicated_kv_prefix``): attended by every query, no output rows. The two
kinds combine: the key/value-only rows are the outermost. Attention is a sum over keys, so the
order of replicated keys does not change the result; every replicated key is attended exactly
once (locally, never passed around the ring). Causal attention has no position for replicated
rows, so it refuses both kinds.

Key masks under sequence parallelism follow k's rows, so each rank holds the columns of its
own keys and they can travel with the keys. A per-query mask (``[B, S_q, S_k]``,
``[B, H, S_q, S_k]``) would need every query row against every key of the sequence on every
rank (``S^2`` memory, and rows that Ulysses/ring move between ranks): refused here, accepted
with ``skip_sequence_parallel`` or on one rank.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["ReplicatedRows", "check_key_mask", "check_load_balance", "check_replicated_key_mask"]

_MASK_FORMS = (
    "a key mask shaped [B, S_local_k] or [B, 1, 1, S_local_k] (S_local_k = k's rows on this rank), "
    "bool (True = attend) or additive float (0 = attend, -inf = masked)"
)


@dataclasses.dataclass(frozen=True)
class ReplicatedRows:
    """The replicated-row counts of one call (see the module doc for the row layout)."""

    prefix: int = 0
    suffix: int = 0
    kv_prefix: int = 0
    kv_suffix: int = 0

    @property
    def any(self) -> bool:
        return bool(self.prefix or self.suffix or self.kv_prefix or self.kv_suffix)

    @property
    def key_prefix(self) -> int:
        """k's rows before the shard."""
        return self.kv_prefix + self.prefix

    @property
    def key_suffix(self) -> int:
        """k's rows after the shard."""
        return self.suffix + self.kv_suffix

    def check_counts(self, causal: bool) -> None:
        names = ("num_replicated_prefix", "num_replicated_suffix", "num_replicated_kv_prefix",
                 "num_replicated_kv_suffix")
        for name, n in zip(names, dataclasses.astuple(self)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
        if causal and self.any:
            raise ValueError(
                "causal=True cannot be combined with replicated tokens (num_replicated_prefix/suffix, "
                "num_replicated_kv_prefix/suffix): they have no position in the causal order"
            )

    def check_rows(self, q_rows: int, k_rows: int | None, causal: bool) -> int:
        """Check the counts against q's and k's row counts (``k_rows=None``: k/v are complete, as
        in cross-attention); returns the shard length ``s_r``."""
        self.check_counts(causal)
        if self.prefix + self.suffix > q_rows:
            raise ValueError(
                f"num_replicated_prefix + num_replicated_suffix = {self.prefix + self.suffix} exceeds the local "
                f"sequence length {q_rows}"
            )
        shard = q_rows - self.prefix - self.suffix
        if k_rows is None:
            return shard
        expected = self.key_prefix + shard + self.key_suffix
        if k_rows != expected:
            if self.kv_prefix or self.kv_suffix:
                raise ValueError(
                    f"k/v have {k_rows} rows, but q's {q_rows} rows plus num_replicated_kv_prefix="
                    f"{self.kv_prefix} and num_replicated_kv_suffix={self.kv_suffix} make {expected}: k/v are "
                    "[kv_prefix | replicated prefix | shard | replicated suffix | kv_suffix], q the same without "
                    "the kv-only rows"
                )
            raise ValueError(
                f"q and k/v shards must have the same length under sequence parallelism, got {q_rows} and "
                f"{k_rows}; for replicated keys without queries pass num_replicated_kv_prefix/suffix, for "
                "cross-attention with full k/v use skip_sequence_parallel=True"
            )
        return shard


def check_key_mask(attn_mask, q: torch.Tensor, k: torch.Tensor, grad: bool) -> torch.Tensor | None:
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


def check_replicated_key_mask(mask, q: torch.Tensor, rows: ReplicatedRows, attn_mask, grad: bool):
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


def check_load_balance(value) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"load_balance must be True, False or None (the layout recorded on the state), got {value!r}")
