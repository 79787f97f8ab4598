"""usp_attn.sparse: sparse video attention patterns checked against brute force.

The sliding-tile reference below is written from the definition alone (python min/max over
each token's tile coordinate, tile-major order from a sort by tile coordinates), and the
attention reference is an independent fp64 softmax, so the library's vectorised masks,
Kronecker block counts and permutation trick are all checked against something that does
not share their code.

Tolerances: fp32 masked_reference vs the fp64 reference, relative Frobenius error <= 1e-5:
scores and softmax in fp32 over at most ~220 keys of D=16 err ~1e-7 relative, so 1e-5 is
loose yet far below any masking mistake (a wrong mask shifts outputs by O(1)).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import pytest
import torch

from usp_attn.sparse import (
    SlidingTileSparsity,
    SparsityPattern,
    TopMassSparsity,
    VideoGrid,
    masked_reference,
    sparsity_error,
    tile_major_inverse_permutation,
    tile_major_permutation,
)



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: with intra-op threads on a loaded shared machine every op waits for
    # the other thread to be scheduled (measured 4000x slower at load 13); restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- brute force


def _tokens(grid, tile, order):
    """Grid coordinates of the tokens in the given order (definition of tile-major order)."""
    f_, h_, w_ = grid
    coords = [(f, y, x) for f in range(f_) for y in range(h_) for x in range(w_)]
    if order == "tile_major":  # full tiles first, then the partial edge tiles; each in tile order
        def full(c):
            return all((c[d] // tile[d] + 1) * tile[d] <= grid[d] for d in range(3))
        coords.sort(key=lambda c: (not full(c), c[0] // tile[0], c[1] // tile[1], c[2] // tile[2], c))
        volume, n_full = math.prod(tile), sum(map(full, coords))
        chunks = (len(coords) - n_full) // 128
        if volume % 128 == 0 and chunks and n_full:  # 128-token chunks of edge tokens between the full tiles
            tiles = [coords[i : i + volume] for i in range(0, n_full, volume)]
            edge = coords[n_full:]
            out = []
            for t in range(len(tiles) + 1):  # chunk j goes after floor((j + 1) F / (C + 1)) full tiles
                out += [c for j in range(chunks) if (j + 1) * len(tiles) // (chunks + 1) == t
                        for c in edge[j * 128 : (j + 1) * 128]]
                out += tiles[t] if t < len(tiles) else []
            coords = out + edge[chunks * 128 :]
    return coords


@functools.lru_cache(maxsize=None)
def _brute_mask(grid, tile, window, order="row_major"):
    """bool [N, N] straight from the definition (cached: several tests reuse the same masks)."""
    n = [math.ceil(s / t) for s, t in zip(grid, tile)]

    def start(c, d):
        return min(max(c - (window[d] - 1) // 2, 0), max(0, n[d] - window[d]))

    tiles = [[c[d] // tile[d] for d in range(3)] for c in _tokens(grid, tile, order)]
    starts = torch.tensor([[start(t[d], d) for d in range(3)] for t in tiles])
    tiles = torch.tensor(tiles)
    mask = torch.ones(len(tiles), len(tiles), dtype=torch.bool)
    for d in range(3):
        kd = tiles[None, :, d]
        mask &= (kd >= starts[:, None, d]) & (kd < starts[:, None, d] + window[d])
    return mask


def _ref_attention(q, k, v, mask, scale=None):
    """fp64 softmax attention; mask bool [B|1, H|1, S, S] or None; empty rows -> 0, lse -inf."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.nan_to_num(lse, neginf=0.0)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def _with_text(grid_mask, prefix, suffix):
    """[..., N, N] grid mask -> [..., S, S] with the text rows and columns dense."""
    n = grid_mask.shape[-1]
    s = prefix + n + suffix
    full = torch.ones(*grid_mask.shape[:-2], s, s, dtype=torch.bool)
    full[..., prefix:prefix + n, prefix:prefix + n] = grid_mask
    return full


