"""The load-balanced ("zigzag") sequence layout, and why causal attention stays exact on it.

Layout. The global sequence of ``S`` tokens is cut into ``2W`` chunks ``c_0 .. c_{2W-1}``
(``torch.tensor_split`` sizes: the first ``S mod 2W`` chunks are one token longer); SP rank
``r`` holds two of them, in global order:

    shard_r = [ c_r | c_{2W-1-r} ]

Why. Under causal attention query chunk ``x`` attends key chunk ``y`` in full if ``y < x``,
causally (the lower triangle) if ``y == x``, not at all if ``y > x``. With contiguous shards,
rank ``r`` of a ring of ``W`` attends ``r`` earlier shards plus its diagonal: the last rank does
about twice the mean work, and the ring waits for it. Holding one early and one late chunk
gives every rank the same work.

Ulysses x ring. With ``sp_rank = g*U + u`` (ring rank ``g``, Ulysses rank ``u``) the Ulysses
all-to-all of group ``g`` gathers its ranks' shards in rank order,
``[c_{gU}, c_{2W-1-gU}, c_{gU+1}, c_{2W-2-gU}, ...]``. Reordered (:func:`to_global_order`) to

    F_g = [ c_{gU} .. c_{gU+U-1} ]            B_g = [ c_{2W-U-gU} .. c_{2W-1-gU} ]

both runs are contiguous in the global sequence: they are *super-chunks* ``g`` and ``2R-1-g`` of
``2R`` super-chunks of ``U`` chunks each. So the ring again sees a zigzag layout, of ``R`` ranks,
and the same per-hop rule applies (``U = 1``: the super-chunks are the rank's own chunks;
``R = 1``: ``[F_0 | B_0]`` is the whole sequence in order, one causal call).

Causal ring on the zigzag layout. Ring rank ``g`` holds queries ``[F_g | B_g]`` (super-chunks
``a = g < b = 2R-1-g``); the block that arrives from ring rank ``j`` holds keys ``[F_j | B_j]``
(super-chunks ``j`` and ``2R-1-j``):

    j == g   all queries vs the whole block, causal: the rows are in global order, so the
             plain lower triangle is exactly "y < x in full, y == x causal, y > x never"
    j <  g   j < a < b < 2R-1-j: every query attends F_j in full and nothing of B_j
    j >  g   a < j <= R-1 < b and a < 2R-1-j < b: only B_g's queries attend, the whole
             block, in full

Work per hop with equal super-chunks of ``c`` tokens: ``(2c)^2/2`` on the diagonal, ``2c * c``
when ``j < g``, ``c * 2c`` when ``j > g``: the same ``2c^2`` on every rank at every hop
(:mod:`usp_attn.ring.plan` turns this table into kernel calls and counts them).
"""

from __future__ import annotations

import torch

__all__ = [
    "chunk_sizes",
    "zigzag_sizes",
    "rank_chunks",
    "shard_zigzag",
    "gather_order",
    "to_global_order",
    "to_rank_order",
]


def chunk_sizes(total: int, world: int) -> tuple[int, ...]:
    """Lengths of the ``2W`` chunks of a sequence of ``total`` tokens (``tensor_split`` sizes)."""
    base, extra = divmod(total, 2 * world)
    return tuple(base + 1 if i < extra else base for i in range(2 * world))


def rank_chunks(total: int, world: int, rank: int) -> tuple[int, int]:
    """``(len c_r, len c_{2W-1-r})``: the lengths of the two chunks SP rank ``rank`` holds."""
    chunks = chunk_sizes(total, world)
    return chunks[rank], chunks[2 * world - 1 - rank]


def zigzag_sizes(total: int, world: int) -> tuple[int, ...]:
    """Every SP rank's shard length in the zigzag layout."""
    return tuple(sum(rank_chunks(total, world, r)) for r in range(world))


def shard_zigzag(x: torch.Tensor, dim: int, world: int, rank: int) -> torch.Tensor:
    """``[c_rank | c_{2W-1-rank}]`` of the full tensor ``x`` along ``dim`` (a copy)."""
    chunks = torch.tensor_split(x, 2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def gather_order(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where each chunk of the global sequence lies in the rank-order concatenation.

    ``pieces[w] = (len a_w, len b_w)`` of ranks ``0..n-1`` covering chunks ``c_0 ..`` and
    ``.. c_{2n-1}``; returns ``(offset, length)`` of ``c_0, c_1, ..., c_{2n-1}`` in
    ``[a_0 b_0 a_1 b_1 ...]``: the ``a`` chunks in rank order, then the ``b`` chunks in
    reverse rank order.
    """
    offsets, start = [], 0
    for len_a, len_b in pieces:
        offsets.append(((start, len_a), (start + len_a, len_b)))
        start += len_a + len_b
    return [a for a, _ in offsets] + [b for _, b in reversed(offsets)]


def to_global_order(x: torch.Tensor, pieces: list[tuple[int, int]], dim: int) -> torch.Tensor:
    """Rows ``[a_0 b_0 a_1 b_1 ...]`` (rank order) -> ``[a_0 a_1 ... b_1 b_0]`` (global order) along ``dim``.

    With ``pieces`` of a whole SP group this is the full sequence; with those of one Ulysses
    group it is ``[F_g | B_g]``. A copy; differentiable (its adjoint is :func:`to_rank_order`).
    """
    return torch.cat([x.narrow(dim, start, length) for start, length in gather_order(pieces)], dim=dim)


def to_rank_order(x: torch.Tensor, pieces: list[tuple[int, int]], dim: int) -> torch.Tensor:
    """Inverse of :func:`to_global_order`: global-order rows back to ``[a_0 b_0 a_1 b_1 ...]``."""
    rows, start_a, start_b = [], 0, x.shape[dim]
    for len_a, len_b in pieces:
        start_b -= len_b  # the b chunks lie after the fronts, in reverse rank order
        rows += [x.narrow(dim, start_a, len_a), x.narrow(dim, start_b, len_b)]
        start_a += len_a
    return torch.cat(rows, dim=dim)
