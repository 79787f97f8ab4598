"""Sparse attention composes with Ulysses and ring: every layout of 2 and 4 ranks equals the fp64 masked
reference of the whole sequence (fp32 within 1e-5 relative: one fp32 softmax's rounding, as for dense), with
text rows, uneven shards, GQA, per-head windows and a dynamic pattern (Ulysses only); gradients under
every layout equal the reference's; bad or disagreeing patterns raise the same error on every rank. On the CPU the exact masked path runs; the GPU block kernel
is tested against the same reference in tests/gpu/test_gpu_sparse.py."""

from __future__ import annotations

import functools

import pytest

from tests.distributed import sp_cases, sparse_cases
from tests.helpers.multiproc import runs_per_world
from tests.helpers.state import reset_usp_attn_state

BAD = ("grid", "causal", "dynamic_ring", "type")
GATE_LIMITS = (1e-6, 10.0)  # far below this pattern's error (dense), far above it (sparse)


def _scenarios(world):
    out = []
    for u, r in sp_cases.layouts(world):
        if u * r == 1:
            continue
        for name in sparse_cases.PATTERNS:
            if name == "top_mass" and r > 1 or name == "one_token":  # one_token: EMPTY_SHARDS below
                continue
            for rows in sparse_cases.ROWS:
                out.append((u, r, name, rows))
    return out


ALIGNED = [("tile_major_per_head", "text", 16)]  # shards in 16-token units (128 on a GPU: whole kernel blocks)
EMPTY_SHARDS = [("one_token", "text")]  # ranks holding no grid token, only the text rows


def _cases(world):
    cases = [functools.partial(sparse_cases.layout_matches_reference, *s) for s in _scenarios(world)]
    cases += [functools.partial(sparse_cases.layout_matches_reference, u, r, *a)
              for u, r in sp_cases.layouts(world) if u * r > 1 for a in ALIGNED + EMPTY_SHARDS]
    cases += [functools.partial(sparse_cases.ring_sends_only_what_is_read, u, r) for u, r in _rings(world)]
    cases += [functools.partial(sparse_cases.balanced_heads_match_reference, u, r) for u, r in _ulysses(world)]
    cases += [functools.partial(sparse_cases.gate_verdict_is_the_groups, u, r, e)
              for u, r in sp_cases.layouts(world) if u * r > 1 for e in GATE_LIMITS]
    cases += [functools.partial(sparse_cases.gradients_match_reference, u, r, name) for u, r, name in _grad_cases(world)]
    cases.append(functools.partial(sparse_cases.differing_patterns_fail_alike, 1, world))
    cases += [functools.partial(sparse_cases.bad_pattern_fails_alike, 1, world, what) for what in BAD]
    return cases


def _grad_cases(world):
    """Every layout of ``world`` ranks with each gradient case (the dynamic pattern without ring: refused there)."""
    return [(u, r, name) for u, r in sp_cases.layouts(world) if u * r > 1 for name in sparse_cases.GRAD_CASES
            if not (r > 1 and name == "top_mass")]


def _ulysses(world):
    return [(u, r) for u, r in sp_cases.layouts(world) if u > 1]


def _rings(world):
    return [(u, r) for u, r in sp_cases.layouts(world) if r > 1]


_run = runs_per_world(_cases, setup=reset_usp_attn_state, timeout=300)


def _params(world):
    marks = [pytest.mark.xdist_group(f"sparse_world{world}"), *([pytest.mark.slow] if world >= 4 else [])]
    return marks


@pytest.mark.parametrize("world,u,r,name,rows", [
    pytest.param(w, *s, id=f"W{w}-U{s[0]}xR{s[1]}-{s[2]}-{s[3]}", marks=_params(w))
    for w in (2, 4) for s in _scenarios(w)])
def test_every_layout_equals_the_masked_reference(world, u, r, name, rows):
    results = _run(world).check(functools.partial(sparse_cases.layout_matches_reference, u, r, name, rows))
    for rank, res in enumerate(results):
        assert res["err"] <= sparse_cases.FP32_RTOL, (rank, res)
        assert res["lse_err"] <= 1e-5, (rank, res)
        assert res["one_process_err"] <= sparse_cases.FP32_RTOL, (rank, res)


@pytest.mark.parametrize("world,u,r,name,rows,align", [
    pytest.param(w, u, r, *a, id=f"W{w}-U{u}xR{r}-aligned{a[2]}", marks=_params(w))
    for w in (2, 4) for u, r in sp_cases.layouts(w) if u * r > 1 for a in ALIGNED])
def test_aligned_shards_equal_the_masked_reference(world, u, r, name, rows, align):
    results = _run(world).check(functools.partial(sparse_cases.layout_matches_reference, u, r, name, rows, align))
    for rank, res in enumerate(results):
        assert res["err"] <= sparse_cases.FP32_RTOL and res["gather_err"] <= sparse_cases.FP32_RTOL, (rank, res)


@pytest.mark.parametrize("world,u,r,name,rows", [
    pytest.param(w, u, r, *a, id=f"W{w}-U{u}xR{r}-{a[0]}", marks=_params(w))
    for w in (2, 4) for u, r in sp_cases.layouts(w) if u * r > 1 for a in EMPTY_SHARDS])
