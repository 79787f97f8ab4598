"""Sparse attention in every layout of a real gloo group against the fp64 masked reference (see
test_sparse.py). Each function runs on every rank and returns what the test checks."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import usp_attn
from usp_attn.sparse import SlidingTileSparsity, TopMassSparsity, VideoGrid, masked_reference

from tests.distributed.sp_cases import ensure_layout

# Grids that shard unevenly over 2 and 4 ranks (7 x 5 x 6 = 210 tokens; 5 x 6 x 7 = 210 with partial tiles).
PATTERNS = {
    "tile": SlidingTileSparsity(VideoGrid(7, 5, 6), tile=(2, 2, 3), window=(1, 2, 1)),
    "tile_major_per_head": SlidingTileSparsity(VideoGrid(5, 6, 7), tile=(2, 4, 3),
                                               window=[(1, 1, 1), (2, 1, 2), (1, 2, 3), (3, 2, 1)],
                                               token_order="tile_major"),
    "top_mass": TopMassSparsity(0.9, block=16),
    # fewer grid tokens than ranks: some ranks' shards hold none (only text rows)
    "one_token": SlidingTileSparsity(VideoGrid(1, 1, 1), tile=(1, 2, 4), window=(2, 2, 2)),
}
ROWS = {"no_text": (0, 0), "text": (5, 3)}
FP32_RTOL = 1e-5


def _inputs(pattern, prefix, suffix, heads=4, kv_heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = pattern.grid.num_tokens if hasattr(pattern, "grid") else 210
    s = prefix + n + suffix
    q = torch.randn(2, s, heads, 16, generator=gen)
    k, v = (torch.randn(2, s, kv_heads, 16, generator=gen) for _ in range(2))
    return q, k, v, n


def _shard(x, prefix, n, align=None):
    grid = usp_attn.shard_sequence(x[:, prefix : prefix + n], align=align)
    return torch.cat([x[:, :prefix], grid, x[:, prefix + n :]], dim=1)


def layout_matches_reference(ulysses: int, ring: int, name: str, rows: str, align: int | None = None) -> dict:
    """USPAttention(sparsity=...) on this layout vs the fp64 masked reference of the whole sequence: the output
    and LSE of this rank's rows; the one-process layer's result for the same pattern as well."""
    ensure_layout(ulysses, ring)
    pattern, (pre, suf) = PATTERNS[name], ROWS[rows]
    q, k, v, n = _inputs(pattern, pre, suf)
    ref, ref_lse = masked_reference(q.double(), k.double(), v.double(), pattern, num_replicated_prefix=pre,
                                    num_replicated_suffix=suf, return_lse=True)
    layer = usp_attn.USPAttention(4, 16, 2)
    with torch.no_grad():
        out, lse = layer(_shard(q, pre, n, align), _shard(k, pre, n, align), _shard(v, pre, n, align),
                         num_replicated_prefix=pre, num_replicated_suffix=suf, sparsity=pattern, return_lse=True)
        state = usp_attn.get_sequence_parallel_state()
        sizes = state.sizes(n)
        gathered = usp_attn.gather_sequence(out[:, pre : out.shape[1] - suf])
        one = usp_attn.LocalAttention(4, 16, 2)(q, k, v, sparsity=pattern, replicated=usp_attn.ReplicatedRows(pre, suf))
    expected = _shard(ref, pre, n)
    expected_lse = _shard(ref_lse.transpose(1, 2), pre, n).transpose(1, 2)
    state.set_shard_align(1)
    if align is not None:
        assert all(s % align == 0 for s in sizes[:-1]) and sum(sizes) == n, sizes
    return {"err": float((out.double() - expected).norm() / expected.norm()),
            "gather_err": float((gathered.double() - ref[:, pre : pre + n]).norm() / ref.norm()),
            "lse_err": float((lse.double() - expected_lse).abs().max()),
            "one_process_err": float((one.double() - ref).norm() / ref.norm())}


def differing_patterns_fail_alike(ulysses: int, ring: int) -> tuple[str, float]:
    """Rank 0 passes another window than the others: the same named error on every rank, fast."""
    ensure_layout(ulysses, ring)
    grid = VideoGrid(7, 5, 6)
    window = (2, 2, 2) if dist.get_rank() == 0 else (1, 2, 1)
    pattern = SlidingTileSparsity(grid, tile=(2, 2, 3), window=window)
    x = usp_attn.shard_sequence(torch.randn(1, grid.num_tokens, 4, 16))
    start = time.monotonic()
    try:
        with torch.no_grad():
            usp_attn.USPAttention(4, 16)(x, x, x, sparsity=pattern)
    except ValueError as exc:
        return str(exc), time.monotonic() - start
    raise AssertionError("ranks with different patterns ran")


def bad_pattern_fails_alike(ulysses: int, ring: int, what: str) -> str:
    """A pattern that cannot run here: the same clear error on every rank."""
    ensure_layout(ulysses, ring)
    x = usp_attn.shard_sequence(torch.randn(1, 210, 4, 16))
    layer, kwargs = usp_attn.USPAttention(4, 16), {}
    if what == "grid":
        pattern = SlidingTileSparsity(VideoGrid(7, 5, 5), tile=(2, 2, 3), window=(1, 2, 1))  # 175 tokens, not 210
    elif what == "causal":
        pattern, layer = PATTERNS["tile"], usp_attn.USPAttention(4, 16, causal=True)
    elif what == "dynamic_ring":
        pattern = PATTERNS["top_mass"]
    else:
        pattern, kwargs = "not a pattern", {}
    try:
        layer(x, x, x, sparsity=pattern, **kwargs)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"{what}: ran")


def ring_sends_only_what_is_read(ulysses: int, ring: int) -> dict:
    """A window that reaches only the neighbouring segments (ring 4: frames of 2 ranks away are never read;
    ring 2 with a one-frame window: nothing crosses): the output equals the fp64 reference and the ring
    sends a rank only the K/V blocks its queries read. Counted on the real P2P calls (passed through)."""
    ensure_layout(ulysses, ring)
    window = (3, 1, 1) if ring > 2 else (1, 1, 1)
    pattern = SlidingTileSparsity(VideoGrid(8, 4, 4), tile=(1, 4, 4), window=window)  # 16 tokens a frame
    q, k, v, n = _inputs(pattern, 0, 0)
    ref = masked_reference(q.double(), k.double(), v.double(), pattern)
    sent = []
    real = dist.batch_isend_irecv

    def counting(ops):
        sent.extend(op.peer for op in ops if op.op is dist.isend)
        return real(ops)

    dist.batch_isend_irecv = counting
    try:
        with torch.no_grad():
            out = usp_attn.USPAttention(4, 16, 2)(_shard(q, 0, n), _shard(k, 0, n), _shard(v, 0, n), sparsity=pattern)
    finally:
        dist.batch_isend_irecv = real
    expected = _shard(ref, 0, n)
    return {"err": float((out.double() - expected).norm() / expected.norm()), "sent_to": sent}


# Per-head windows whose plain Ulysses-2 split puts both wide heads on rank 0: the layer permutes the heads.
UNEVEN_HEADS = SlidingTileSparsity(VideoGrid(5, 6, 7), tile=(2, 4, 3),
                                   window=[(3, 2, 3), (3, 2, 2), (1, 1, 1), (1, 1, 2)], token_order="tile_major")


def balanced_heads_match_reference(ulysses: int, ring: int) -> dict:
    """MHA with uneven per-head windows and text rows: the head-balanced Ulysses split gives the reference's
    output and LSE in the layer's own head order."""
    ensure_layout(ulysses, ring)
    pattern, pre, suf = UNEVEN_HEADS, 5, 3
    q, k, v, n = _inputs(pattern, pre, suf, heads=4, kv_heads=4, seed=3)
    ref, ref_lse = masked_reference(q.double(), k.double(), v.double(), pattern, num_replicated_prefix=pre,
                                    num_replicated_suffix=suf, return_lse=True)
    with torch.no_grad():
        out, lse = usp_attn.USPAttention(4, 16, 4)(_shard(q, pre, n), _shard(k, pre, n), _shard(v, pre, n),
                                                   num_replicated_prefix=pre, num_replicated_suffix=suf,
                                                   sparsity=pattern, return_lse=True)
    expected = _shard(ref, pre, n)
    expected_lse = _shard(ref_lse.transpose(1, 2), pre, n).transpose(1, 2)
    return {"err": float((out.double() - expected).norm() / expected.norm()),
            "lse_err": float((lse.double() - expected_lse).abs().max())}


