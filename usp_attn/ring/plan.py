"""Which kernel calls each ring hop makes: the causal structure of the ring, as data.

A ring rank holds queries ``q [B, S_q, H, D]`` and, at each hop, the K/V block of one ring
rank (the *source*). A hop makes zero or more :class:`BlockCall`\\ s, each a kernel call of a
range of query rows against a range of the block's keys, causal or not. The forward
(:mod:`~usp_attn.ring.forward`) and the backward (:mod:`~usp_attn.ring.backward`) both run
exactly these calls, and :func:`pairs_attended` counts their work.

Contiguous layout (shards in global order, block ``j`` = ring rank ``j``'s segment):

    not causal          every block, all rows x all keys
    causal, j <  me     all rows x all keys              (an earlier part of the sequence)
    causal, j == me     all rows x all keys, causal       (the diagonal block)
    causal, j >  me     nothing                           (a later part; still passed on)

Zigzag layout (``fronts[j]`` = length of the early super-chunk ``F_j`` of block ``j``; see
:mod:`usp_attn.distributed.zigzag` for why this is exact):

    not causal          as contiguous
    causal, j == me     all rows x all keys, causal
    causal, j <  me     all rows x keys [0, fronts[j])   (F_j only)
    causal, j >  me     rows [fronts[me], S_q) x all keys (B_me's queries only)

Query rows are merged per *row group*: the ranges between the calls' row boundaries
(``[0, S_q)`` contiguous; ``[0, fronts[me])`` and ``[fronts[me], S_q)`` zigzag-causal), each
with its own running log-sum-exp merge.
"""

from __future__ import annotations

import dataclasses

from usp_attn.distributed.zigzag import chunk_sizes

__all__ = ["BlockCall", "RingLayout", "pairs_attended", "ring_front_lengths"]


@dataclasses.dataclass(frozen=True)
class BlockCall:
    """One kernel call: query rows ``rows`` against the block's keys ``keys``."""

    rows: slice
    keys: slice
    causal: bool


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """The ring's blocks and causal structure.

    Attributes:
        block_lengths: every ring rank's K/V block length, in ring order.
        causal: causal over the global order of the sequence.
        fronts: zigzag layout: ``len F_j`` of every block; ``None``: contiguous layout.
    """

    block_lengths: tuple[int, ...]
    causal: bool = False
    fronts: tuple[int, ...] | None = None

    def calls(self, me: int, source: int, num_rows: int) -> tuple[BlockCall, ...]:
        """The calls ring rank ``me`` (``num_rows`` queries) makes on ``source``'s block."""
        keys = self.block_lengths[source]
        every = slice(0, num_rows)
        if not self.causal:
            call = BlockCall(every, slice(0, keys), False)
        elif source == me:
            call = BlockCall(every, slice(0, keys), True)
        elif self.fronts is None:
            call = BlockCall(every, slice(0, keys), False) if source < me else None
        elif source < me:
            call = BlockCall(every, slice(0, self.fronts[source]), False)
        else:
            call = BlockCall(slice(self.fronts[me], num_rows), slice(0, keys), False)
        if call is None or _length(call.rows) == 0 or _length(call.keys) == 0:
            return ()
        return (call,)

    def row_groups(self, me: int, num_rows: int) -> tuple[slice, ...]:
        """The query-row ranges merged separately (every call covers whole groups)."""
        if self.causal and self.fronts is not None and 0 < self.fronts[me] < num_rows:
            return (slice(0, self.fronts[me]), slice(self.fronts[me], num_rows))
        return (slice(0, num_rows),)


def _length(s: slice) -> int:
    return max(0, s.stop - s.start)


def pairs_attended(layout: RingLayout, me: int, num_rows: int) -> int:
    """(query, key) pairs ring rank ``me`` attends over the whole ring: the kernel work, with a
    causal call of ``n`` rows counted as the ``n (n + 1) / 2`` pairs of its lower triangle."""
    total = 0
    for source in range(len(layout.block_lengths)):
        for call in layout.calls(me, source, num_rows):
            rows, keys = _length(call.rows), _length(call.keys)
            total += rows * (rows + 1) // 2 if call.causal else rows * keys
    return total


def ring_front_lengths(total: int, ulysses_degree: int, ring_degree: int) -> tuple[int, ...]:
    """``len F_g`` for every ring rank ``g``: the early super-chunk of its segment."""
    chunks = chunk_sizes(total, ulysses_degree * ring_degree)
    u = ulysses_degree
    return tuple(sum(chunks[g * u : (g + 1) * u]) for g in range(ring_degree))
