"""Backward of the ring: exact gradients with only this rank's K/V block kept.

The forward (:func:`~usp_attn.ring.forward.ring_attention` with ``return_lse=True``) keeps
``q``, this rank's block ``k, v``, the merged output ``out`` and the log-sum-exp ``lse``
of every query row over ALL keys. With those, one block's flash-attention backward gives
exact gradients (:meth:`AttentionBackend.backward`):

    dq       = sum over blocks j of  bwd(q, k_j, v_j, out, dout, lse).dq
    dk_j, dv_j = sum over ring ranks r of their  bwd(q_r, k_j, v_j, out_r, dout_r, lse_r)

The K/V blocks go around the ring again, as in the forward. Each block travels with an
fp32 accumulator of its dk/dv: at step t rank r adds its share for the block in hand and
passes the accumulator on; one hop after the last step every accumulator is back on the
rank that owns the block. The K/V transfer of step t+1 and the accumulator transfer of
step t both overlap the block computed at step t+1 (two exchanges in flight, posted in
the same order on every rank). Causal: the same calls are made as in the forward
(:mod:`~usp_attn.ring.plan`: whole blocks, the diagonal, or zigzag halves); a
block no call touches passes its accumulator on unchanged. Replicated (text) K/V blocks
are local: their gradients are computed once, while the first transfer is in flight. A sparse
pattern's hop (``RingPlan.sparse_hop``) computes its part of the block, as in the forward: a hop the
pattern leaves empty makes no call and passes the block and its accumulator on.

The returned LSE is differentiable: its gradient ``dlse`` enters every block's backward
(:func:`~usp_attn.kernels.block_backward`), so a loss that uses it gets
exact gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from usp_attn.distributed.guard import named_backward, recording_guard
from usp_attn.kernels import BlockKernels
from usp_attn.masks import key_mask_4d, key_mask_for_transfer
from usp_attn.ring.forward import ring_attention
from usp_attn.ring.plan import RingLayout

__all__ = ["RingPlan", "ring_attention_with_grad"]


@dataclasses.dataclass(frozen=True)
class RingPlan:
    """What the ring needs besides tensors.

    Attributes:
        kernels: the block forward/backward (of the layer's ``LocalAttention``).
        new_exchange: makes a fresh :class:`~usp_attn.ring.exchange.RingExchange`.
        ring_rank: this rank's position in the ring.
        block_lengths: every ring rank's K/V block length, in ring order.
        causal: causal over the ring's global order.
        front_lengths: zigzag layout: every block's early-half length; ``None``: contiguous.
        sparse_hop: a static sparse pattern's part of each hop (see
            :func:`~usp_attn.ring.forward.ring_attention`), with ``sparse_hop.backward(source, ...)`` giving a
            hop's gradients; ``None``: dense.
    """

    kernels: BlockKernels
    new_exchange: Callable
    ring_rank: int
    block_lengths: tuple[int, ...]
    causal: bool
    front_lengths: tuple[int, ...] | None = None
    sparse_hop: object | None = None

    @property
    def layout(self) -> RingLayout:
        fronts = None if self.front_lengths is None else tuple(self.front_lengths)
        return RingLayout(tuple(self.block_lengths), self.causal, fronts)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, q, k, v, key_mask, text_k, text_v, text_mask):
        ctx.guard = recording_guard()
        local_blocks = () if text_k is None else ((text_k, text_v, text_mask),)
        out, lse = ring_attention(
            plan.kernels.attend, q, k, v, exchange=plan.new_exchange(), ring_rank=plan.ring_rank,
            block_lengths=plan.block_lengths, causal=plan.causal, key_mask=key_mask,
            local_blocks=local_blocks, return_lse=True, front_lengths=plan.front_lengths, sparse_hop=plan.sparse_hop,
        )
        ctx.save_for_backward(q, k, v, key_mask, text_k, text_v, text_mask, out, lse)
        ctx.plan = plan
        ctx.set_materialize_grads(False)  # an unused LSE has no gradient: no extra backward work
        return out, lse

    @staticmethod
    @once_differentiable  # the kernels and collectives below have no derivative: refuse a double backward
    @named_backward
    def backward(ctx, dout, dlse):
        q, k, v, key_mask, text_k, text_v, text_mask, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        grads = ring_backward(ctx.plan, q, k, v, key_mask, text_k, text_v, text_mask, out, lse, dout, dlse)
        return (None,) + grads[:3] + (None,) + grads[3:] + (None,)


def ring_attention_with_grad(plan: RingPlan, q, k, v, *, key_mask=None, text_k=None, text_v=None, text_mask=None,
                             return_lse=False):
    """Ring attention recorded by autograd.

    Args:
        q: ``[B, S_q, H, D]``; k, v: ``[B, S_r, H_kv, D]`` this rank's block.
        key_mask: ``[B, S_r]`` of this rank's block (bool, or additive float), or None.
        text_k, text_v: ``[B, n_text, H_kv, D]`` replicated keys attended once, locally
            (``text_mask`` ``[B, n_text]``), or None.
        return_lse: also return the log-sum-exp ``[B, H, S_q]`` (fp32; fp64 for fp64 inputs),
            differentiable: its gradient enters the backward exactly (see :mod:`usp_attn.kernels`).

    Returns ``[B, S_q, H, D]`` in q's dtype (same values as :func:`ring_attention`), or
    ``(out, lse)``.
    """
    out, lse = _RingAttention.apply(plan, q, k, v, key_mask, text_k, text_v, text_mask)
    return (out, lse) if return_lse else out


def ring_backward(plan, q, k, v, key_mask, text_k, text_v, text_mask, out, lse, dout, dlse=None):
    """``(dq, dk, dv, dtext_k, dtext_v)``: this rank's gradients (dk/dv of its own block).

    ``dlse``: the gradient of the returned LSE ``[B, H, S_q]``, or None.
    """
    ring_size, me = len(plan.block_lengths), plan.ring_rank
    layout = plan.layout
    sources = [(me - step) % ring_size for step in range(ring_size)]
    num_rows = q.shape[1]
    acc_dtype = torch.promote_types(k.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)

    hop = plan.sparse_hop

    def block_grads(k_blk, v_blk, mask_blk, call, source=None):
        """dq of the call's rows (added here) and dk/dv of the call's keys."""
        rows = slice(0, num_rows) if call is None else call.rows
        keys = slice(0, k_blk.shape[1]) if call is None else call.keys
        args = (q[:, rows], k_blk[:, keys], v_blk[:, keys], out[:, rows], dout[:, rows], lse[:, :, rows])
        drows = None if dlse is None else dlse[:, :, rows]
        if hop is not None and call is not None:  # the pattern's part of the hop, as the forward computed it
            bdq, bdk, bdv = hop.backward(source, *args, drows, plan.kernels.backward)
        else:
            bdq, bdk, bdv = plan.kernels.backward(*args, mask=key_mask_4d(mask_blk, keys),
                                                  causal=call is not None and call.causal, dlse=drows)
        dq[:, rows].add_(bdq)
        return keys, bdk, bdv

    text_grads = (None, None)
    if text_k is not None:
        text_grads = (torch.zeros_like(text_k), torch.zeros_like(text_v))
        if num_rows > 0 and text_k.shape[1] > 0:
            _, text_dk, text_dv = block_grads(text_k, text_v, text_mask, None)  # overlaps the first transfer
            text_grads = (text_dk, text_dv)
    kv_exchange, grad_exchange = plan.new_exchange(), plan.new_exchange()
    batch, _, kv_heads, head_dim = k.shape

    def shape_of(source):
        return (batch, plan.block_lengths[source], kv_heads, head_dim)

    mask_like = key_mask_for_transfer(key_mask)
    block = [k.contiguous(), v.contiguous()] + mask_like
    for step, source in enumerate(sources):
        last = step + 1 == ring_size
        if not last:
            shape = shape_of(sources[step + 1])
            kv_exchange.start(block, [(shape, k.dtype)] * 2 + [(shape[:2], m.dtype) for m in mask_like])
        calls = layout.calls(me, source, num_rows) if hop is None or hop.has_work(source) else ()
        mask = block[2] if key_mask is not None else None
        block_parts = [block_grads(block[0], block[1], mask, call, source) for call in calls]
        if step == 0:
            acc = [torch.zeros(shape_of(source), dtype=acc_dtype, device=k.device) for _ in range(2)]
        else:
            acc = grad_exchange.wait()  # this block's dk/dv from the ranks it visited before
        for keys, bdk, bdv in block_parts:
            acc[0][:, keys].add_(bdk)
            acc[1][:, keys].add_(bdv)
        if not last:
            block = kv_exchange.wait()
        # Pass the accumulator on; receive the next block's (after the last step: our own block's).
        grad_exchange.start(acc, [(shape_of(sources[(step + 1) % ring_size]), acc_dtype)] * 2)
    dk, dv = grad_exchange.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), text_grads[0], text_grads[1]