def _blockify(mask, bq, bk):
    """[..., Sq, Sk] -> (any, all) [..., nQb, nKb] over consecutive-row blocks (last partial).

    Pads to whole blocks with False (for any) / True (for all), so padding never decides.
    """
    sq, sk = mask.shape[-2:]
    nqb, nkb = -(-sq // bq), -(-sk // bk)
    pad = (0, nkb * bk - sk, 0, nqb * bq - sq)
    out = []
    for fill, reduce in ((False, torch.any), (True, torch.all)):
        m = torch.nn.functional.pad(mask.to(torch.uint8), pad, value=int(fill)).bool()
        m = m.reshape(*mask.shape[:-2], nqb, bq, nkb, bk)
        out.append(reduce(reduce(m, dim=-1), dim=-2))
    return tuple(out)


def _rel(a, b):
    return (torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double())).item()


GRID, TILE = (5, 6, 7), (2, 4, 3)  # 3 x 2 x 3 tiles, partial in every dimension
ALL_WINDOWS = list(itertools.product(range(1, 5), range(1, 4), range(1, 5)))  # 1..n+1 per dim


# ----------------------------------------------------------------------------- sliding tile masks


@pytest.mark.parametrize("order", ["row_major", "tile_major"])
def test_sliding_tile_mask_matches_definition_every_window(order):
    n = math.prod(GRID)
    pos = torch.arange(n)
    for window in ALL_WINDOWS:
        p = SlidingTileSparsity(VideoGrid(*GRID), TILE, window, token_order=order)
        got = p.token_mask(pos, pos, [0])
        assert got.shape == (1, n, n) and got.dtype == torch.bool
        assert torch.equal(got[0], _brute_mask(GRID, TILE, window, order)), window


@pytest.mark.parametrize("grid,tile,window", [
    ((3, 5, 4), (3, 2, 4), (1, 2, 1)),   # one tile in frames and width
    ((4, 4, 4), (2, 2, 2), (2, 1, 3)),   # exact multiple, even window
    ((2, 9, 5), (1, 4, 2), (5, 3, 2)),   # window larger than the frame dimension
    ((1, 1, 1), (1, 1, 1), (1, 1, 1)),
])
@pytest.mark.parametrize("order", ["row_major", "tile_major"])
def test_sliding_tile_mask_other_grids(grid, tile, window, order):
    n = math.prod(grid)
    p = SlidingTileSparsity(grid, tile, window, token_order=order)
    pos = torch.arange(n)
    assert torch.equal(p.token_mask(pos, pos, range(3))[0], _brute_mask(grid, tile, window, order))


def test_sliding_tile_mask_on_subsets_of_positions():
    p = SlidingTileSparsity(VideoGrid(*GRID), TILE, (2, 1, 2))
    full = _brute_mask(GRID, TILE, (2, 1, 2))
    qp = torch.tensor([5, 0, 209, 100, 100])
    kp = torch.arange(60, 150)
    assert torch.equal(p.token_mask(qp, kp, [0])[0], full[qp][:, kp])


def test_per_head_windows():
    windows = [(1, 1, 1), (3, 2, 3), (2, 1, 2), (1, 1, 1)]
    p = SlidingTileSparsity(VideoGrid(*GRID), TILE, windows)
    assert p.window == tuple(windows) and p.per_head
    pos = torch.arange(math.prod(GRID))
    m = p.token_mask(pos, pos, range(4))
    assert m.shape == (4, 210, 210)
    for h, w in enumerate(windows):
        assert torch.equal(m[h], _brute_mask(GRID, TILE, w))
    # Heads sharing one window collapse to a broadcastable head dim of 1.
    assert p.token_mask(pos, pos, [0, 3]).shape == (1, 210, 210)
    m21 = p.token_mask(pos, pos, [2, 1])
    assert torch.equal(m21[0], m[2]) and torch.equal(m21[1], m[1])
    p.check(210, 4)
    assert p.density(4) == pytest.approx(sum(_brute_mask(GRID, TILE, w).double().mean().item()
                                             for w in windows) / 4, abs=1e-15)


@pytest.mark.parametrize("order", ["row_major", "tile_major"])
def test_density_matches_brute_count(order):
    for window in ALL_WINDOWS:
        p = SlidingTileSparsity(VideoGrid(*GRID), TILE, window, token_order=order)
        kept = _brute_mask(GRID, TILE, window).sum().item()
        assert p.density() == pytest.approx(kept / 210 ** 2, abs=1e-15), window
        assert p.density(12) == p.density()
    assert SlidingTileSparsity(GRID, TILE, (9, 9, 9)).density() == 1.0


