"""Autograd for the sequence-parallel collectives: each one's backward is its adjoint.

Gradient convention (the one data parallelism uses): what autograd leaves on a rank is that
rank's share of the gradient of the SUM of all ranks' losses. A tensor sharded along the
sequence gets the exact gradient of its rows; a tensor replicated on every rank (the
parameters, the replicated text tokens, cross-attention's full K/V) gets a share, and the
shares of the group add up to its gradient. So parameter gradients are summed over the
sequence-parallel group (or averaged, when every rank computed the same full loss), as
DDP does. With that convention:

    collective (forward)                       backward
    gather_sequence (all-gather)               reduce-scatter (sum, keep own rows)
    replicated outputs gathered over heads     reduce-scatter over heads in the Ulysses group
    replicated inputs (identity)               all-reduce mean over the SP group: every rank
                                               gets the same 1/W share of their gradient

The last row makes replicated tokens' gradients, like their outputs, identical on every
rank: when every rank computes the same loss L, each copy's gradient is dL/dx itself.
(The Ulysses all-to-alls' adjoints live beside them, in :mod:`usp_attn.ulysses.comm`.)
Nothing here runs without gradients: the layers call these only when autograd records.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from usp_attn.distributed.guard import named_backward, recording_guard


__all__ = [
    "gather_sequence_with_grad",
    "gather_replicated_with_grad",
    "share_replicated_grads",
]


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gather, dim, sizes, rank, group):
        ctx.guard = recording_guard()
        ctx.args = (dim, sizes, rank, group)
        return gather(x)

    @staticmethod
    @once_differentiable  # the kernels and collectives below have no derivative: refuse a double backward
    @named_backward
    def backward(ctx, grad):
        dim, sizes, rank, group = ctx.args
        return _reduce_scatter(grad, dim, sizes, rank, group), None, None, None, None, None


def gather_sequence_with_grad(x, gather, *, dim, sizes, rank, group):
    """``gather(x)`` (the all-gather of sequence shards) whose backward is a reduce-scatter:
    rank r gets the sum over ranks of the gradient of rows r."""
    return _GatherSequence.apply(x, gather, dim, tuple(sizes), rank, group)


def _reduce_scatter(grad, dim, sizes, rank, group):
    """Sum ``grad`` over the group and keep this rank's rows (uneven sizes allowed)."""
    world, longest = len(sizes), max(sizes)
    rows = grad.movedim(dim, 0)
    send = rows.new_zeros((world, longest) + tuple(rows.shape[1:]))
    for w, piece in enumerate(torch.split(rows, list(sizes), dim=0)):
        send[w, : piece.shape[0]] = piece
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.sum(dim=0)[: sizes[rank]].movedim(0, dim)


class _ReplicatedHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text_out, gather, degree, group):
        ctx.guard = recording_guard()
        ctx.args = (text_out.shape[2], degree, group)
        return gather(text_out)

    @staticmethod
    @once_differentiable  # the kernels and collectives below have no derivative: refuse a double backward
    @named_backward
    def backward(ctx, grad):
        local_heads, degree, group = ctx.args
        b, n, heads, d = grad.shape
        if heads < local_heads * degree:  # padded heads were dropped on the way out
            grad = torch.cat([grad, grad.new_zeros(b, n, local_heads * degree - heads, d)], dim=2)
        if degree == 1:
            return grad, None, None, None
        send = grad.reshape(b, n, degree, local_heads, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        return recv.sum(dim=0), None, None, None


def gather_replicated_with_grad(text_out, gather, *, ulysses_degree, ulysses_group):
    """``gather(text_out)`` (replicated outputs ``[B, n, h_local, D]`` gathered over the Ulysses
    group's head blocks to ``[B, n, H, D]``) recorded by autograd.

    Every ring rank computed the same head block, so any split of the gradient among them
    is exact under the sum convention; each rank keeps the gradient of its head block summed
    over its Ulysses group (a reduce-scatter), which needs no ring communication.
    """
    return _ReplicatedHeads.apply(text_out, gather, ulysses_degree, ulysses_group)


class _ShareReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n_pre, n_suf, world, group, *tensors):
        ctx.guard = recording_guard()
        ctx.args = (n_pre, n_suf, world, group)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    @once_differentiable  # the kernels and collectives below have no derivative: refuse a double backward
    @named_backward
    def backward(ctx, *grads):
        n_pre, n_suf, world, group = ctx.args
        grads = [g.clone() for g in grads]
        rows = [torch.cat([g[:, :pre], g[:, g.shape[1] - suf :]], dim=1) for g, pre, suf in zip(grads, n_pre, n_suf)]
        flat = torch.cat([r.reshape(-1) for r in rows])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g, r, pre, suf in zip(grads, rows, n_pre, n_suf):
            mean = flat[offset : offset + r.numel()].view(r.shape)
            offset += r.numel()
            g[:, :pre] = mean[:, :pre]
            g[:, g.shape[1] - suf :] = mean[:, pre:]
        return (None,) * 4 + tuple(grads)


def share_replicated_grads(tensors, n_pre, n_suf, *, world, group):
    """The tensors unchanged; in backward the gradients of their first ``n_pre`` and last
    ``n_suf`` rows (replicated tokens) become their mean over the group, on every rank.
    ``n_pre``/``n_suf``: one count for every tensor, or a sequence of one per tensor (k/v
    can carry replicated rows that q has not)."""
    counts = [tuple(n) if isinstance(n, (tuple, list)) else (n,) * len(tensors) for n in (n_pre, n_suf)]
    return _ShareReplicated.apply(counts[0], counts[1], world, group, *tensors)
