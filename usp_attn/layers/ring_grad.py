"""Backward of the ring: exact gradients with only this rank's K/V block kept.

The forward (:func:`~usp_attn.layers.ring.ring_attention` with ``return_lse=True``) keeps
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
the same order on every rank). Causal: the same blocks are skipped as in the forward;
their accumulators are passed on unchanged. Replicated (text) K/V blocks are local: their
gradients are computed once, while the first transfer is in flight.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from usp_attn.layers.attention_grad import BlockKernels
from usp_attn.layers.ring import ring_attention

__all__ = ["RingPlan", "ring_attention_with_grad"]


@dataclasses.dataclass(frozen=True)
class RingPlan:
    """What the ring needs besides tensors.

    Attributes:
        kernels: the block forward/backward (of the layer's ``LocalAttention``).
        new_exchange: makes a fresh :class:`~usp_attn.distributed.ring_comm.RingExchange`.
        ring_rank: this rank's position in the ring.
        block_lengths: every ring rank's K/V block length, in ring order.
        causal: causal over the ring's global order.
    """

    kernels: BlockKernels
    new_exchange: Callable
    ring_rank: int
    block_lengths: tuple[int, ...]
    causal: bool


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, q, k, v, key_mask, text_k, text_v, text_mask):
        local_blocks = () if text_k is None else ((text_k, text_v, text_mask),)
        out, lse = ring_attention(
            plan.kernels.attend, q, k, v, exchange=plan.new_exchange(), ring_rank=plan.ring_rank,
            block_lengths=plan.block_lengths, causal=plan.causal, key_mask=key_mask,
            local_blocks=local_blocks, return_lse=True,
        )
        ctx.save_for_backward(q, k, v, key_mask, text_k, text_v, text_mask, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = ring_backward(ctx.plan, *ctx.saved_tensors, dout.contiguous())
        return (None,) + grads[:3] + (None,) + grads[3:] + (None,)


def ring_attention_with_grad(plan: RingPlan, q, k, v, *, key_mask=None, text_k=None, text_v=None, text_mask=None):
    """Ring attention recorded by autograd.

    Args:
        q: ``[B, S_q, H, D]``; k, v: ``[B, S_r, H_kv, D]`` this rank's block.
        key_mask: bool ``[B, S_r]`` of this rank's block, or None.
        text_k, text_v: ``[B, n_text, H_kv, D]`` replicated keys attended once, locally
            (``text_mask`` bool ``[B, n_text]``), or None.

    Returns ``[B, S_q, H, D]`` in q's dtype (same values as :func:`ring_attention`).
    """
    return _RingAttention.apply(plan, q, k, v, key_mask, text_k, text_v, text_mask)


def ring_backward(plan, q, k, v, key_mask, text_k, text_v, text_mask, out, lse, dout):
    """``(dq, dk, dv, dtext_k, dtext_v)``: this rank's gradients (dk/dv of its own block)."""
    ring_size, me = len(plan.block_lengths), plan.ring_rank
    sources = [(me - step) % ring_size for step in range(ring_size)]
    has_queries = q.shape[1] > 0
    acc_dtype = torch.promote_types(k.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)

    def block_grads(k_blk, v_blk, mask_blk, causal):
        mask4d = None if mask_blk is None else mask_blk.bool()[:, None, None, :]
        bdq, bdk, bdv = plan.kernels.backward(q, k_blk, v_blk, out, dout, lse, mask=mask4d, causal=causal)
        dq.add_(bdq)
        return bdk, bdv

    text_grads = (None, None)
    if text_k is not None:
        text_grads = (torch.zeros_like(text_k), torch.zeros_like(text_v))
    kv_exchange, grad_exchange = plan.new_exchange(), plan.new_exchange()
    batch, _, kv_heads, head_dim = k.shape

    def shape_of(source):
        return (batch, plan.block_lengths[source], kv_heads, head_dim)

    block = [k.contiguous(), v.contiguous()] + ([] if key_mask is None else [key_mask.to(torch.uint8)])
    for step, source in enumerate(sources):
        last = step + 1 == ring_size
        if not last:
            shape = shape_of(sources[step + 1])
            mask_like = [] if key_mask is None else [(shape[:2], torch.uint8)]
            kv_exchange.start(block, [(shape, k.dtype)] * 2 + mask_like)
        if step == 0 and text_k is not None and has_queries and text_k.shape[1] > 0:
            text_grads = block_grads(text_k, text_v, text_mask, False)  # overlaps the first transfer
        attended = has_queries and plan.block_lengths[source] > 0 and not (plan.causal and source > me)
        if attended:
            mask = block[2] if key_mask is not None else None
            bdk, bdv = block_grads(block[0], block[1], mask, plan.causal and source == me)
        if step == 0:
            acc = [torch.zeros(shape_of(source), dtype=acc_dtype, device=k.device) for _ in range(2)]
        else:
            acc = grad_exchange.wait()  # this block's dk/dv from the ranks it visited before
        if attended:
            acc[0].add_(bdk)
            acc[1].add_(bdv)
        if not last:
            block = kv_exchange.wait()
        # Pass the accumulator on; receive the next block's (after the last step: our own block's).
        grad_exchange.start(acc, [(shape_of(sources[(step + 1) % ring_size]), acc_dtype)] * 2)
    dk, dv = grad_exchange.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), text_grads[0], text_grads[1]