# ----------------------------------------------------------------------------- reference attention


@pytest.mark.parametrize("order", ["row_major", "tile_major"])
@pytest.mark.parametrize("prefix,suffix", [(0, 0), (3, 2)])
def test_masked_reference_fp32_vs_fp64_brute(order, prefix, suffix):
    windows = [(1, 1, 2), (2, 2, 1), (3, 1, 3), (1, 2, 2)]
    p = SlidingTileSparsity(GRID, TILE, windows, token_order=order)
    g = torch.Generator().manual_seed(0)
    s = prefix + 210 + suffix
    q = torch.randn(2, s, 4, 16, generator=g)
    k = torch.randn(2, s, 2, 16, generator=g)  # GQA: 2 query heads per kv head
    v = torch.randn(2, s, 2, 16, generator=g)
    out, lse = masked_reference(q, k, v, p, num_replicated_prefix=prefix, num_replicated_suffix=suffix,
                                return_lse=True)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, s)
    mask = _with_text(torch.stack([_brute_mask(GRID, TILE, w, order) for w in windows]), prefix, suffix)[None]
    ref, ref_lse = _ref_attention(q, k, v, mask)
    assert _rel(out, ref) <= 1e-5
    assert _rel(lse, ref_lse) <= 1e-5
    # Text rows see every key: identical to dense attention on those rows.
    dense, _ = _ref_attention(q, k, v, None)
    text_rows = list(range(prefix)) + list(range(prefix + 210, s))
    if text_rows:
        assert _rel(out[:, text_rows], dense[:, text_rows]) <= 1e-5


def test_masked_reference_fp64_and_bf16_dtypes():
    p = SlidingTileSparsity(GRID, TILE, (2, 1, 2))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 212, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, lse = masked_reference(q, k, v, p, num_replicated_suffix=2, return_lse=True, scale=0.3)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    ref, ref_lse = _ref_attention(q, k, v, _with_text(_brute_mask(GRID, TILE, (2, 1, 2)), 0, 2), scale=0.3)
    assert _rel(out, ref) <= 1e-12 and _rel(lse, ref_lse) <= 1e-12
    out16, lse16 = masked_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), p, num_replicated_suffix=2,
                                    return_lse=True)
    assert out16.dtype == torch.bfloat16 and lse16.dtype == torch.float32


class _EmptyRowPattern(SparsityPattern):
    """Grid query 0 keeps no key: the reference must give 0 there, not NaN."""

    def check(self, num_tokens, num_heads):
        pass

    def token_mask(self, q_pos, k_pos, heads, *, q=None, k=None, scale=None):
        m = torch.ones(1, q_pos.numel(), k_pos.numel(), dtype=torch.bool)
        m[:, q_pos == 0] = False
        return m

    def block_masks(self, *a, **kw):
        raise NotImplementedError

    def density(self, num_heads=1):
        raise NotImplementedError

    def with_token_order(self, token_order):
        return self


def test_masked_reference_row_without_keys_is_zero():
    q, k, v = (torch.randn(1, 6, 2, 4) for _ in range(3))
    out, lse = masked_reference(q, k, v, _EmptyRowPattern(), return_lse=True)
    assert torch.equal(out[0, 0], torch.zeros(2, 4)) and torch.isneginf(lse[0, :, 0]).all()
    assert torch.isfinite(out).all()


def test_sparsity_error_static():
    p = SlidingTileSparsity(GRID, TILE, [(1, 1, 1), (2, 2, 2)])
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 214, 2, 8, generator=g) for _ in range(3))
    density, err = sparsity_error(q, k, v, p, num_replicated_prefix=4)
    assert density == pytest.approx(p.density(2), abs=1e-15)
    mask = _with_text(torch.stack([_brute_mask(GRID, TILE, w) for w in p.window]), 4, 0)[None]
    sparse, _ = _ref_attention(q, k, v, mask)
    dense, _ = _ref_attention(q, k, v, None)
    assert err == pytest.approx(_rel(sparse, dense), rel=1e-9)
    assert sparsity_error(q, k, v, SlidingTileSparsity(GRID, TILE, (3, 2, 3)), num_replicated_prefix=4) == (1.0, 0.0)


# ----------------------------------------------------------------------------- block masks