def gate_verdict_is_the_groups(ulysses: int, ring: int, max_error: float) -> dict:
    """USPAttention(sparse_gate=...) with text rows: the whole group keeps the pattern or runs dense together
    (one all-reduced error); the result is the sparse reference or the dense one accordingly."""
    ensure_layout(ulysses, ring)
    pattern, pre, suf = PATTERNS["tile"], 5, 3
    q, k, v, n = _inputs(pattern, pre, suf, seed=4)
    sparse_ref = masked_reference(q.double(), k.double(), v.double(), pattern, num_replicated_prefix=pre,
                                  num_replicated_suffix=suf)
    dense_ref = usp_attn.LocalAttention(4, 16, 2)(q.double(), k.double(), v.double())
    layer = usp_attn.USPAttention(4, 16, 2, sparse_gate=usp_attn.sparse.AccuracyGate(max_error, sample_rows=8))
    with torch.no_grad():
        outs = [layer(_shard(q, pre, n), _shard(k, pre, n), _shard(v, pre, n), num_replicated_prefix=pre,
                      num_replicated_suffix=suf, sparsity=pattern) for _ in range(2)]
    verdicts = list(layer.local._gate_verdicts.values())
    sparse, dense = _shard(sparse_ref, pre, n), _shard(dense_ref, pre, n)
    return {"verdicts": verdicts, "sparse_err": float((outs[1].double() - sparse).norm() / sparse.norm()),
            "dense_err": float((outs[1].double() - dense).norm() / dense.norm()),
            "same_twice": bool(torch.equal(outs[0], outs[1]))}


