"""The Ulysses steps of ``USPAttention``: sequence shards -> head shards of the segment, and back.

Rows on this rank (:mod:`usp_attn.arguments`): q ``[pre | s_r | suf]``, k/v ``[k_pre | s_r | k_suf]`` where
``k_pre = kv_pre + pre`` and ``k_suf = suf + kv_suf`` (K/V-only rows outermost). One fused
all-to-all turns the ``s_r`` sharded rows of every head into head block ``u`` of the Ulysses
group's whole segment (``S_seg`` rows); the replicated rows skip it, sliced to head block ``u``
locally and written into rows reserved around the segment:

    buffer rows      [ kv_pre | pre | segment | suf | kv_suf ]
    q_all  = rows    [          pre | segment | suf          ]   (q's head columns)
    k_all  = rows    [ kv_pre | pre | segment | suf | kv_suf ]   (k's head columns)

Causal attention on the zigzag layout (no replicated rows then) needs the segment in global
order: the all-to-all delivers ``[a_0 b_0 a_1 b_1 ...]`` (each rank's two chunks) and one copy
reorders it to ``[F_g | B_g] = [a_0 a_1 ... b_1 b_0]`` (``distributed/zigzag``); the way back
reorders the output (and LSE) before the inverse all-to-all. Every step is recorded by autograd
when gradients are required (collectives_grad: each collective's adjoint).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from usp_attn.ulysses.comm import (
    gather_group_sequence,
    heads_to_sequence,
    heads_to_sequence_with_grad,
    sequence_to_heads,
    sequence_to_heads_with_grad,
)
from usp_attn.distributed.zigzag import to_global_order, to_rank_order
from usp_attn.ulysses.heads import HeadPlan
from usp_attn.arguments import ReplicatedRows

__all__ = ["UlyssesSteps"]


@dataclasses.dataclass(frozen=True)
class UlyssesSteps:
    """One call's Ulysses layout.

    Attributes:
        heads: how heads are divided among the group (padding, kv repetition).
        group_sizes: every group rank's shard length ``s_i``, in group order.
        rank, group: this rank's position in the Ulysses group, and the group.
        rows: the replicated-row counts.
        zigzag_pieces: ``(len a_i, len b_i)`` of every group rank when the segment must be in
            global order (causal on the zigzag layout), else ``None``.
        grad: record the collectives for autograd.
    """

    heads: HeadPlan
    group_sizes: tuple[int, ...]
    rank: int
    group: object
    rows: ReplicatedRows
    zigzag_pieces: list | None = None
    grad: bool = False

    @property
    def segment(self) -> int:
        return sum(self.group_sizes)

    def to_heads(self, q, k, v, key_mask):
        """``q [B, pre+s_r+suf, H, D]``, ``k, v [B, k_pre+s_r+k_suf, H_kv, D]``, key mask ``[B, k rows]``
        -> ``q_all [B, pre+S_seg+suf, h, D]``, ``k_all, v_all [B, k_pre+S_seg+k_suf, h_kv, D]`` (views
        of one buffer) and the key mask over ``k_all``'s rows."""
        q_all, k_all, v_all = self.finish_to_heads(self.start_to_heads(q, k, v))
        return q_all, k_all, v_all, self.key_mask_to_heads(key_mask)

    def start_to_heads(self, q, k, v, *, async_op: bool = False):
        """The all-to-all of :meth:`to_heads` started (``async_op``: not waited for; never with
        gradients), the replicated rows written beside it; :meth:`finish_to_heads` gives the views."""
        plan, rows, seg, u = self.heads, self.rows, self.segment, self.rank
        k_pre, k_suf = rows.key_prefix, rows.key_suffix
        s_r = self.group_sizes[u]
        qp, kp, vp = plan.prepare_q(q), plan.prepare_kv(k), plan.prepare_kv(v)
        shard_q, shard_k = slice(rows.prefix, rows.prefix + s_r), slice(k_pre, k_pre + s_r)
        shards = [qp[:, shard_q], kp[:, shard_k], vp[:, shard_k]] if rows.any else [qp, kp, vp]  # no views for nothing
        work = None
        if self.grad:
            buf, ranges = sequence_to_heads_with_grad(shards, self.group_sizes, self.group, group_rank=u,
                                                      pad_front=k_pre, pad_back=k_suf)
        elif async_op:
            buf, ranges, work = sequence_to_heads(shards, self.group_sizes, self.group, pad_front=k_pre,
                                                  pad_back=k_suf, async_op=True)
        else:
            buf, ranges = sequence_to_heads(shards, self.group_sizes, self.group, pad_front=k_pre, pad_back=k_suf)
        # The replicated rows lie outside the rows the all-to-all writes: filled while it runs.
        for part, (a, b), is_kv in zip((qp, kp, vp) if rows.any else (), ranges, (False, True, True)):
            before, after = (k_pre, k_suf) if is_kv else (rows.prefix, rows.suffix)
            if before:
                buf[k_pre - before : k_pre, :, a:b].copy_(plan.local_block(part[:, :before], u, is_kv).transpose(0, 1))
            if after:
                tail = plan.local_block(part[:, part.shape[1] - after :], u, is_kv)
                buf[k_pre + seg : k_pre + seg + after, :, a:b].copy_(tail.transpose(0, 1))
        return buf, ranges, work

    def finish_to_heads(self, started):
        """Wait for :meth:`start_to_heads`' all-to-all; ``(q_all, k_all, v_all)`` as :meth:`to_heads`."""
        buf, ranges, work = started
        if work is not None:
            work.wait()
        rows, seg, k_pre = self.rows, self.segment, self.rows.key_prefix
        if self.zigzag_pieces is not None:  # no replicated rows with causal: buf is the segment
            buf = to_global_order(buf, self.zigzag_pieces, dim=0)
        (qa, qb), (ka, kb), (va, vb) = ranges
        q_all = buf[k_pre - rows.prefix : k_pre + seg + rows.suffix, :, qa:qb].transpose(0, 1)
        k_all, v_all = buf[:, :, ka:kb].transpose(0, 1), buf[:, :, va:vb].transpose(0, 1)
        return q_all, k_all, v_all

    def key_mask_to_heads(self, key_mask):
        """This rank's key mask ``[B, k rows]`` -> the mask over ``k_all``'s rows (gathered over the group);
        None stays None."""
        if key_mask is None:
            return None
        rows, u = self.rows, self.rank
        k_pre, s_r = rows.key_prefix, self.group_sizes[u]
        shard_k = slice(k_pre, k_pre + s_r)
        is_bool = key_mask.dtype == torch.bool  # bool travels as uint8, an additive mask as it is
        shard_mask = key_mask[:, shard_k].to(torch.uint8) if is_bool else key_mask[:, shard_k]
        seg_mask = gather_group_sequence(shard_mask, self.group_sizes, self.group)
        seg_mask = seg_mask.bool() if is_bool else seg_mask
        if self.zigzag_pieces is not None:
            seg_mask = to_global_order(seg_mask, self.zigzag_pieces, dim=1)
        return torch.cat([key_mask[:, :k_pre], seg_mask, key_mask[:, k_pre + s_r :]], dim=1)

    def to_sequence(self, out_seg, lse_seg=None):
        """``out_seg [B, S_seg, h, D]`` (and ``lse_seg [B, h, S_seg]``) -> this rank's rows
        ``[B, s_r, H, D]`` (and ``[B, H, s_r]``). The LSE takes a second all-to-all, D times smaller
        than the output's (fp32 beside a bf16 output cannot share one buffer)."""
        exchange = heads_to_sequence_with_grad if self.grad else heads_to_sequence
        num_heads = self.heads.num_heads
        lse_rows = None if lse_seg is None else lse_seg.transpose(1, 2).unsqueeze(-1)  # [B, S_seg, h, 1]
        if self.zigzag_pieces is not None:
            out_seg = to_rank_order(out_seg, self.zigzag_pieces, dim=1)
            lse_rows = None if lse_rows is None else to_rank_order(lse_rows, self.zigzag_pieces, dim=1)
        out = exchange(out_seg, self.group_sizes, self.rank, self.group)[:, :, :num_heads]
        if lse_rows is None:
            return out, None
        lse = exchange(lse_rows.contiguous(), self.group_sizes, self.rank, self.group)[:, :, :num_heads]
        return out, lse[..., 0].transpose(1, 2)