def test_ranks_without_grid_tokens_equal_the_masked_reference(world, u, r, name, rows):
    """A one-token grid: every rank but one holds only the text rows (a ring hop with no query row used to crash
    there while its peers waited)."""
    results = _run(world).check(functools.partial(sparse_cases.layout_matches_reference, u, r, name, rows))
    for rank, res in enumerate(results):
        assert res["err"] <= sparse_cases.FP32_RTOL and res["gather_err"] <= sparse_cases.FP32_RTOL, (rank, res)
        assert res["lse_err"] <= 1e-5 and res["one_process_err"] <= sparse_cases.FP32_RTOL, (rank, res)


@pytest.mark.parametrize("world", [pytest.param(w, marks=_params(w)) for w in (2, 4)])
def test_patterns_that_differ_across_ranks_fail_alike(world):
    results = _run(world).check(functools.partial(sparse_cases.differing_patterns_fail_alike, 1, world))
    messages = [m for m, _ in results]
    assert len(set(messages)) == 1 and "sparsity" in messages[0], messages
    assert all(seconds < 5 for _, seconds in results), results


@pytest.mark.parametrize("world,what", [pytest.param(w, what, marks=_params(w)) for w in (2, 4) for what in BAD])
def test_bad_patterns_fail_alike(world, what):
    messages = _run(world).check(functools.partial(sparse_cases.bad_pattern_fails_alike, 1, world, what))
    assert len(set(messages)) == 1, messages
    expected = {"grid": "grid", "causal": "causal", "dynamic_ring": "ring", "grad": "no_grad",
                "type": "sparsity must be"}[what]
    assert expected in messages[0], messages[0]


@pytest.mark.parametrize("world,u,r", [pytest.param(w, u, r, id=f"W{w}-U{u}xR{r}", marks=_params(w))
                                       for w in (2, 4) for u, r in _rings(w)])
def test_ring_sends_only_the_segments_a_rank_reads(world, u, r):
    """Frames are contiguous segments; ring 4 with a 3-frame-tile window: a rank reads its two neighbours
    (both directions), never the rank two away; ring 2 with a 1-frame window reads nothing across."""
    results = _run(world).check(functools.partial(sparse_cases.ring_sends_only_what_is_read, u, r))
    for sp_rank, res in enumerate(results):
        assert res["err"] <= sparse_cases.FP32_RTOL, (sp_rank, res)
        ring_rank, ring_of = sp_rank // u, [x for x in range(world) if x % u == sp_rank % u]
        if r == 2:
            assert res["sent_to"] == [], (sp_rank, res)
        else:  # K and V to each neighbour that reads them (ring ends: one neighbour)
            readers = [ring_of[x] for x in (ring_rank - 1, ring_rank + 1) if 0 <= x < r]
            assert sorted(res["sent_to"]) == sorted(readers * 2), (sp_rank, res)


@pytest.mark.parametrize("world,u,r", [pytest.param(w, u, r, id=f"W{w}-U{u}xR{r}", marks=_params(w))
                                       for w in (2, 4) for u, r in _ulysses(w)])
def test_heads_balanced_across_ulysses_ranks_keep_the_result(world, u, r):
    """The head permutation is undone exactly: output (grid and text rows) and LSE in the layer's head order."""
    from usp_attn.sparse.balance import head_order

    if u == 2:
        assert head_order(sparse_cases.UNEVEN_HEADS, 4, 4, 2) is not None  # the case really permutes
    results = _run(world).check(functools.partial(sparse_cases.balanced_heads_match_reference, u, r))
    for rank, res in enumerate(results):
        assert res["err"] <= sparse_cases.FP32_RTOL and res["lse_err"] <= 1e-5, (rank, res)


@pytest.mark.parametrize("world,u,r,limit", [pytest.param(w, u, r, e, id=f"W{w}-U{u}xR{r}-max{e:g}", marks=_params(w))
                                             for w in (2, 4) for u, r in sp_cases.layouts(w) if u * r > 1
                                             for e in GATE_LIMITS])
def test_the_accuracy_gate_decides_for_the_whole_group(world, u, r, limit):
    results = _run(world).check(functools.partial(sparse_cases.gate_verdict_is_the_groups, u, r, limit))
    keep = limit > 1
    for rank, res in enumerate(results):
        assert res["verdicts"] == [keep], (rank, res)  # one judged class, the same verdict everywhere
        assert res["same_twice"], (rank, res)
        assert (res["sparse_err"] if keep else res["dense_err"]) <= sparse_cases.FP32_RTOL, (rank, res)
        assert (res["dense_err"] if keep else res["sparse_err"]) > 1e-3, (rank, res)  # the two really differ


@pytest.mark.parametrize("world,u,r,name", [pytest.param(w, *c, id=f"W{w}-U{c[0]}xR{c[1]}-{c[2]}", marks=_params(w))
                                            for w in (2, 4) for c in _grad_cases(w)])
def test_gradients_equal_the_masked_reference(world, u, r, name):
    """Sparse training in every layout: Ulysses (heads permuted for balance), ring (each hop's part of the
    pattern, forward and backward) and both."""
    from usp_attn.sparse.balance import head_order

    if name == "uneven_heads" and u == 2:
        assert head_order(sparse_cases.UNEVEN_HEADS, 4, 4, 2) is not None  # the case really permutes
    for rank, errors in enumerate(_run(world).check(functools.partial(sparse_cases.gradients_match_reference, u, r,
                                                                      name))):
        assert max(errors.values()) <= sparse_cases.GRAD_RTOL, (rank, errors)
