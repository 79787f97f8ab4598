"""Ulysses head balancing for per-head sparse windows (usp_attn.sparse.balance): the order is a permutation
that keeps kv groups together, and the busiest rank's work comes within 5 % of the mean where the plain
split is far off."""

from __future__ import annotations

import itertools
import random

import pytest

from usp_attn.sparse import SlidingTileSparsity, VideoGrid
from usp_attn.sparse.balance import head_order, rank_loads

GRID = VideoGrid(21, 45, 80)  # Wan 14B 720p latents
TILE = (4, 4, 8)
WINDOWS = [(2, 3, 3), (3, 6, 5), (4, 9, 8), (1, 3, 3), (3, 9, 6), (2, 6, 4)]


def _tuned(heads: int, seed: int) -> SlidingTileSparsity:
    """Per-head windows as a mask search gives them: a few distinct windows, unevenly spread."""
    rng = random.Random(seed)
    return SlidingTileSparsity(GRID, TILE, [rng.choice(WINDOWS) for _ in range(heads)])


def _check_order(order, heads, kv_heads):
    assert sorted(order) == list(range(heads))
    group = heads // kv_heads
    for start in range(0, heads, group):  # a kv head's query heads stay together, in order
        first = order[start]
        assert first % group == 0 and list(order[start : start + group]) == list(range(first, first + group))


@pytest.mark.parametrize("heads,degree,seed", [(40, 8, 0), (40, 4, 2)])
def test_busiest_rank_within_5_percent_of_the_mean(heads, degree, seed):
    pattern = _tuned(heads, seed)
    order = head_order(pattern, heads, heads, degree)
    _check_order(order, heads, heads)
    plain, loads = rank_loads(pattern, heads, degree), rank_loads(pattern, heads, degree, order)
    mean = sum(plain) / degree
    assert abs(sum(loads) - sum(plain)) < 1e-9
    assert max(plain) > 1.25 * mean  # the plain split is far off ...
    assert max(loads) <= 1.05 * mean, (loads, mean)  # ... the balanced one within 5 %


def _best_possible(units, count, size):
    """The smallest achievable busiest-bin load, by exhaustive search (small cases only)."""
    best = [float("inf")]

    def place(rest, worst):
        if not rest:
            best[0] = min(best[0], worst)
            return
        for combo in itertools.combinations(rest[1:], size - 1):
            members = (rest[0],) + combo
            load = max(worst, sum(units[x] for x in members))
            if load < best[0]:
                place([x for x in rest if x not in members], load)

    place(list(range(len(units))), 0.0)
    return best[0]


@pytest.mark.parametrize("heads,kv_heads,degree,seed", [(12, 12, 4, 4), (40, 8, 4, 5), (16, 16, 4, 7)])
def test_as_good_as_exhaustive_search_where_5_percent_is_impossible(heads, kv_heads, degree, seed):
    pattern = _tuned(heads, seed)
    order = head_order(pattern, heads, kv_heads, degree)
    _check_order(order, heads, kv_heads)
    group = heads // kv_heads
    work = [sum(rank_loads(pattern, heads, heads)[u * group : (u + 1) * group]) for u in range(kv_heads)]
    best = _best_possible(work, degree, kv_heads // degree)
    assert max(rank_loads(pattern, heads, degree, order)) == pytest.approx(best, rel=1e-12)


def test_plain_order_kept_when_nothing_to_balance():
    shared = SlidingTileSparsity(GRID, TILE, (3, 9, 6))
    assert head_order(shared, 40, 40, 8) is None  # one window for every head
    assert head_order(_tuned(40, 0), 40, 40, 1) is None  # no Ulysses
    assert head_order(_tuned(12, 0), 12, 2, 4) is None  # kv heads repeated across ranks: cannot move
    assert head_order(_tuned(10, 0), 10, 10, 4) is None  # padded heads
