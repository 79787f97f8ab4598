"""One sparse attention call: grid queries against grid keys under a pattern, text rows dense.

Rows of one call (the layout of :class:`usp_attn.ReplicatedRows`)::

    q     [ pre | grid rows q_range | suf ]
    k, v  [ kv_pre | pre | grid rows k_range | suf | kv_suf ]

``q_range``/``k_range`` are the grid positions (in the pattern's token order) of the grid rows:
the whole grid on one rank or after Ulysses, this rank's segment and one ring hop's segment under
ring. Text queries attend every key densely, grid queries attend the text keys densely and the
grid keys under the pattern; the parts are attention over disjoint key sets, so they merge
exactly by their log-sum-exps (:func:`usp_attn.ring.merge.merge`).

Two kernels run the grid part, both exact for the pattern:

* **block**: a backend that visits only the kept 128 x 128 blocks (FlashAttention 4's block
  sparsity). It needs every block either wholly kept or wholly dropped: tiles made of whole
  128-token blocks, tokens in tile-major order. The block tensors are built once per pattern,
  ranges and heads, on the device, and cached.
* **masked**: the pattern's token mask, built for a chunk of query rows at a time (bounded
  memory), on a kernel that takes masks. Every backend, every pattern and order; on CPU this
  is what runs, and on a GPU it is the fallback (logged) when blocks are partial.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from usp_attn.logs import log_once
from usp_attn.ring.merge import merge
from usp_attn.sparse.patterns import SparsityPattern

__all__ = ["BLOCK", "BlockPlan", "attend_sparse", "block_plan", "check_sparsity", "hop_backward", "segments_read"]

#: Rows and keys per kernel block of the block-sparse kernel (FA4's tile on SM90 and SM100).
BLOCK = 128

#: Booleans of one chunk of the masked path's token mask (64 Mi: 64 MiB).
_MASK_ELEMENTS = 1 << 26


def check_sparsity(pattern, *, num_grid_tokens: int | None, num_heads: int, causal: bool, where: str) -> None:
    """A pattern a layer can run: the right type, the grid matching the rows (``None``: not known
    yet, checked later), not causal."""
    if not isinstance(pattern, SparsityPattern):
        raise TypeError(f"{where}: sparsity must be a usp_attn.sparse pattern (SlidingTileSparsity, "
                        f"TopMassSparsity) or None for dense attention, got {type(pattern).__name__}")
    if causal:
        raise ValueError(f"{where}: sparsity cannot be combined with causal=True (video patterns are "
                         "bidirectional; a causal layer has no use for them)")
    if num_grid_tokens is not None:
        pattern.check(num_grid_tokens, num_heads)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """The kept blocks of one (query range, key range, heads) in the layout FA4 reads.

    ``full_cnt [1, Hs|1, nQb]`` int32: wholly kept key blocks per query block; ``full_idx [1, Hs|1,
    nQb, nKb]`` int32: their indices packed left. ``partial_cnt``/``partial_idx``: the same for the
    partly kept blocks (a sliding-tile pattern's edge tiles), which the kernel masks token by token
    through ``tiles``: ``(query tile ids [S_q], key tile ids [S_k], table [Hs, T, T])``, int32, the
    pattern as tiles. ``whole``: no partly kept block. ``kept``: kept (query, key) pairs / all pairs
    (NaN when not counted). ``empty``: no kept pair at all.
    """

    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    whole: bool
    kept: float
    empty: bool
    block: int = BLOCK
    partial_cnt: torch.Tensor | None = None
    partial_idx: torch.Tensor | None = None
    tiles: tuple | None = None


def _positions(span: tuple[int, int], device) -> torch.Tensor:
    return torch.arange(span[0], span[1], dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=64)
def _static_block_plan(pattern, q_range, k_range, heads, device) -> BlockPlan:
    any_kept, all_kept = pattern.block_masks(_positions(q_range, device), _positions(k_range, device), heads,
                                             (BLOCK, BLOCK))
    return _plan_from_masks(any_kept, all_kept, pattern, q_range, k_range, heads, device)


def _packed(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., nKb]`` bool -> (count int32 ``[...]``, indices int32 ``[..., nKb]`` packed left)."""
    # A stable sort of "not selected" puts the selected blocks first, in index order.
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return blocks.sum(-1, dtype=torch.int32).contiguous(), order.contiguous()


def _padded_ids(ids: torch.Tensor) -> torch.Tensor:
    """int32 tile ids padded to whole blocks: the kernel evaluates the mask function on the rows
    of a partial last block too (their results are discarded), so those reads must stay in bounds."""
    pad = (-ids.numel()) % BLOCK
    return torch.cat([ids, ids.new_zeros(pad)]).to(torch.int32) if pad else ids.to(torch.int32)


def _plan_from_masks(any_kept, all_kept, pattern, q_range, k_range, heads, device) -> BlockPlan:
    if any_kept.dim() == 3:
        any_kept, all_kept = any_kept[None], all_kept[None]
    whole = bool(torch.equal(any_kept, all_kept))
    kept = _kept_fraction(any_kept, q_range, k_range) if whole else float("nan")
    full_cnt, full_idx = _packed(all_kept)
    partial = dict(partial_cnt=None, partial_idx=None, tiles=None)
    if not whole and hasattr(pattern, "tile_table"):
        heads_dim = len(heads)  # the mask function reads the table per head
        partial_cnt, partial_idx = _packed((any_kept & ~all_kept).expand(1, heads_dim, -1, -1))
        full_cnt, full_idx = _packed(all_kept.expand(1, heads_dim, -1, -1))
        ids = [_padded_ids(pattern.tile_ids(_positions(span, device))) for span in (q_range, k_range)]
        table = pattern.tile_table(heads, device).to(torch.int32).contiguous()
        partial = dict(partial_cnt=partial_cnt, partial_idx=partial_idx, tiles=(ids[0], ids[1], table))
    return BlockPlan(full_cnt, full_idx, whole, kept, not bool(any_kept.any()), **partial)


def _kept_fraction(any_kept: torch.Tensor, q_range, k_range) -> float:
    """Kept (query, key) pairs / all pairs, averaged over heads and batch (exact when blocks are whole)."""
    def sizes(span):
        n = span[1] - span[0]
        rows = torch.full(((n + BLOCK - 1) // BLOCK,), BLOCK, dtype=torch.float64)
        if len(rows):
            rows[-1] = n - BLOCK * (len(rows) - 1)
        return rows

    pairs = sizes(q_range)[:, None] * sizes(k_range)[None, :]
    total = float(pairs.sum())
    return float((any_kept.cpu().to(torch.float64) * pairs).sum(dim=(-1, -2)).mean()) / total if total else 0.0


def block_plan(pattern: SparsityPattern, q_range, k_range, heads, device, *, q=None, k=None, scale=None) -> BlockPlan:
    """The kept blocks of a call (cached for static patterns; dynamic ones need ``q``, ``k``)."""
    if not pattern.dynamic:
        return _static_block_plan(pattern, tuple(q_range), tuple(k_range), tuple(heads), torch.device(device))
    any_kept, all_kept = pattern.block_masks(_positions((0, q.shape[1]), device), _positions((0, k.shape[1]), device),
                                             heads, (BLOCK, BLOCK), q=q, k=k, scale=scale)
    return _plan_from_masks(any_kept, all_kept, None, q_range, k_range, heads, device)


@functools.lru_cache(maxsize=64)
def segments_read(pattern, spans: tuple[tuple[int, int], ...], heads: tuple[int, ...],
                  device) -> tuple[tuple[bool, ...], ...]:
    """``needs[r][s]``: whether the queries of segment ``spans[r]`` keep any key of segment ``spans[s]``
    under a static ``pattern`` for ``heads`` (the ring sends a rank only the segments it reads).

    One kernel "block" per segment, so this costs R^2 tiny block masks, once per pattern and layout.
    """
    positions = [_positions(span, device) for span in spans]
    needs = []
    for q_span, q_pos in zip(spans, positions):
        row = []
        for k_span, k_pos in zip(spans, positions):
            rows, keys = q_span[1] - q_span[0], k_span[1] - k_span[0]
            if not rows or not keys:
                row.append(False)
                continue
            any_kept, _ = pattern.block_masks(q_pos, k_pos, heads, (rows, keys))
            row.append(bool(any_kept.any()))
        needs.append(tuple(row))
    return tuple(needs)


def attend_sparse(attend, q, k, v, pattern: SparsityPattern, *, q_text, k_text, q_range, k_range, heads, scale,
                  block_kernel=None):
    """Attention of one call under ``pattern`` (see the module doc for the rows).

    Args:
        attend: ``attend(q, k, v, mask=None, return_lse=True) -> (out, lse)`` on a kernel chosen
            for the call (a masked one when ``mask`` is given), e.g. ``LocalAttention.attend``.
        q: ``[B, pre + Nq + suf, H, D]``; k, v: ``[B, k_pre + Nk + k_suf, H_kv, D]``.
        q_text, k_text: ``(rows before, rows after)`` the grid rows of q, and of k/v (text rows).
        q_range, k_range: ``(start, stop)`` grid positions of the grid rows (``Nq``, ``Nk`` long).
        heads: the pattern's head index of each of q's heads.
        scale: the softmax scale.
        block_kernel: ``block_kernel(q, k, v, plan) -> (out, lse)``, a backend's block-sparse
            forward, or None: the masked path.

    Returns:
        ``(out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] float32 (float64 for float64))``.
    """
    (pre, suf), (k_pre, k_suf) = q_text, k_text
    nq, nk = q_range[1] - q_range[0], k_range[1] - k_range[0]
    q_grid, k_grid, v_grid = q[:, pre : pre + nq], k[:, k_pre : k_pre + nk], v[:, k_pre : k_pre + nk]
    out, lse = _grid_attention(attend, q_grid, k_grid, v_grid, pattern, tuple(q_range), tuple(k_range),
                               tuple(heads), scale, block_kernel)
    if k_pre or k_suf:  # grid queries x text keys: dense
        text_k, text_v = (torch.cat([t[:, :k_pre], t[:, k_pre + nk :]], dim=1) for t in (k, v))
        out, lse = merge(out, lse, *attend(q_grid, text_k, text_v, return_lse=True))
    out = out.to(q.dtype)
    if pre or suf:  # text queries x every key: dense
        text_out, text_lse = attend(torch.cat([q[:, :pre], q[:, pre + nq :]], dim=1), k, v, return_lse=True)
        out = torch.cat([text_out[:, :pre], out, text_out[:, pre:]], dim=1)
        lse = torch.cat([text_lse[:, :, :pre].to(lse.dtype), lse, text_lse[:, :, pre:].to(lse.dtype)], dim=2)
    return out, lse


def _grid_attention(attend, q, k, v, pattern, q_range, k_range, heads, scale, block_kernel):
    device = q.device
    dynamic = pattern.dynamic
    if dynamic:  # a dynamic pattern reads the heads of the q and k it is given
        heads = tuple(range(q.shape[2]))
    if block_kernel is not None:
        plan = block_plan(pattern, q_range, k_range, heads, device,
                          **({"q": q, "k": k, "scale": scale} if dynamic else {}))
        if plan.whole or plan.tiles is not None:
            if not dynamic and plan.whole:
                log_once(logging.INFO, f"usp_attn: {pattern} runs on the block-sparse kernel, keeping "
                                       f"{plan.kept:.1%} of the (query, key) pairs of the call")
            elif not dynamic:
                log_once(logging.INFO, f"usp_attn: {pattern} runs on the block-sparse kernel; blocks only partly "
                                       "kept (edge tiles) are masked token by token")
            return block_kernel(q, k, v, plan)
        log_once(logging.WARNING, f"usp_attn: {pattern}: some 128 x 128 blocks are only partly kept, which the "
                                  "block-sparse kernel cannot run for this pattern; this call runs on the exact "
                                  "masked path, which is much slower")
    return _masked(attend, q, k, v, pattern, q_range, k_range, heads, scale)


def _row_chunks(pattern, batch: int, nq: int, nk: int, heads) -> list[slice]:
    """Query-row chunks whose token mask stays within :data:`_MASK_ELEMENTS` booleans; one empty chunk when
    there are no rows (a rank whose shard holds no grid token still returns its empty output and LSE)."""
    per_row = max(1, len(heads) * nk * (batch if pattern.dynamic else 1))
    step = max(1, min(nq, _MASK_ELEMENTS // per_row))
    return [slice(start, min(nq, start + step)) for start in range(0, nq, step)] or [slice(0, 0)]


def _masked(attend, q, k, v, pattern, q_range, k_range, heads, scale):
    """The exact masked path, in chunks of query rows so the token mask stays bounded."""
    batch, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    q_pos, k_pos = _positions(q_range, q.device), _positions(k_range, q.device)
    extra = {"q": q, "k": k, "scale": scale} if pattern.dynamic else {}
    outs, lses = [], []
    for rows in _row_chunks(pattern, batch, nq, nk, heads):
        if pattern.dynamic:  # positions index the rows of the q and k passed along
            mask = pattern.token_mask(q_pos[rows] - q_range[0], k_pos - k_range[0], heads, **extra)
        else:
            mask = pattern.token_mask(q_pos[rows], k_pos, heads)[None].expand(batch, -1, -1, -1)
        out, lse = attend(q[:, rows], k, v, mask=mask, return_lse=True)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def hop_backward(backward, q, k, v, out, dout, lse, dlse, pattern: SparsityPattern, *, q_text, q_range, k_range,
                 heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of one ring hop of a static pattern: this rank's rows against grid keys only.

    The forward's hop (:func:`attend_sparse` with no text keys) is text queries against every key of the hop
    (dense) and grid queries against the keys the pattern keeps; ``out`` and ``lse`` are the rows' results over
    *all* keys (the ring's merged ones), so each part's flash-style backward is exact (see
    :mod:`usp_attn.ring.backward`). The grid part runs on the pattern's token mask in bounded row chunks, as
    the forward's masked path does.

    Args:
        backward: ``backward(q, k, v, out, dout, lse, mask=None, dlse=None) -> (dq, dk, dv)``, e.g.
            :meth:`usp_attn.kernels.BlockKernels.backward` (a masked kernel for the masked calls).
        q, out, dout: ``[B, pre + Nq + suf, H, D]``; k, v: ``[B, Nk, H_kv, D]`` grid keys; lse, dlse:
            ``[B, H, rows]`` (``dlse`` may be None).
        q_text: ``(pre, suf)`` text rows of q; q_range, k_range: grid positions of q's grid rows and of k;
        heads: the pattern's head index of each of q's heads.
    Returns:
        dq like q, dk and dv like k, in fp32 (fp64 for fp64 inputs).
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    pre, suf = q_text
    nq = q.shape[1] - pre - suf

    def add(rows, mask=None):
        bdq, bdk, bdv = backward(q[:, rows], k, v, out[:, rows], dout[:, rows], lse[:, :, rows], mask=mask,
                                 dlse=None if dlse is None else dlse[:, :, rows])
        dq[:, rows] += bdq
        dk.add_(bdk)
        dv.add_(bdv)

    if pre:
        add(slice(0, pre))
    if suf:
        add(slice(pre + nq, q.shape[1]))
    q_pos, k_pos = _positions(q_range, q.device), _positions(k_range, q.device)
    for rows in _row_chunks(pattern, q.shape[0], nq, k.shape[1], heads):
        mask = pattern.token_mask(q_pos[rows], k_pos, heads)[None].expand(q.shape[0], -1, -1, -1)
        add(slice(pre + rows.start, pre + rows.stop), mask)  # a row keeping no key of the hop gets 0 here
    return dq, dk, dv
