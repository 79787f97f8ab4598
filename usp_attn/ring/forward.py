"""The ring attention loop: this rank's queries against every rank's key/value block.

With R ring ranks, rank r starts with its own K/V block. At each of the R steps it
starts sending the block it holds to rank r+1 and receiving rank r-1's, attends its
queries to the block in hand (returning the LSE), and folds the partial result into
an fp32 accumulator (:class:`~usp_attn.ring.merge.PartialAttention`). After step t
it holds the block that originated at rank r-t-1.

Which query rows attend which keys of a block is the ring's causal structure
(:mod:`~usp_attn.ring.plan`): contiguous layout, earlier blocks in full, the
diagonal block causal, later blocks skipped (still passed on); zigzag layout, the
diagonal causal, earlier blocks' front halves for every query, later blocks for the
back half of the queries. Each query-row group keeps its own merge.
"""

from __future__ import annotations

import torch

from usp_attn.masks import key_mask_4d, key_mask_for_transfer
from usp_attn.ring.exchange import RingExchange
from usp_attn.ring.merge import PartialAttention
from usp_attn.ring.plan import RingLayout

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
    front_lengths: tuple[int, ...] | None = None,
    sparse_hop=None,
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
        key_mask: ``[B, S_r]`` key mask of this rank's block, bool (True = attend) or
            additive float (0 / -inf, in q's dtype); it travels with the block.
        local_blocks: extra ``(k, v, key_mask or None)`` blocks attended once, not passed on
            (replicated text tokens).
        return_lse: also return the log-sum-exp over all blocks (what the backward needs).
        front_lengths: zigzag layout (:mod:`usp_attn.distributed.zigzag`): the length of
            every block's early half; ``None``: contiguous blocks.
        sparse_hop: a sparse pattern's part of each hop (not causal, no key mask):
            ``sparse_hop(source, q, k, v) -> (out, lse)`` for source ring rank ``source``'s
            block, and ``sparse_hop.has_work(source)``: False when the pattern keeps no pair of
            the hop, which then makes no kernel call (the block is still passed on).

    Returns:
        ``[B, S_q, H, D]`` in q's dtype; rows with no attendable key are 0. With
        ``return_lse``: ``(out, lse)``, lse ``[B, H, S_q]`` float32 (float64 for float64
        inputs), ``-inf`` on those rows.
    """
    ring_size = len(block_lengths)
    layout = RingLayout(tuple(block_lengths), causal, None if front_lengths is None else tuple(front_lengths))
    batch, _, kv_heads, head_dim = k.shape
    num_rows = q.shape[1]
    sources = [(ring_rank - step) % ring_size for step in range(ring_size)]
    plans = {src: layout.calls(ring_rank, src, num_rows) for src in sources}
    if sparse_hop is not None:
        plans = {src: calls if sparse_hop.has_work(src) else () for src, calls in plans.items()}
    extras = [blk for blk in local_blocks if blk[0].shape[1] > 0] if num_rows > 0 else []
    groups = [_RowGroup(rows) for rows in layout.row_groups(ring_rank, num_rows)]
    for call in [c for calls in plans.values() for c in calls] + [None] * len(extras):
        for group in groups:
            group.remaining += group.covered_by(call)
    if all(group.remaining == 0 for group in groups) and exchange is None:
        return _nothing_attended(q, return_lse)

    def attend_block(k_blk, v_blk, mask_blk, call, source=None):
        rows = slice(0, num_rows) if call is None else call.rows
        keys = slice(0, k_blk.shape[1]) if call is None else call.keys
        if sparse_hop is not None and call is not None:
            out, lse = sparse_hop(source, q[:, rows], k_blk[:, keys], v_blk[:, keys])
        else:
            out, lse = attend(q[:, rows], k_blk[:, keys], v_blk[:, keys], mask=key_mask_4d(mask_blk, keys),
                              causal=call is not None and call.causal, return_lse=True)
        for group in groups:
            if group.covered_by(call):
                group.add(out, lse, rows.start, None if return_lse else q.dtype)

    # K and V travel as two contiguous tensors (no stacking copy), the mask beside them.
    block = [k.contiguous(), v.contiguous()] + key_mask_for_transfer(key_mask)
    for step, source in enumerate(sources):
        if step + 1 < ring_size:
            incoming_len = block_lengths[sources[step + 1]]
            shapes = [((batch, incoming_len, kv_heads, head_dim), k.dtype)] * 2
            if key_mask is not None:
                shapes.append(((batch, incoming_len), block[2].dtype))
            exchange.start(block, shapes)
        if step == 0:
            for k_extra, v_extra, mask_extra in extras:  # overlaps the first transfer
                attend_block(k_extra, v_extra, mask_extra, None)
        for call in plans[source]:
            attend_block(block[0], block[1], block[2] if key_mask is not None else None, call, source)
        if step + 1 < ring_size:
            block = exchange.wait()
    results = [group.result(q, return_lse) for group in groups]
    if len(results) == 1:
        return results[0]
    if return_lse:
        return torch.cat([r[0] for r in results], dim=1), torch.cat([r[1] for r in results], dim=2)
    return torch.cat(results, dim=1)


class _RowGroup:
    """The running merge of one range of query rows."""

    def __init__(self, rows: slice) -> None:
        self.rows, self.remaining, self.acc, self.final = rows, 0, PartialAttention(), None

    def covered_by(self, call) -> bool:
        """Whether ``call`` (None: a local block, all rows) computes these rows."""
        if self.rows.stop <= self.rows.start:
            return False
        return call is None or (call.rows.start <= self.rows.start and self.rows.stop <= call.rows.stop)

    def add(self, out, lse, first_row, last_dtype):
        """Fold in the part of a call's ``out``/``lse`` (rows from ``first_row``) that is ours."""
        a, b = self.rows.start - first_row, self.rows.stop - first_row
        self.remaining -= 1
        merged = self.acc.add(out[:, a:b], lse[:, :, a:b], last_dtype=last_dtype if self.remaining == 0 else None)
        if merged is not None:
            self.final = merged

    def result(self, q, return_lse):
        if self.acc.empty and self.final is None:
            return _nothing_attended(q[:, self.rows], return_lse)
        if return_lse:
            return self.acc.result(q.dtype), self.acc.lse()
        return self.final if self.final is not None else self.acc.result(q.dtype)


def _nothing_attended(q, return_lse):
    out = torch.zeros_like(q)
    if not return_lse:
        return out
    dtype = torch.promote_types(q.dtype, torch.float32)
    return out, torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=dtype, device=q.device)
