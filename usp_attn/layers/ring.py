"""The ring attention loop: this rank's queries against every rank's key/value block.

With R ring ranks, rank r starts with its own K/V block. At each of the R steps it
starts sending the block it holds to rank r+1 and receiving rank r-1's, attends its
queries to the block in hand (returning the LSE), and folds the partial result into
an fp32 accumulator (:class:`~usp_attn.layers.merge.PartialAttention`). After step t
it holds the block that originated at rank r-t-1.

Causal: block j is a contiguous earlier part of the sequence when j < r (attend in
full), the diagonal when j == r (causal inside the block) and a later part when
j > r (skipped; it is still passed on).
"""

from __future__ import annotations

import torch

from usp_attn.distributed.ring_comm import RingExchange
from usp_attn.layers.merge import PartialAttention

__all__ = ["ring_attention"]


def ring_attention(
    attend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    exchange: RingExchange | None,
    ring_rank: int,
    block_lengths: tuple[int, ...],
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    local_blocks: tuple = (),
) -> torch.Tensor:
    """Attention of ``q`` over the keys of every ring rank's block plus ``local_blocks``.

    Args:
        attend: ``attend(q, k, v, mask=..., causal=..., return_lse=True) -> (out, lse)``
            (a :meth:`LocalAttention.attend`).
        q: ``[B, S_q, H, D]`` this rank's queries.
        k, v: ``[B, S_r, H_kv, D]`` this rank's block; ``S_r = block_lengths[ring_rank]``.
        exchange: the ring's :class:`RingExchange` (``None`` when R == 1).
        block_lengths: every ring rank's block length, in ring order.
        causal: causal over the ring's global order (needs S_q == S_r).
        key_mask: bool ``[B, S_r]`` key-padding mask of this rank's block (True = attend);
            it travels with the block.
        local_blocks: extra ``(k, v, key_mask or None)`` blocks attended once, not passed on
            (replicated text tokens).

    Returns:
        ``[B, S_q, H, D]`` in q's dtype; rows with no attendable key are 0.
    """
    ring_size = len(block_lengths)
    batch, _, kv_heads, head_dim = k.shape
    acc = PartialAttention()
    block = torch.stack((k, v))  # one contiguous [2, B, S, H_kv, D] buffer to send and read
    mask = None if key_mask is None else key_mask.to(torch.uint8)
    source = ring_rank
    for step in range(ring_size):
        if step + 1 < ring_size:
            incoming_source = (source - 1) % ring_size
            incoming_len = block_lengths[incoming_source]
            shapes = [((2, batch, incoming_len, kv_heads, head_dim), block.dtype)]
            if mask is not None:
                shapes.append(((batch, incoming_len), torch.uint8))
            exchange.start([block] if mask is None else [block, mask], shapes)
        if step == 0:
            for k_extra, v_extra, mask_extra in local_blocks:  # overlaps the first transfer
                _attend_block(attend, acc, q, k_extra, v_extra, mask_extra, causal=False)
        if not (causal and source > ring_rank):
            _attend_block(attend, acc, q, block[0], block[1], mask, causal=causal and source == ring_rank)
        if step + 1 < ring_size:
            received = exchange.wait()
            block = received[0]
            mask = received[1] if mask is not None else None
            source = incoming_source
    if acc.out is None:  # no keys at all (empty blocks)
        return torch.zeros_like(q)
    return acc.result(q.dtype)


def _attend_block(attend, acc: PartialAttention, q, k, v, key_mask, *, causal: bool) -> None:
    if q.shape[1] == 0 or k.shape[1] == 0:
        return
    mask4d = None if key_mask is None else key_mask.bool()[:, None, None, :]
    out, lse = attend(q, k, v, mask=mask4d, causal=causal, return_lse=True)
    acc.add(out, lse)
