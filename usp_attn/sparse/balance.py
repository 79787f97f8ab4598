"""Heads assigned to Ulysses ranks so that per-head sparse work is balanced.

Under Ulysses rank u attends query-head block u. With per-head windows (a tuned mask search
gives each head its own) the heads differ in work by up to the ratio of their densities, and the
step waits for the busiest rank. So the layer permutes the heads before the all-to-all and back
after it: :func:`head_order` picks the permutation.

Work of a head = its kept fraction of (query, key) pairs (exact, from the pattern; the kernel's
time is proportional to the kept blocks, and both follow the window's volume). Heads move in
units of one key/value head with its query heads, so a rank still receives the kv heads its
query heads read; layouts that repeat or pad kv heads across ranks (fewer kv heads than ranks,
heads not divisible) keep the plain order.

The order is a pure function of the pattern and the head counts. The pattern is the same on
every rank of the group (the layer's cross-rank check refuses anything else), so every rank
computes the same order without a collective, which is what "decided on rank 0 and broadcast"
would give, minus the broadcast.
"""

from __future__ import annotations

import functools

__all__ = ["head_order", "rank_loads"]


def _head_work(pattern, num_heads: int) -> list[float]:
    windows = [pattern.head_window(h) for h in range(num_heads)]
    density = {w: type(pattern)(pattern.grid, pattern.tile, w).density() for w in set(windows)}
    return [density[w] for w in windows]


@functools.lru_cache(maxsize=32)
def head_order(pattern, num_heads: int, num_kv_heads: int, degree: int) -> tuple[int, ...] | None:
    """The query-head order that balances ``pattern``'s per-head work over ``degree`` Ulysses ranks.

    Args:
        pattern: a sparse pattern (only a static per-head :class:`SlidingTileSparsity` is balanced).
        num_heads, num_kv_heads: the layer's query and key/value heads.
        degree: the Ulysses degree U.
    Returns:
        ``order`` (python ints, a permutation of ``range(num_heads)``): position ``i`` of the permuted
        heads holds head ``order[i]``; kv heads follow their query heads. ``None`` when the plain order
        is kept (shared windows, dynamic pattern, U == 1, or a layout that cannot move kv heads).
    """
    if degree == 1 or getattr(pattern, "dynamic", True) or not getattr(pattern, "per_head", False):
        return None
    if num_heads % degree or num_kv_heads % degree:
        return None
    group = num_heads // num_kv_heads  # query heads per kv head: they move together
    work = _head_work(pattern, num_heads)
    units = [sum(work[u * group : (u + 1) * group]) for u in range(num_kv_heads)]
    per_rank = num_kv_heads // degree
    bins = _balanced_bins(units, degree, per_rank)
    if max(_loads(bins, units)) >= max(_loads([list(range(r * per_rank, (r + 1) * per_rank))
                                              for r in range(degree)], units)):
        return None  # the plain order is as good: keep it (no permute)
    return tuple(u * group + h for b in bins for u in sorted(b) for h in range(group))


def rank_loads(pattern, num_heads: int, degree: int, order=None) -> list[float]:
    """Work (kept fraction summed over heads) of each Ulysses rank for a head ``order`` (None: plain)."""
    order = list(range(num_heads)) if order is None else list(order)
    work = _head_work(pattern, num_heads)
    per = num_heads // degree
    return [sum(work[h] for h in order[r * per : (r + 1) * per]) for r in range(degree)]


def _loads(bins, units):
    return [sum(units[u] for u in b) for b in bins]


def _balanced_bins(units: list[float], count: int, size: int) -> list[list[int]]:
    """``count`` bins of exactly ``size`` units with the largest bin sum small (deterministic).

    The largest units first, each into the lightest bin with room; then swaps of one unit between two
    bins while one narrows their gap (lowering the sum of squared loads, so it ends), which also
    reaches swaps that only prepare a better one for the heaviest bin.
    """
    bins: list[list[int]] = [[] for _ in range(count)]
    for u in sorted(range(len(units)), key=lambda i: (-units[i], i)):
        open_bins = [b for b in range(count) if len(bins[b]) < size]
        target = min(open_bins, key=lambda b: (sum(units[x] for x in bins[b]), b))
        bins[target].append(u)
    while True:
        loads = _loads(bins, units)
        best = None  # (squared-load decrease, heavy bin, light bin, i, j)
        for a in range(count):
            for b in range(count):
                gap = loads[a] - loads[b]
                if gap <= 1e-12:
                    continue
                for i, x in enumerate(bins[a]):
                    for j, y in enumerate(bins[b]):
                        delta = units[x] - units[y]
                        if 1e-12 < delta < gap - 1e-12:
                            gain = 2 * delta * (gap - delta)
                            if best is None or gain > best[0] + 1e-15:
                                best = (gain, a, b, i, j)
        if best is None:
            return bins
        _, a, b, i, j = best
        bins[a][i], bins[b][j] = bins[b][j], bins[a][i]