@pytest.mark.parametrize("order", ["row_major", "tile_major"])
@pytest.mark.parametrize("block", [(16, 16), (13, 29), (64, 7), (210, 210), 1])
@pytest.mark.parametrize("grid,tile,windows", [
    (GRID, TILE, [(1, 1, 1), (2, 1, 2), (3, 2, 1)]),
    # >= 3 tiles in every dimension, so the per-dimension window matrices are asymmetric and a
    # transposed one would show.
    ((3, 10, 7), (1, 3, 2), [(2, 2, 2), (1, 3, 1), (3, 2, 4)]),
])
def test_block_masks_agree_with_token_mask(order, block, grid, tile, windows):
    p = SlidingTileSparsity(grid, tile, windows, token_order=order)
    n = math.prod(grid)
    bq, bk = (block, block) if isinstance(block, int) else block
    shards = [(torch.arange(n), torch.arange(n)),
              (torch.arange(70, 140), torch.arange(n)),      # a query shard
              (torch.arange(0, 105), torch.arange(105, n)),  # ring step: other rank's keys
              (torch.tensor([7, 3, 200, 41, 42, 43]), torch.arange(30, 101))]
    for qp, kp in shards:
        for heads in ([0, 1, 2], [1], [2, 0, 2]):
            tm = p.token_mask(qp, kp, heads)
            a, b = p.block_masks(qp, kp, heads, block)
            ea, eb = _blockify(tm, bq, bk)
            assert a.shape == ea.shape and a.dtype == torch.bool
            assert torch.equal(a, ea) and torch.equal(b, eb), (qp[:3], heads)


def test_block_masks_at_full_video_scale_is_cheap():
    # 118,800 tokens (33 x 60 x 60), 128-token blocks: no S x S tensor anywhere.
    p = SlidingTileSparsity((33, 60, 60), (3, 6, 6), (3, 3, 3), token_order="tile_major")
    pos = torch.arange(118_800)
    a, b = p.block_masks(pos, pos, range(4))
    assert a.shape == b.shape == (1, 929, 929)
    assert bool((a | ~b).all()) and 0 < a.double().mean().item() < 1
    # Kept blocks cover at least the kept pairs: block density >= pair density >= full-block density.
    assert a.double().mean().item() >= p.density() * 0.99 >= b.double().mean().item() * 0.99


# ----------------------------------------------------------------------------- token order


@pytest.mark.parametrize("grid,tile", [(GRID, TILE), ((4, 4, 4), (2, 2, 2)), ((3, 7, 5), (1, 7, 5)),
                                       ((5, 9, 16), (2, 4, 16)), ((9, 9, 17), (2, 4, 16))])
