"""Ulysses all-to-alls: sequence shards <-> head shards inside one Ulysses group.

Forward (:func:`sequence_to_heads`): each of the U ranks holds ``[B, s_i, H, D]``
tensors for its shard; afterwards rank u holds head block u (``H / U`` heads) for
the whole group segment ``S_seg = sum(s_i)``, in rank order. q, k and v travel in
**one** ``all_to_all_single``: per destination their head blocks are packed side by
side, so the transfer is ``[U * s_r, B, Hc, D]`` with ``Hc = sum(H_t / U)``.
Uneven shard lengths use the split-size form of the same call.

Backward (:func:`heads_to_sequence`): the inverse for the attention output.

With gradients (``*_with_grad``) each all-to-all is recorded by autograd, its backward the
inverse all-to-all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from usp_attn.distributed.guard import named_backward, recording_guard

__all__ = [
    "sequence_to_heads",
    "heads_to_sequence",
    "gather_group_sequence",
    "sequence_to_heads_with_grad",
    "heads_to_sequence_with_grad",
]


def sequence_to_heads(
    tensors: list[torch.Tensor],
    shard_lengths: tuple[int, ...],
    group: dist.ProcessGroup | None,
    *,
    pad_front: int = 0,
    pad_back: int = 0,
    async_op: bool = False,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """All-to-all ``[B, s_r, H_t, D]`` tensors (one dtype, ``H_t % U == 0``) into head shards.

    Args:
        tensors: this rank's shards, e.g. ``[q, k, v]``.
        shard_lengths: ``s_i`` of every rank of the group, in group-rank order.
        group: the Ulysses group.
        pad_front, pad_back: extra (uninitialised) sequence rows reserved before and after
            the segment in the result, so the caller can place replicated tokens there
            without another copy.
        async_op: start the all-to-all and return its work handle as a third result (wait on
            it before reading the segment rows).

    Returns:
        ``buf [pad_front + S_seg + pad_back, B, Hc, D]`` (sequence-major) and, for each
        input, its ``(start, stop)`` head range inside ``Hc``. ``buf[:, :, a:b].transpose(0, 1)``
        is that tensor's ``[B, S, H_t / U, D]`` view.
    """
    world = len(shard_lengths)
    first = tensors[0]
    batch, s_r, _, d = first.shape
    heads = [t.shape[2] // world for t in tensors]
    ranges, start = [], 0
    for h in heads:
        ranges.append((start, start + h))
        start += h
    send = torch.empty(world, s_r, batch, start, d, dtype=first.dtype, device=first.device)
    for t, h, (a, b) in zip(tensors, heads, ranges):
        send[:, :, :, a:b].copy_(t.view(batch, s_r, world, h, d).permute(2, 1, 0, 3, 4))
    seg = sum(shard_lengths)
    buf = torch.empty(pad_front + seg + pad_back, batch, start, d, dtype=first.dtype, device=first.device)
    even = all(n == s_r for n in shard_lengths)
    work = dist.all_to_all_single(
        buf[pad_front : pad_front + seg],
        send.view(world * s_r, batch, start, d),
        output_split_sizes=None if even else list(shard_lengths),
        input_split_sizes=None if even else [s_r] * world,
        group=group,
        async_op=async_op,
    )
    return (buf, ranges, work) if async_op else (buf, ranges)


def heads_to_sequence(
    out: torch.Tensor, shard_lengths: tuple[int, ...], group_rank: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Inverse all-to-all: ``[B, S_seg, h, D]`` head shard -> ``[B, s_r, U * h, D]`` sequence shard."""
    world = len(shard_lengths)
    batch, _, h, d = out.shape
    s_r = shard_lengths[group_rank]
    send = out.transpose(0, 1).contiguous()  # [S_seg, B, h, D]
    recv = torch.empty(world * s_r, batch, h, d, dtype=out.dtype, device=out.device)
    even = all(n == s_r for n in shard_lengths)
    dist.all_to_all_single(
        recv,
        send,
        output_split_sizes=None if even else [s_r] * world,
        input_split_sizes=None if even else list(shard_lengths),
        group=group,
    )
    return recv.view(world, s_r, batch, h, d).permute(2, 1, 0, 3, 4).reshape(batch, s_r, world * h, d)


def gather_group_sequence(
    x: torch.Tensor, shard_lengths: tuple[int, ...], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-gather ``[B, s_r, ...]`` shards (uneven allowed) into ``[B, S_seg, ...]`` (e.g. key masks)."""
    longest = max(shard_lengths)
    if x.shape[1] < longest:
        pad = x.new_zeros((x.shape[0], longest - x.shape[1]) + tuple(x.shape[2:]))
        x = torch.cat([x, pad], dim=1)
    pieces = [torch.empty_like(x) for _ in shard_lengths]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat([p[:, :n] for p, n in zip(pieces, shard_lengths)], dim=1)


# ---- autograd: each all-to-all's backward is the inverse all-to-all -------------------------------

class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard_lengths, group_rank, group, pad_front, pad_back, *tensors):
        ctx.guard = recording_guard()
        buf, ranges = sequence_to_heads(list(tensors), shard_lengths, group, pad_front=pad_front, pad_back=pad_back)
        ctx.args = (shard_lengths, group_rank, group, pad_front, ranges, [t.shape for t in tensors])
        return buf

    @staticmethod
    @once_differentiable  # the kernels and collectives below have no derivative: refuse a double backward
    @named_backward
    def backward(ctx, dbuf):
        shard_lengths, group_rank, group, pad_front, ranges, shapes = ctx.args
        world, seg = len(shard_lengths), sum(shard_lengths)
        # Rows of rank w's shard go back to rank w, every rank's head block beside the others.
        back = heads_to_sequence(dbuf[pad_front : pad_front + seg].transpose(0, 1), shard_lengths, group_rank, group)
        batch, s_r, _, d = back.shape
        back = back.view(batch, s_r, world, ranges[-1][1], d)  # no -1: an empty shard has no size to infer
        grads = [back[:, :, :, a:b].reshape(shape) for (a, b), shape in zip(ranges, shapes)]
        return (None,) * 5 + tuple(grads)


def sequence_to_heads_with_grad(tensors, shard_lengths, group, *, group_rank, pad_front=0, pad_back=0):
    """:func:`~usp_attn.ulysses.comm.sequence_to_heads` recorded by autograd (same results)."""
    ranges, start = [], 0
    for t in tensors:
        h = t.shape[2] // len(shard_lengths)
        ranges.append((start, start + h))
        start += h
    buf = _SequenceToHeads.apply(tuple(shard_lengths), group_rank, group, pad_front, pad_back, *tensors)
    return buf, ranges


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, shard_lengths, group_rank, group):
        ctx.guard = recording_guard()
        ctx.args = (shard_lengths, group)
        return heads_to_sequence(out, shard_lengths, group_rank, group)

    @staticmethod
    @once_differentiable  # the kernels and collectives below have no derivative: refuse a double backward
    @named_backward
    def backward(ctx, grad):
        shard_lengths, group = ctx.args
        buf, _ = sequence_to_heads([grad.contiguous()], shard_lengths, group)
        return buf.transpose(0, 1), None, None, None


def heads_to_sequence_with_grad(out, shard_lengths, group_rank, group):
    """:func:`~usp_attn.ulysses.comm.heads_to_sequence` recorded by autograd."""
    return _HeadsToSequence.apply(out, tuple(shard_lengths), group_rank, group)
