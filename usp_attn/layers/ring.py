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
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        return_lse: also return the log-sum-exp over all blocks (what the backward needs).

    Returns:
        ``[B, S_q, H, D]`` in q's dtype; rows with no attendable key are 0. With
        ``return_lse``: ``(out, lse)``, lse ``[B, H, S_q]`` float32, ``-inf`` on those rows.
    """
    ring_size = len(block_lengths)
    batch, _, kv_heads, head_dim = k.shape
    # Which blocks this rank attends, known up front so the last merge can write q's dtype.
    sources = [(ring_rank - step) % ring_size for step in range(ring_size)]
    attended = {src for src in sources if not (causal and src > ring_rank) and block_lengths[src] > 0}
    extras = [blk for blk in local_blocks if blk[0].shape[1] > 0]
    remaining = (len(attended) + len(extras)) if q.shape[1] > 0 else 0
    if remaining == 0 and exchange is None:
        return _nothing_attended(q, return_lse)
    acc = PartialAttention()
    result = None

    def attend_block(k_blk, v_blk, mask_blk, block_causal):
        nonlocal remaining, result
        remaining -= 1
        mask4d = None if mask_blk is None else mask_blk.bool()[:, None, None, :]
        out, lse = attend(q, k_blk, v_blk, mask=mask4d, causal=block_causal, return_lse=True)
        result = acc.add(out, lse, last_dtype=q.dtype if remaining == 0 and not return_lse else None)

    # K and V travel as two contiguous tensors (no stacking copy), the mask as uint8.
    block = [k.contiguous(), v.contiguous()] + ([] if key_mask is None else [key_mask.to(torch.uint8)])
    for step, source in enumerate(sources):
        if step + 1 < ring_size:
            incoming_len = block_lengths[sources[step + 1]]
            shapes = [((batch, incoming_len, kv_heads, head_dim), k.dtype)] * 2
            if key_mask is not None:
                shapes.append(((batch, incoming_len), torch.uint8))
            exchange.start(block, shapes)
        if step == 0 and q.shape[1] > 0:
            for k_extra, v_extra, mask_extra in extras:  # overlaps the first transfer
                attend_block(k_extra, v_extra, mask_extra, False)
        if source in attended and q.shape[1] > 0:
            mask = block[2] if key_mask is not None else None
            attend_block(block[0], block[1], mask, causal and source == ring_rank)
        if step + 1 < ring_size:
            block = exchange.wait()
    if return_lse:
        return _nothing_attended(q, True) if acc.empty else (acc.result(q.dtype), acc.lse())
    return result if result is not None else torch.zeros_like(q)


def _nothing_attended(q, return_lse):
    out = torch.zeros_like(q)
    if not return_lse:
        return out
    return out, torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