def test_tile_major_permutation(grid, tile):
    n = math.prod(grid)
    perm = tile_major_permutation(VideoGrid(*grid), tile)
    inv = tile_major_inverse_permutation(grid, tile)
    assert perm.dtype == torch.int64 and perm.shape == (n,)
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    x = torch.randn(2, n, 3)
    assert torch.equal(x[:, perm][:, inv], x) and torch.equal(x[:, inv][:, perm], x)
    # The permuted order is the definition's tile-major order ...
    rm = _tokens(grid, tile, "row_major")
    assert [rm[i] for i in perm.tolist()] == _tokens(grid, tile, "tile_major")
    # ... so every full tile is one contiguous run of tf*th*tw tokens on whole blocks (tiles of 128k tokens:
    # 128-token blocks; otherwise at multiples of the volume, all before the edge tiles, each also one run).
    tids = [tuple(c[d] // tile[d] for d in range(3)) for c in _tokens(grid, tile, "tile_major")]
    runs = [(t, len(list(g))) for t, g in itertools.groupby(tids)]
    volume = math.prod(tile)
    if volume % 128:
        assert len(runs) == len(set(tids)) == math.prod(math.ceil(s / t) for s, t in zip(grid, tile))
    starts = [0] + list(itertools.accumulate(length for _, length in runs))
    full_runs = 0
    for (t, length), start in zip(runs, starts):
        if all((t[d] + 1) * tile[d] <= grid[d] for d in range(3)):
            full_runs += 1
            assert length == volume and start % (128 if volume % 128 == 0 else volume) == 0, (t, start)
    assert full_runs == math.prod(s // t for s, t in zip(grid, tile))
    perm[0] = -1  # the cached permutation must not be shared with callers
    assert tile_major_permutation(grid, tile)[0] != -1


def test_with_token_order_is_the_same_pattern_reordered():
    p = SlidingTileSparsity(GRID, TILE, [(2, 1, 2), (1, 2, 3)])
    t = p.with_token_order("tile_major")
    assert t.token_order == "tile_major" and t.window == p.window and t.with_token_order("row_major") == p
    perm = tile_major_permutation(GRID, TILE)
    pos = torch.arange(210)
    assert torch.equal(t.token_mask(pos, pos, [0, 1]), p.token_mask(pos, pos, [0, 1])[:, perm][:, :, perm])
    assert t.density(2) == p.density(2)


def test_patterns_are_frozen_and_hashable():
    a = SlidingTileSparsity(VideoGrid(5, 6, 7), [2, 4, 3], [[1, 1, 1], [2, 2, 2]])
    b = SlidingTileSparsity((5, 6, 7), (2, 4, 3), ((1, 1, 1), (2, 2, 2)))
    assert a == b and hash(a) == hash(b) and len({a, b, TopMassSparsity(0.9), TopMassSparsity(0.9)}) == 2
    assert isinstance(a.window[0], tuple) and isinstance(a.tile, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.tile = (1, 1, 1)
    assert not a.dynamic and TopMassSparsity(0.5).dynamic


# ----------------------------------------------------------------------------- top mass


def _brute_top_mass(q, k, mass, block, scale=None):
    """[B, H, nQB, nKB] selection straight from the definition, python loops over blocks."""
    bsz, sq, h, d = q.shape
    sk, group = k.shape[1], h // k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qb = [(i, min(i + block, sq)) for i in range(0, sq, block)]
    kb = [(j, min(j + block, sk)) for j in range(0, sk, block)]
    out = torch.zeros(bsz, h, len(qb), len(kb), dtype=torch.bool)
    for b in range(bsz):
        for hh in range(h):
            kbar = [k[b, j0:j1, hh // group].double().mean(0) for j0, j1 in kb]
            for i, (i0, i1) in enumerate(qb):
                qbar = q[b, i0:i1, hh].double().mean(0)
                s = torch.stack([scale * qbar @ kb_ + math.log(j1 - j0) for kb_, (j0, j1) in zip(kbar, kb)])
                p = torch.softmax(s, 0).tolist()
                acc = 0.0
                for j in sorted(range(len(kb)), key=lambda j: -p[j]):
                    out[b, hh, i, j] = True
                    acc += p[j]
                    if acc >= mass:
                        break
    return out


def _qk(seed, s=100, h=4, h_kv=2, d=8, b=2, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish tokens (block structure like video latents) plus noise, scaled so that the
    # block scores are far from uniform and the mass threshold actually selects.
    base_q = torch.randn(b, s // 10 + 1, h, d, generator=g).repeat_interleave(10, 1)[:, :s]
    base_k = torch.randn(b, s // 10 + 1, h_kv, d, generator=g).repeat_interleave(10, 1)[:, :s]
    q = spread * base_q + 0.3 * torch.randn(b, s, h, d, generator=g)
    k = spread * base_k + 0.3 * torch.randn(b, s, h_kv, d, generator=g)
    v = torch.randn(b, s, h_kv, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("mass", [0.3, 0.8, 0.95])
def test_top_mass_matches_definition(mass):
    q, k, _ = _qk(3)
    p = TopMassSparsity(mass, block=16)  # 100 tokens: 7 blocks, the last of 4 tokens
    got = p.block_selection(q.double(), k.double())
    assert got.shape == (2, 4, 7, 7)
    assert torch.equal(got, _brute_top_mass(q, k, mass, 16))
    assert torch.equal(p.block_selection(q, k, [3, 0]), got[:, [3, 0]])


def test_top_mass_one_is_exactly_dense():
    q, k, v = _qk(4, spread=30.0)  # extreme logits: small blocks' softmax weights underflow to 0
    p = TopMassSparsity(1.0, block=16)
    pos = torch.arange(100)
    assert p.token_mask(pos, pos, range(4), q=q, k=k).all()
    a, b = p.block_masks(pos, pos, range(4), (32, 8), q=q, k=k)
    assert a.all() and b.all()
    out = masked_reference(q, k, v, p, num_replicated_prefix=5)
    dense = masked_reference(q, k, v, None, num_replicated_prefix=5)
    assert torch.equal(out, dense)
    assert sparsity_error(q, k, v, p) == (1.0, 0.0)
    # Just below 1 may legitimately drop blocks whose estimated mass rounds to nothing.
    assert TopMassSparsity(0.999999, block=16).block_selection(q, k).double().mean() < 1


def test_top_mass_smaller_mass_keeps_fewer_blocks():
    q, k, v = _qk(5)
    masses = [1.0, 0.99, 0.9, 0.7, 0.5, 0.2, 1e-6]
    sels = [TopMassSparsity(m, block=16).block_selection(q, k) for m in masses]
    for big, small in zip(sels, sels[1:]):
        assert bool((big | ~small).all())  # nested: every block kept at the smaller mass is kept at the larger
    assert sels[-1].sum(-1).eq(1).all()  # a tiny mass keeps exactly the top block
    densities = [sparsity_error(q, k, v, TopMassSparsity(m, block=16))[0] for m in masses]
    errors = [sparsity_error(q, k, v, TopMassSparsity(m, block=16))[1] for m in masses]
    assert densities == sorted(densities, reverse=True) and densities[0] == 1.0 > densities[-1]
    assert errors[0] == 0.0 < errors[-1]


def test_top_mass_masks_shapes_and_block_agreement():
    q, k, v = _qk(6, s=100)
    p = TopMassSparsity(0.8, block=16)
    pos = torch.arange(100)
    tm = p.token_mask(pos, pos, [1, 2], q=q, k=k)
    assert tm.shape == (2, 2, 100, 100) and tm.dtype == torch.bool
    sel = p.block_selection(q, k, [1, 2])
    assert torch.equal(tm, sel.repeat_interleave(16, 2).repeat_interleave(16, 3)[:, :, :100, :100])
    cases = [(pos, pos, (16, 16)),                              # aligned: the selection itself
             (torch.arange(32, 64), pos, (16, 16)),             # aligned shard
             (pos, pos, (24, 10)),                              # kernel blocks straddle pattern blocks
             (torch.arange(40, 90), torch.arange(5, 77), (16, 7)),
             (torch.tensor([99, 0, 17, 18, 50]), pos, (2, 33))]
    for qp, kp, blk in cases:
        a, b = p.block_masks(qp, kp, [1, 2], blk, q=q, k=k)
        ea, eb = _blockify(p.token_mask(qp, kp, [1, 2], q=q, k=k), *blk)
        assert a.shape == ea.shape == (2, 2, -(-qp.numel() // blk[0]), -(-kp.numel() // blk[1]))
        assert torch.equal(a, ea) and torch.equal(b, eb), blk
    density, err = sparsity_error(q, k, v, p)
    assert density == pytest.approx(p.token_mask(pos, pos, range(4), q=q, k=k).double().mean().item(), abs=1e-15)
    assert 0 < density < 1 and 0 < err < math.inf


def test_top_mass_density_points_to_sparsity_error():
    with pytest.raises(TypeError, match="sparsity_error"):
        TopMassSparsity(0.9).density()
    with pytest.raises(ValueError, match="needs q"):
        TopMassSparsity(0.9).token_mask(torch.arange(4), torch.arange(4), [0])


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("make,exc,words", [
    (lambda: VideoGrid(0, 6, 7), ValueError, "frames"),
    (lambda: VideoGrid(5, True, 7), TypeError, "height"),
    (lambda: VideoGrid(5, 6, 7.0), TypeError, "width"),
    (lambda: SlidingTileSparsity(GRID, (2, 0, 3), (1, 1, 1)), ValueError, "tile[1]"),
    (lambda: SlidingTileSparsity(GRID, (2, -4, 3), (1, 1, 1)), ValueError, "tile[1]"),
    (lambda: SlidingTileSparsity(GRID, (2, 4, 1.5), (1, 1, 1)), TypeError, "tile[2]"),
    (lambda: SlidingTileSparsity(GRID, (True, 4, 3), (1, 1, 1)), TypeError, "tile[0]"),
    (lambda: SlidingTileSparsity(GRID, (2, 4), (1, 1, 1)), ValueError, "tile"),
    (lambda: SlidingTileSparsity(GRID, 2, (1, 1, 1)), TypeError, "tile"),
    (lambda: SlidingTileSparsity(GRID, TILE, (1, 0, 1)), ValueError, "window[1]"),
    (lambda: SlidingTileSparsity(GRID, TILE, (1, 1, False)), TypeError, "window[2]"),
    (lambda: SlidingTileSparsity(GRID, TILE, (1, 1, "2")), TypeError, "window"),
    (lambda: SlidingTileSparsity(GRID, TILE, [(1, 1, 1), (1, 2.0, 1)]), TypeError, "window[1][1]"),
    (lambda: SlidingTileSparsity(GRID, TILE, [(1, 1, 1), (1, 1)]), ValueError, "window[1]"),
    (lambda: SlidingTileSparsity(GRID, TILE, [(1, 1, 1), 2, 3]), TypeError, "window"),
    (lambda: SlidingTileSparsity(GRID, TILE, []), ValueError, "window"),
    (lambda: SlidingTileSparsity(GRID, TILE, (1, 1, 1), token_order="column"), ValueError, "token_order"),
    (lambda: SlidingTileSparsity((5, 0, 7), TILE, (1, 1, 1)), ValueError, "grid"),
    (lambda: SlidingTileSparsity(GRID, TILE, (1, 1, 1)).with_token_order("zigzag"), ValueError, "token_order"),
    (lambda: TopMassSparsity(0.0), ValueError, "mass"),
    (lambda: TopMassSparsity(-0.5), ValueError, "mass"),
    (lambda: TopMassSparsity(1.01), ValueError, "mass"),
    (lambda: TopMassSparsity(float("nan")), ValueError, "mass"),
    (lambda: TopMassSparsity(True), TypeError, "mass"),
    (lambda: TopMassSparsity("0.9"), TypeError, "mass"),
    (lambda: TopMassSparsity(0.9, block=0), ValueError, "block"),
    (lambda: TopMassSparsity(0.9, block=16.0), TypeError, "block"),
])
def test_bad_patterns(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    assert words in str(info.value)


def test_check_names_the_mismatch():
    p = SlidingTileSparsity(GRID, TILE, [(1, 1, 1)] * 8)
    with pytest.raises(ValueError, match=r"210 tokens.*num_tokens=200"):
        p.check(200, 8)
    with pytest.raises(ValueError, match=r"8 heads.*num_heads=12"):
        p.check(210, 12)
    with pytest.raises(ValueError, match=r"num_heads=1"):
        p.density()
    with pytest.raises(TypeError, match="num_heads"):
        p.check(210, True)
    p.check(210, 8)
    TopMassSparsity(0.5).check(1234, 7)
    # masked_reference runs the check: 212 rows with 3 text tokens leave 209 grid rows.
    q = torch.randn(1, 212, 8, 4)
    with pytest.raises(ValueError, match="num_tokens=209"):
        masked_reference(q, q, q, p, num_replicated_prefix=3)
    with pytest.raises(ValueError, match="num_replicated_prefix"):
        masked_reference(q, q, q, p, num_replicated_prefix=-1)
    with pytest.raises(ValueError, match="leave no grid"):
        masked_reference(q, q, q, p, num_replicated_prefix=200, num_replicated_suffix=12)


def test_mask_arguments_are_checked():
    p = SlidingTileSparsity(GRID, TILE, [(1, 1, 1), (2, 2, 2)])
    pos = torch.arange(210)
    with pytest.raises(ValueError, match="q_pos"):
        p.token_mask(torch.tensor([0, 210]), pos, [0])
    with pytest.raises(TypeError, match="k_pos"):
        p.token_mask(pos, pos.float(), [0])
    with pytest.raises(ValueError, match="head index 2"):
        p.token_mask(pos, pos, [0, 2])
    with pytest.raises(TypeError, match="heads"):
        p.block_masks(pos, pos, 0)
    with pytest.raises(ValueError, match="block"):
        p.block_masks(pos, pos, [0], (128, 0))
    q = torch.randn(1, 32, 4, 8)
    with pytest.raises(ValueError, match="H_kv=3"):
        TopMassSparsity(0.5, block=8).block_selection(q, torch.randn(1, 32, 3, 8))
    with pytest.raises(ValueError, match="head index 4"):
        TopMassSparsity(0.5, block=8).token_mask(torch.arange(32), torch.arange(32), [4], q=q, k=q)
