"""The ring's block plan (usp_attn.ring.plan) and the zigzag layout (distributed/zigzag):
exact coverage of the causal structure in every layout, and per-rank causal work.

Positions are global token indices; a rank's query rows and a block's keys are given as lists
of positions in the order the ring holds them (after the Ulysses all-to-all and, for zigzag,
its reorder to [F_g | B_g]). The plan is exact when the (query, key) pairs its calls cover are
each covered once and are exactly the pairs causal (or full) attention needs.
"""

from __future__ import annotations

import collections

import pytest
import torch

from usp_attn.distributed.state import shard_sizes
from usp_attn.distributed.zigzag import (
    chunk_sizes,
    rank_chunks,
    shard_zigzag,
    to_global_order,
    to_rank_order,
    zigzag_sizes,
)
from usp_attn.ring.plan import RingLayout, pairs_attended, ring_front_lengths


def _layouts(world):
    return [(u, world // u) for u in range(1, world + 1) if world % u == 0]


def _ring_positions(total, u, r, balanced):
    """Global positions of each ring rank's rows (= its K/V block), in the order the ring holds them."""
    if balanced:
        chunks = chunk_sizes(total, u * r)
        starts = [sum(chunks[:i]) for i in range(len(chunks))]

        def run(first, count):
            return [p for c in range(first, first + count) for p in range(starts[c], starts[c] + chunks[c])]

        return [run(g * u, u) + run(2 * u * r - u - g * u, u) for g in range(r)]
    sizes = shard_sizes(total, u * r)
    bounds = [sum(sizes[: g * u]) for g in range(r + 1)]
    return [list(range(bounds[g], bounds[g + 1])) for g in range(r)]


def _covered(layout, me, rows, blocks):
    pairs = collections.Counter()
    for source in range(len(blocks)):
        for call in layout.calls(me, source, len(rows)):
            q_pos = rows[call.rows]
            k_pos = blocks[source][call.keys]
            for i, qp in enumerate(q_pos):
                for j, kp in enumerate(k_pos):
                    if not call.causal or j <= i:
                        pairs[(qp, kp)] += 1
    return pairs


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("balanced", [False, True], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_plan_covers_exactly_the_attended_pairs(world, balanced, causal):
    for total in (4 * world + 3, 2 * world, 3):  # uneven, even, and fewer tokens than chunks
        for u, r in _layouts(world):
            positions = _ring_positions(total, u, r, balanced)
            assert sorted(p for block in positions for p in block) == list(range(total))
            blocks = tuple(len(b) for b in positions)
            fronts = ring_front_lengths(total, u, r) if balanced else None
            layout = RingLayout(blocks, causal, fronts if causal else None)
            for me, rows in enumerate(positions):
                covered = _covered(layout, me, rows, positions)
                want = {(i, j) for i in rows for j in range(total) if not causal or j <= i}
                assert set(covered) == want, (total, u, r, me)
                assert max(covered.values(), default=1) == 1, (total, u, r, me)  # each pair once
                assert pairs_attended(layout, me, len(rows)) == len(want)


def test_zigzag_shards_and_orders():
    world, total = 4, 23
    x = torch.arange(total)
    chunks = torch.tensor_split(x, 2 * world)
    shards = [shard_zigzag(x, 0, world, r) for r in range(world)]
    for r, shard in enumerate(shards):
        assert torch.equal(shard, torch.cat([chunks[r], chunks[2 * world - 1 - r]]))
        assert len(shard) == zigzag_sizes(total, world)[r] == sum(rank_chunks(total, world, r))
    pieces = [rank_chunks(total, world, r) for r in range(world)]
    rank_major = torch.cat(shards)
    assert torch.equal(to_global_order(rank_major, pieces, 0), x)
    assert torch.equal(to_rank_order(x, pieces, 0), rank_major)
    # One Ulysses group of 2 (ring rank 1 of R = 2): its segment reordered is [F_1 | B_1], ascending.
    group = to_global_order(torch.cat(shards[2:]), pieces[2:], 0)
    front = ring_front_lengths(total, 2, 2)[1]
    assert torch.equal(group[:front], torch.cat(chunks[2:4]))  # F_1: chunks 2, 3
    assert torch.equal(group[front:], torch.cat(chunks[4:6]))  # B_1: chunks 4, 5


def _per_rank_work(total, u, r, heads, balanced):
    """Kernel work of every SP rank: its heads x the (query, key) pairs of its ring rank's plan."""
    sizes = zigzag_sizes(total, u * r) if balanced else shard_sizes(total, u * r)
    blocks = tuple(sum(sizes[g * u : (g + 1) * u]) for g in range(r))
    layout = RingLayout(blocks, True, ring_front_lengths(total, u, r) if balanced else None)
    return [heads // u * pairs_attended(layout, g, blocks[g]) for g in range(r) for _ in range(u)]


@pytest.mark.parametrize("world", range(2, 9))
def test_zigzag_balances_causal_work(world):
    """Zigzag: every rank within 10 % of the mean in every layout (measured: within 0.3 %);
    contiguous shards: the last ring rank does up to ~2x the mean (R > 1)."""
    heads = 840  # divisible by every U up to 8
    for total in (32760, 75600, 4097):
        for u, r in _layouts(world):
            balanced = _per_rank_work(total, u, r, heads, True)
            contiguous = _per_rank_work(total, u, r, heads, False)
            assert sum(balanced) == sum(contiguous)  # the same causal work, distributed differently
            mean = sum(balanced) / world
            assert max(balanced) <= 1.10 * mean and min(balanced) >= 0.90 * mean, (total, u, r, balanced)
            if r > 1:
                assert max(contiguous) >= (2 * r - 1) / r * 0.95 * mean, (total, u, r, contiguous)


@pytest.mark.parametrize("total", [0, 1, 127, 128, 1000, 75600])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_aligned_shards_start_on_whole_units(total, world):
    """``shard_sizes(total, world, align)``: tensor_split of align-token units, the tail unit on the last rank
    holding any; align 1 is plain tensor_split."""
    sizes = shard_sizes(total, world, 128)
    assert sum(sizes) == total and len(sizes) == world
    starts = [sum(sizes[:i]) for i in range(world) if sizes[i]]  # an empty shard starts nowhere
    assert all(s % 128 == 0 for s in starts)
    assert max(sizes) - min(sizes) <= 128 + 127  # at most one unit apart, plus the partial tail
    assert shard_sizes(total, world) == tuple(t.shape[0] for t in torch.tensor_split(torch.empty(total), world))