GRAD_RTOL = 2e-4  # of the largest reference gradient, as for the dense layers (tests/distributed/grad_cases.py)
#: name -> (pattern, kv heads, text rows): GQA with per-head windows, the dynamic pattern, MHA whose heads the
#: Ulysses-2 split permutes (the permutation's adjoint is tested too), and one-frame windows without text rows,
#: whose ring hops between frames of different ranks are empty (skipped in both passes)
GRAD_CASES = {"tile_major_per_head": (PATTERNS["tile_major_per_head"], 2, "text"),
              "top_mass": (PATTERNS["top_mass"], 2, "text"), "uneven_heads": (UNEVEN_HEADS, 4, "text"),
              "empty_hops": (SlidingTileSparsity(VideoGrid(8, 4, 4), tile=(1, 4, 4), window=(1, 1, 1)), 2, "no_text")}


def gradients_match_reference(ulysses: int, ring: int, name: str) -> dict:
    """Training through a pattern in layout U x R with text rows: the output and the LSE
    both carry a gradient; this rank's q, k, v gradients equal the fp64 masked reference's: exactly those of
    its grid rows, and 1/W of them on the replicated text rows (each rank counts the text rows' loss 1/W,
    the convention of the dense layers)."""
    state = ensure_layout(ulysses, ring)
    pattern, kv_heads, rows = GRAD_CASES[name]
    pre, suf = ROWS[rows]
    q, k, v, n = _inputs(pattern, pre, suf, kv_heads=kv_heads, seed=5)
    gen = torch.Generator().manual_seed(6)
    g_out, g_lse = torch.randn(q.shape, generator=gen), torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=gen)
    full = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = masked_reference(*full, pattern, num_replicated_prefix=pre, num_replicated_suffix=suf,
                                    return_lse=True)
    ((ref * g_out.double()).sum() + (ref_lse * g_lse.double()).sum()).backward()

    world = state.world_size
    mine = [_shard(t, pre, n).requires_grad_() for t in (q, k, v)]
    out, lse = usp_attn.USPAttention(4, 16, kv_heads)(*mine, num_replicated_prefix=pre, num_replicated_suffix=suf,
                                                      sparsity=pattern, return_lse=True)
    weight = torch.ones(out.shape[1])
    weight[:pre] = weight[out.shape[1] - suf :] = 1.0 / world
    go = _shard(g_out, pre, n) * weight[None, :, None, None]
    gl = _shard(g_lse.transpose(1, 2), pre, n).transpose(1, 2) * weight[None, None, :]
    ((out * go).sum() + (lse * gl).sum()).backward()
    errors = {}
    for label, got, ref_t in zip(("dq", "dk", "dv"), mine, full):
        want, grad = _shard(ref_t.grad, pre, n), got.grad.double()
        scale = ref_t.grad.abs().max()
        errors[label] = float((grad[:, pre : grad.shape[1] - suf] - want[:, pre : want.shape[1] - suf]).abs().max()
                              / scale)
        if pre or suf:
            text = torch.cat([grad[:, :pre], grad[:, grad.shape[1] - suf :]], 1) * world
            errors[label + "_text"] = float((text - torch.cat([want[:, :pre], want[:, want.shape[1] - suf :]], 1))
                                            .abs().max() / scale)
    return errors
