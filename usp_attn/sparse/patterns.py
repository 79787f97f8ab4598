"""Sparse video attention patterns as frozen, hashable data.

A pattern says which (query, key) pairs of *grid* tokens are kept. Text tokens (the
replicated prefix/suffix outside the grid) are never described here: they are dense in
both directions and the attention layer adds them. Positions handed to the mask functions
are grid-token positions ``0 .. N-1`` in the pattern's ``token_order``.

Patterns are frozen dataclasses so a layer can cache the block tensors it derives from them
under ``(shapes, pattern)``.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch

from usp_attn.sparse.grid import (
    VideoGrid,
    _cached_permutation,
    as_grid,
    as_positive_int_triple,
    check_positive_int,
)

__all__ = ["SparsityPattern", "SlidingTileSparsity", "TopMassSparsity", "TOKEN_ORDERS"]

TOKEN_ORDERS = ("row_major", "tile_major")

Triple = tuple[int, int, int]


# ----------------------------------------------------------------------------- argument checks


def _as_positions(owner: str, name: str, pos: Any, limit: int) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a 1-D int64 tensor of grid-token positions, "
                        f"got {type(pos).__name__}")
    if pos.dim() != 1:
        raise ValueError(f"{owner}: {name} must be 1-D, got shape {list(pos.shape)}")
    if pos.dtype == torch.bool or pos.is_floating_point() or pos.is_complex():
        raise TypeError(f"{owner}: {name} must have an integer dtype (int64), got {pos.dtype}")
    pos = pos.long()
    if pos.numel():
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"{owner}: {name} holds positions in [{lo}, {hi}] but only [0, {limit - 1}] exist "
                             f"({limit} grid tokens)")
    return pos


def _as_heads(owner: str, heads: Any, limit: Optional[int], what: str = "") -> tuple[int, ...]:
    if isinstance(heads, torch.Tensor):
        heads = heads.tolist()
    if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
        raise TypeError(f"{owner}: heads must be a sequence of head indices (e.g. range(H)), got {heads!r}")
    items = tuple(heads)
    if not items:
        raise ValueError(f"{owner}: heads must name at least one head, got {heads!r}")
    out = []
    for h in items:
        if isinstance(h, bool) or not isinstance(h, numbers.Integral):
            raise TypeError(f"{owner}: heads must hold ints, got {h!r} ({type(h).__name__})")
        if h < 0 or (limit is not None and h >= limit):
            raise ValueError(f"{owner}: head index {h} in heads is out of range [0, {limit}){what}"
                             if limit is not None else f"{owner}: head index {h} in heads is negative")
        out.append(int(h))
    return tuple(out)


def _as_kernel_block(owner: str, block: Any) -> tuple[int, int]:
    if isinstance(block, numbers.Integral) and not isinstance(block, bool):
        b = check_positive_int(owner, "block", block)
        return (b, b)
    if isinstance(block, (str, bytes)) or not hasattr(block, "__iter__"):
        raise TypeError(f"{owner}: block must be (block_q, block_k) positive ints, got {block!r}")
    items = tuple(block)
    if len(items) != 2:
        raise ValueError(f"{owner}: block must be (block_q, block_k), got {len(items)} entries: {block!r}")
    return (check_positive_int(owner, "block[0]", items[0]), check_positive_int(owner, "block[1]", items[1]))


def _block_rows(n_rows: int, rows_per_block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows in each kernel block (the last may be partial): ``[ceil(n_rows / rows_per_block)]``."""
    nb = -(-n_rows // rows_per_block)
    sizes = torch.full((nb,), rows_per_block, dtype=dtype, device=device)
    if nb and n_rows % rows_per_block:
        sizes[-1] = n_rows % rows_per_block
    return sizes


def _check_token_order(owner: str, token_order: Any) -> str:
    if not isinstance(token_order, str):
        raise TypeError(f"{owner}: token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"{owner}: token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
    return token_order


# ----------------------------------------------------------------------------- base


class SparsityPattern(abc.ABC):
    """Which (query, key) pairs of grid tokens attention keeps.

    Static patterns (``dynamic = False``) depend only on positions, so their masks can be
    built once and cached. Dynamic ones (``dynamic = True``) need ``q`` and ``k`` and are
    recomputed on every call.
    """

    dynamic: ClassVar[bool] = False

    @abc.abstractmethod
    def check(self, num_tokens: int, num_heads: int) -> None:
        """Raise ``ValueError`` if the pattern cannot describe a layer with ``num_tokens``
        grid tokens and ``num_heads`` query heads (both python ints)."""

    @abc.abstractmethod
    def token_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: Sequence[int], *,
                   q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
        """Token-level keep mask (``True`` = attend).

        Args:
            q_pos: int64 ``[Sq]`` grid-token positions (in the pattern's token order) of the query rows.
            k_pos: int64 ``[Sk]`` likewise for the key rows.
            heads: ``Hs`` head indices.
            q, k, scale: only for dynamic patterns (``[B, Sq_all, H, D]``, ``[B, Sk_all, H_kv, D]``).
        Returns:
            bool ``[Hs or 1, Sq, Sk]`` for static patterns (1 when every requested head shares
            the mask); bool ``[B, Hs, Sq, Sk]`` for dynamic ones.
        """

    @abc.abstractmethod
    def block_masks(self, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: Sequence[int],
                    block: Union[int, tuple[int, int]] = (128, 128), *,
                    q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel-block masks over consecutive rows of ``q_pos`` / ``k_pos``.

        Kernel block ``b`` of the queries is rows ``[b * block[0], (b + 1) * block[0])`` of
        ``q_pos`` (the last may be partial); likewise for keys with ``block[1]``.

        Returns:
            ``(any_kept, all_kept)``, bool ``[Hs or 1, nQb, nKb]`` (static) or
            ``[B, Hs, nQb, nKb]`` (dynamic): ``any_kept`` = the block holds at least one kept
            pair (a kernel must visit it), ``all_kept`` = every pair is kept (it can skip the
            mask inside the block).
        """

    @abc.abstractmethod
    def density(self, num_heads: int = 1) -> float:
        """Fraction of (query, key) grid-token pairs kept, mean over ``num_heads`` heads."""

    @abc.abstractmethod
    def with_token_order(self, token_order: str) -> "SparsityPattern":
        """The same pattern on tokens in ``token_order`` (``"row_major"`` or ``"tile_major"``)."""


# ----------------------------------------------------------------------------- sliding tile


def _normalize_window(owner: str, window: Any) -> Union[Triple, tuple[Triple, ...]]:
    if isinstance(window, (str, bytes)) or not hasattr(window, "__iter__"):
        raise TypeError(f"{owner}: window must be a 3-tuple of positive ints or a per-head list of them, "
                        f"got {window!r}")
    items = tuple(window)
    if not items:
        raise ValueError(f"{owner}: window must not be empty")
    nested = [not isinstance(w, numbers.Integral) and hasattr(w, "__iter__") for w in items]
    if not any(nested):
        return as_positive_int_triple(owner, "window", items)
    if not all(nested):
        raise TypeError(f"{owner}: window mixes ints and per-head entries: {window!r}; give one (wf, wh, ww) "
                        f"or a list with one (wf, wh, ww) per head")
    return tuple(as_positive_int_triple(owner, f"window[{h}]", w) for h, w in enumerate(items))


@dataclass(frozen=True)
class SlidingTileSparsity(SparsityPattern):
    """Sliding-tile attention (3-D sliding window over tiles) on a video grid.

    Token ``(f, y, x)`` lies in tile ``(f // tf, y // th, x // tw)``. Along each dimension
    with ``n`` tiles, the query tile at coordinate ``c`` sees key tiles ``[s, s + w)`` with
    ``s = clamp(c - (w - 1) // 2, 0, max(0, n - w))``: the window is centred where it can be
    and slides inward at the borders so every query sees the same number of tiles (``w``
    larger than ``n`` means the whole dimension). A query keeps a key iff this holds in all
    three dimensions. Edge tiles of a grid that is not a multiple of ``tile`` are smaller and
    follow the same rule.

    Args:
        grid: :class:`VideoGrid` (or ``(frames, height, width)``).
        tile: ``(tf, th, tw)`` positive ints.
        window: ``(wf, wh, ww)`` in tiles, positive ints; or a per-head sequence of such
            triples (one per query head, as a tuned mask search gives them). Stored as tuples.
        token_order: ``"row_major"`` (the grid's order) or ``"tile_major"`` (see
            :func:`usp_attn.sparse.tile_major_permutation`); positions given to the mask
            functions are in this order.
    """

    grid: VideoGrid
    tile: Triple
    window: Union[Triple, tuple[Triple, ...]]
    token_order: str = "row_major"

    dynamic: ClassVar[bool] = False

    def __post_init__(self) -> None:
        owner = "SlidingTileSparsity"
        object.__setattr__(self, "grid", as_grid(owner, self.grid))
        object.__setattr__(self, "tile", as_positive_int_triple(owner, "tile", self.tile))
        object.__setattr__(self, "window", _normalize_window(owner, self.window))
        object.__setattr__(self, "token_order", _check_token_order(owner, self.token_order))

    # -- derived facts

    @property
    def per_head(self) -> bool:
        """Whether ``window`` is a per-head list."""
        return isinstance(self.window[0], tuple)

    @property
    def num_tiles(self) -> Triple:
        """Tiles per dimension, ``ceil(size / tile)``."""
        return tuple(-(-s // t) for s, t in zip(self.grid.shape, self.tile))  # type: ignore[return-value]

    def head_window(self, head: int) -> Triple:
        """The ``(wf, wh, ww)`` window of query head ``head``."""
        if self.per_head:
            if not 0 <= head < len(self.window):
                raise ValueError(f"SlidingTileSparsity: head {head} has no window; per-head windows are given for "
                                 f"{len(self.window)} heads")
            return self.window[head]  # type: ignore[return-value]
        return self.window  # type: ignore[return-value]

    def with_token_order(self, token_order: str) -> "SlidingTileSparsity":
        """The same pattern on ``token_order`` positions (see the class docstring)."""
        return dataclasses.replace(self, token_order=_check_token_order("with_token_order", token_order))

    def check(self, num_tokens: int, num_heads: int) -> None:
        """Raise ``ValueError`` if the grid does not have ``num_tokens`` tokens or per-head
        windows are not given for exactly ``num_heads`` heads (both python ints)."""
        num_tokens = check_positive_int("SlidingTileSparsity.check", "num_tokens", num_tokens)
        num_heads = check_positive_int("SlidingTileSparsity.check", "num_heads", num_heads)
        if num_tokens != self.grid.num_tokens:
            raise ValueError(f"SlidingTileSparsity: grid {self.grid} has {self.grid.num_tokens} tokens but the layer "
                             f"has num_tokens={num_tokens} grid rows (sequence length minus the text tokens)")
        if self.per_head and len(self.window) != num_heads:
            raise ValueError(f"SlidingTileSparsity: per-head windows are given for {len(self.window)} heads but the "
                             f"layer has num_heads={num_heads}")

    # -- internals

    def _tile_coords(self, pos: torch.Tensor) -> torch.Tensor:
        """Positions in ``token_order`` -> tile coordinates, int64 ``[S, 3]``."""
        if self.token_order == "tile_major":
            pos = _cached_permutation(self.grid, self.tile).to(pos.device)[pos]
        tile = torch.tensor(self.tile, dtype=torch.int64, device=pos.device)
        return self.grid.coords(pos) // tile

    def _starts(self, c: torch.Tensor, d: int, w: int) -> torch.Tensor:
        n = self.num_tiles[d]
        return torch.clamp(c - (w - 1) // 2, min=0, max=max(0, n - w))

    def _dim_tile_mask(self, d: int, w: int, device: torch.device) -> torch.Tensor:
        """float64 ``[n_d, n_d]``: 1 where key tile (column) is in query tile (row)'s window."""
        n = self.num_tiles[d]
        c = torch.arange(n, dtype=torch.int64, device=device)
        s = self._starts(c, d, w)
        return ((c[None, :] >= s[:, None]) & (c[None, :] < s[:, None] + w)).to(torch.float64)

    def _pair_mask(self, tq: torch.Tensor, tk: torch.Tensor, w: Triple) -> torch.Tensor:
        m = torch.ones(tq.shape[0], tk.shape[0], dtype=torch.bool, device=tq.device)
        for d in range(3):
            s = self._starts(tq[:, d], d, w[d])[:, None]
            kd = tk[None, :, d]
            m &= (kd >= s) & (kd < s + w[d])
        return m

    def _call_arguments(self, owner: str, q_pos, k_pos, heads):
        """Checked positions (one device) and each requested head's window."""
        n = self.grid.num_tokens
        qp, kp = _as_positions(owner, "q_pos", q_pos, n), _as_positions(owner, "k_pos", k_pos, n)
        if qp.device != kp.device:
            raise ValueError(f"{owner}: q_pos is on {qp.device} but k_pos is on {kp.device}")
        return qp, kp, [self.head_window(h) for h in self._heads(owner, heads)]

    def _heads(self, owner: str, heads: Any) -> tuple[int, ...]:
        if self.per_head:
            return _as_heads(owner, heads, len(self.window), " (per-head windows)")
        return _as_heads(owner, heads, None)

    # -- the pattern as tiles: what a kernel's mask function reads

    def tile_ids(self, pos: torch.Tensor) -> torch.Tensor:
        """int64 ``[S]``: the linear tile index ``(tf * n_h + th) * n_w + tw`` of each position."""
        t = self._tile_coords(_as_positions("SlidingTileSparsity.tile_ids", "pos", pos, self.grid.num_tokens))
        _, nh, nw = self.num_tiles
        return (t[:, 0] * nh + t[:, 1]) * nw + t[:, 2]

    def tile_table(self, heads: Sequence[int], device=None) -> torch.Tensor:
        """bool ``[Hs, T, T]`` (``T`` tiles): whether a query in tile ``i`` attends a key in tile ``j``,
        for each head; the Kronecker product of the three per-dimension windows."""
        device = torch.device("cpu") if device is None else torch.device(device)
        tables = {}
        for w in dict.fromkeys(self.head_window(h) for h in self._heads("SlidingTileSparsity.tile_table", heads)):
            mf, mh, mw = (self._dim_tile_mask(d, w[d], device).bool() for d in range(3))
            table = mf[:, None, None, :, None, None] & mh[None, :, None, None, :, None] & mw[None, None, :, None, None, :]
            tables[w] = table.reshape(mf.shape[0] * mh.shape[0] * mw.shape[0], -1)
        return torch.stack([tables[self.head_window(h)] for h in heads])

    # -- public masks

    def token_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: Sequence[int], *,
                   q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
        """Token-level keep mask; builds ``Sq x Sk`` booleans, so meant for small shapes and tests.

        Args:
            q_pos: int64 ``[Sq]`` grid-token positions (in ``token_order``) of the query rows.
            k_pos: int64 ``[Sk]`` likewise for the keys (same device).
            heads: ``Hs`` query-head indices (they select per-head windows).
            q, k, scale: ignored (static pattern); accepted so callers can treat every pattern alike.
        Returns:
            bool ``[Hs, Sq, Sk]`` on ``q_pos``'s device, or ``[1, Sq, Sk]`` when all requested
            heads have the same window.
        """
        qp, kp, windows = self._call_arguments("SlidingTileSparsity.token_mask", q_pos, k_pos, heads)
        tq, tk = self._tile_coords(qp), self._tile_coords(kp)
        masks = {w: self._pair_mask(tq, tk, w) for w in dict.fromkeys(windows)}
        if len(masks) == 1:
            return masks[windows[0]].unsqueeze(0)
        return torch.stack([masks[w] for w in windows])

    def block_masks(self, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: Sequence[int],
                    block: Union[int, tuple[int, int]] = (128, 128), *,
                    q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel-block masks without any ``Sq x Sk`` tensor.

        The kept-pair count of every (query block, key block) is ``Hq @ M @ Hk^T`` with
        ``Hq[b, t]`` = query rows of block ``b`` in tile ``t``, ``Hk`` likewise, and ``M`` the
        tile-level mask. ``M`` is the Kronecker product of the three per-dimension tile masks,
        so ``M @ Hk^T`` is applied one dimension at a time and never built: memory is
        ``O((nQb + nKb) * T)`` for ``T`` tiles. Counts are integers computed in float64, which
        holds them exactly (and fp64 matmuls are never downgraded to TF32).

        Args:
            q_pos: int64 ``[Sq]`` grid-token positions (in ``token_order``) of the query rows,
                e.g. one rank's shard.
            k_pos: int64 ``[Sk]`` likewise for the keys (same device).
            heads: ``Hs`` query-head indices.
            block: ``(block_q, block_k)`` rows per kernel block (an int means both).
            q, k, scale: ignored (static pattern).
        Returns:
            ``(any_kept, all_kept)``: bool ``[Hs or 1, ceil(Sq / block_q), ceil(Sk / block_k)]``
            on ``q_pos``'s device (1 when all requested heads share a window).
        """
        owner = "SlidingTileSparsity.block_masks"
        bq, bk = _as_kernel_block(owner, block)
        qp, kp, windows = self._call_arguments(owner, q_pos, k_pos, heads)
        dev = qp.device
        nf, nh, nw = self.num_tiles
        n_tiles = nf * nh * nw

        def membership(pos: torch.Tensor, rows: int) -> torch.Tensor:
            t = self._tile_coords(pos)
            lin = (t[:, 0] * nh + t[:, 1]) * nw + t[:, 2]
            nb = -(-pos.numel() // rows)
            blk = torch.arange(pos.numel(), dtype=torch.int64, device=dev) // rows
            counts = torch.bincount(blk * n_tiles + lin, minlength=nb * n_tiles)
            return counts.to(torch.float64).view(nb, n_tiles)

        hq, hk = membership(qp, bq), membership(kp, bk)
        pairs = _block_rows(qp.numel(), bq, torch.float64, dev)[:, None] * \
            _block_rows(kp.numel(), bk, torch.float64, dev)[None, :]
        results: dict[Triple, tuple[torch.Tensor, torch.Tensor]] = {}
        for w in dict.fromkeys(windows):
            mf, mh, mw = (self._dim_tile_mask(d, w[d], dev) for d in range(3))
            g = hk.view(-1, nf, nh, nw)
            g = torch.einsum("bxyz,ix->biyz", g, mf)
            g = torch.einsum("biyz,jy->bijz", g, mh)
            g = torch.einsum("bijz,kz->bijk", g, mw)  # g[b, t] = keys of block b that tile t sees
            counts = hq @ g.reshape(-1, n_tiles).T
            results[w] = (counts > 0, counts == pairs)
        if len(results) == 1:
            a, b = results[windows[0]]
            return a.unsqueeze(0), b.unsqueeze(0)
        return (torch.stack([results[w][0] for w in windows]), torch.stack([results[w][1] for w in windows]))

    def density(self, num_heads: int = 1) -> float:
        """Fraction of the ``N^2`` (query, key) grid-token pairs kept, mean over heads.

        The keep rule is a product over the three dimensions of a rule on that dimension's
        coordinates, and the token pairs are the product of per-dimension coordinate pairs, so
        the kept count is the product of three per-dimension counts: exact and ``O(F^2 + H^2 + W^2)``.

        Args:
            num_heads: query heads of the layer; must equal the number of per-head windows if
                ``window`` is per-head (shared windows give the same density for any value).
        Returns:
            python float in ``(0, 1]`` (independent of ``token_order``).
        """
        num_heads = check_positive_int("SlidingTileSparsity.density", "num_heads", num_heads)
        if self.per_head and len(self.window) != num_heads:
            raise ValueError(f"SlidingTileSparsity.density: per-head windows are given for {len(self.window)} heads "
                             f"but num_heads={num_heads}; pass num_heads={len(self.window)}")
        windows = list(self.window) if self.per_head else [self.window]
        total = 0.0
        for w in windows:
            frac = 1.0
            for d, size in enumerate(self.grid.shape):
                c = torch.arange(size, dtype=torch.int64) // self.tile[d]
                s = self._starts(c, d, w[d])[:, None]
                kept = ((c[None, :] >= s) & (c[None, :] < s + w[d])).sum().item()
                frac *= kept / (size * size)
            total += frac
        return total / len(windows)


# ----------------------------------------------------------------------------- top mass


def check_bshd(owner: str, name: str, t: Any) -> None:
    """``t`` is a floating ``[B, S, H, D]`` tensor, else an error naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{owner}: {name} must be [B, S, H, D], got shape {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{owner}: {name} must be floating, got {t.dtype}")


def _check_qk(owner: str, q: Any, k: Any) -> None:
    for name, t in (("q", q), ("k", k)):
        if t is None:
            raise ValueError(f"{owner}: TopMassSparsity is dynamic and needs {name} ([B, S, H, D] over all grid "
                             f"tokens); got {name}=None")
        check_bshd(owner, name, t)
    if q.device != k.device:
        raise ValueError(f"{owner}: q is on {q.device} but k is on {k.device}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{owner}: q {list(q.shape)} and k {list(k.shape)} must share B and D")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"{owner}: q and k need at least one token, got q {list(q.shape)}, k {list(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{owner}: q has H={q.shape[2]} heads, not a multiple of k's H_kv={k.shape[2]}")


def _block_mean(x: torch.Tensor, block: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``x [B, S, H, D]`` over blocks of ``block`` consecutive tokens.

    Returns ``([B, nB, H, D]`` in ``dtype``, tokens per block ``[nB]`` in ``dtype``); the last
    block may be partial.
    """
    b, s, h, d = x.shape
    full = s // block
    parts = []
    if full:
        parts.append(x[:, : full * block].reshape(b, full, block, h, d).sum(2, dtype=dtype))
    if s % block:
        parts.append(x[:, full * block:].sum(1, keepdim=True, dtype=dtype))
    sizes = _block_rows(s, block, dtype, x.device)
    return torch.cat(parts, 1) / sizes[None, :, None, None], sizes


@dataclass(frozen=True)
class TopMassSparsity(SparsityPattern):
    """Training-free dynamic block sparsity: keep the key blocks that carry ``mass`` of each
    query block's estimated attention.

    Per batch and head, queries and keys are split into blocks of ``block`` consecutive
    tokens (the last may be partial) of the tensors as given, i.e. in whatever token order
    the layer uses (tile-major order makes blocks spatially compact). Both ``q`` and ``k`` are
    *mean-pooled* per block. Pooling both is what makes the estimate cheap and meaningful:
    by bilinearity ``q̄ · k̄`` is exactly the mean logit over all (query, key) pairs of the two
    blocks, so ``scale * q̄ · k̄ + log(n_k)`` estimates the log of the block's total
    unnormalised mass ``Σ_j exp(s_ij)`` (``n_k`` keys with about the mean logit each; by
    Jensen it underestimates blocks with widely spread logits, which is the price of not
    touching the ``S x S`` scores). A softmax over key blocks turns the estimates into
    fractions of the query block's mass; per query block the fewest key blocks, largest
    first, whose fractions sum to at least ``mass`` are kept (always at least one).
    ``mass = 1.0`` keeps every block (dense) by definition, not through floating-point sums
    that could drop a block. Ties are broken by block index (stable sort), so the choice is
    deterministic.

    Args:
        mass: target fraction of the estimated attention mass, in ``(0, 1]``.
        block: tokens per pooling block (positive int).
    """

    mass: float
    block: int = 128

    dynamic: ClassVar[bool] = True

    def __post_init__(self) -> None:
        owner = "TopMassSparsity"
        m = self.mass
        if isinstance(m, bool) or not isinstance(m, numbers.Real):
            raise TypeError(f"{owner}: mass must be a float in (0, 1], got {m!r} ({type(m).__name__})")
        m = float(m)
        if not (0.0 < m <= 1.0):  # also rejects NaN
            raise ValueError(f"{owner}: mass must be in (0, 1], got {self.mass!r}")
        object.__setattr__(self, "mass", m)
        object.__setattr__(self, "block", check_positive_int(owner, "block", self.block))

    def with_token_order(self, token_order: str) -> "TopMassSparsity":
        """Returns ``self``: the pattern has no grid and blocks whatever order the tokens come in."""
        _check_token_order("with_token_order", token_order)
        return self

    def check(self, num_tokens: int, num_heads: int) -> None:
        """Only validates the arguments (any token or head count works)."""
        check_positive_int("TopMassSparsity.check", "num_tokens", num_tokens)
        check_positive_int("TopMassSparsity.check", "num_heads", num_heads)

    def density(self, num_heads: int = 1) -> float:
        """Not defined without inputs: raises ``TypeError`` (use :func:`usp_attn.sparse.sparsity_error`)."""
        raise TypeError("TopMassSparsity is dynamic: its density depends on q and k. Measure it on real inputs "
                        "with usp_attn.sparse.sparsity_error(q, k, v, pattern), which returns (density, error)")

    def block_selection(self, q: torch.Tensor, k: torch.Tensor, heads: Optional[Sequence[int]] = None, *,
                        scale: Optional[float] = None) -> torch.Tensor:
        """Kept key blocks per query block (the pattern at its own block granularity).

        Args:
            q: ``[B, Sq_all, H, D]`` queries of all grid tokens (any floating dtype).
            k: ``[B, Sk_all, H_kv, D]`` keys of all grid tokens, ``H % H_kv == 0`` (query head
                ``h`` reads kv head ``h // (H // H_kv)``).
            heads: ``Hs`` indices into q's head dimension (default: all ``H``).
            scale: logit scale (default ``D ** -0.5``).
        Returns:
            bool ``[B, Hs, ceil(Sq_all / block), ceil(Sk_all / block)]`` on q's device. Pooling
            and scoring run in float32 (float64 for float64 inputs).
        """
        owner = "TopMassSparsity"
        _check_qk(owner, q, k)
        bsz, sq, h, d = q.shape
        sk, h_kv = k.shape[1], k.shape[2]
        hs = tuple(range(h)) if heads is None else _as_heads(owner, heads, h, f" (q has {h} heads)")
        nqb, nkb = -(-sq // self.block), -(-sk // self.block)
        if self.mass >= 1.0:
            return torch.ones(bsz, len(hs), nqb, nkb, dtype=torch.bool, device=q.device)
        cdtype = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
        scale = d ** -0.5 if scale is None else float(scale)
        idx = torch.tensor(hs, dtype=torch.int64, device=q.device)
        # Only the requested query heads are pooled (a per-head caller should not pay for all of them);
        # k is pooled once per kv head and the result indexed, since GQA maps several heads to one.
        q_sel = q if hs == tuple(range(h)) else q.index_select(2, idx)
        qbar, _ = _block_mean(q_sel, self.block, cdtype)
        kbar, ksizes = _block_mean(k, self.block, cdtype)
        kbar = kbar.index_select(2, idx // (h // h_kv))
        scores = torch.einsum("bqhd,bkhd->bhqk", qbar, kbar) * scale + torch.log(ksizes)
        p = torch.softmax(scores, dim=-1)
        p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
        # Mass of the larger blocks before each one; the top block's is exactly 0 (x - x), so it is
        # always kept for any mass > 0.
        before = torch.cumsum(p_sorted, dim=-1) - p_sorted
        keep_sorted = before < self.mass
        return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)

    def token_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: Sequence[int], *,
                   q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
        """Token-level keep mask; builds ``B x Hs x Sq x Sk`` booleans, so meant for small shapes.

        Args:
            q_pos: int64 ``[Sq]`` rows of ``q`` (positions in ``[0, Sq_all)``).
            k_pos: int64 ``[Sk]`` rows of ``k``.
            heads: ``Hs`` indices into q's head dimension.
            q, k, scale: as for :meth:`block_selection` (required).
        Returns:
            bool ``[B, Hs, Sq, Sk]`` on q's device.
        """
        owner = "TopMassSparsity.token_mask"
        _check_qk(owner, q, k)
        qp = _as_positions(owner, "q_pos", q_pos, q.shape[1]).to(q.device)
        kp = _as_positions(owner, "k_pos", k_pos, k.shape[1]).to(q.device)
        hs = _as_heads(owner, heads, q.shape[2], f" (q has {q.shape[2]} heads)")
        sel = self.block_selection(q, k, hs, scale=scale)
        return sel.index_select(2, qp // self.block).index_select(3, kp // self.block)

    def block_masks(self, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: Sequence[int],
                    block: Union[int, tuple[int, int]] = (128, 128), *,
                    q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel-block masks from the block selection, without any ``Sq x Sk`` tensor.

        When kernel blocks coincide with the pattern's blocks (``block_q == self.block`` and
        ``q_pos`` a contiguous run starting at a multiple of it; likewise for keys) the
        selection is returned directly. Otherwise kept-pair counts are accumulated from the
        distinct (kernel block, pattern block) memberships with ``index_add_`` (elementwise,
        so no TF32 rounding; float32 holds the integer counts exactly up to ``2**24`` pairs
        per block, float64 is used beyond), one head at a time to bound memory.

        Args:
            q_pos: int64 ``[Sq]`` rows of ``q``; k_pos: int64 ``[Sk]`` rows of ``k``.
            heads: ``Hs`` indices into q's head dimension.
            block: ``(block_q, block_k)`` rows per kernel block (an int means both).
            q, k, scale: as for :meth:`block_selection` (required).
        Returns:
            ``(any_kept, all_kept)``: bool ``[B, Hs, ceil(Sq / block_q), ceil(Sk / block_k)]``.
        """
        owner = "TopMassSparsity.block_masks"
        bq, bk = _as_kernel_block(owner, block)
        _check_qk(owner, q, k)
        qp = _as_positions(owner, "q_pos", q_pos, q.shape[1]).to(q.device)
        kp = _as_positions(owner, "k_pos", k_pos, k.shape[1]).to(q.device)
        hs = _as_heads(owner, heads, q.shape[2], f" (q has {q.shape[2]} heads)")
        sel = self.block_selection(q, k, hs, scale=scale)
        nqb, nkb = -(-qp.numel() // bq), -(-kp.numel() // bk)

        aligned_q = self._aligned(qp, bq)
        aligned_k = self._aligned(kp, bk)
        if aligned_q is not None and aligned_k is not None:
            out = sel[:, :, aligned_q:aligned_q + nqb, aligned_k:aligned_k + nkb]
            return out, out.clone()

        dev = q.device
        cdtype = torch.float32 if bq * bk <= 2 ** 24 else torch.float64
        qb, qu, qc = self._pairs(qp, bq)
        kb, ku, kc = self._pairs(kp, bk)
        qc, kc = qc.to(cdtype), kc.to(cdtype)
        pairs = _block_rows(qp.numel(), bq, cdtype, dev)[:, None] * _block_rows(kp.numel(), bk, cdtype, dev)[None, :]
        bsz = sel.shape[0]
        any_kept = torch.empty(bsz, len(hs), nqb, nkb, dtype=torch.bool, device=dev)
        all_kept = torch.empty_like(any_kept)
        for i in range(len(hs)):
            m = sel[:, i].to(cdtype)  # [B, nQB, nKB]
            # g[b, u, kb] = keys of kernel block kb kept by pattern query block u
            g = torch.zeros(bsz, m.shape[1], nkb, dtype=cdtype, device=dev)
            g.index_add_(2, kb, m.index_select(2, ku) * kc)
            counts = torch.zeros(bsz, nqb, nkb, dtype=cdtype, device=dev)
            counts.index_add_(1, qb, g.index_select(1, qu) * qc[:, None])
            any_kept[:, i] = counts > 0
            all_kept[:, i] = counts == pairs
        return any_kept, all_kept

    def _aligned(self, pos: torch.Tensor, rows: int) -> Optional[int]:
        """First pattern block if kernel blocks of ``pos`` are exactly pattern blocks, else None."""
        if rows != self.block or pos.numel() == 0:
            return None
        start = int(pos[0])
        if start % self.block:
            return None
        run = torch.arange(start, start + pos.numel(), dtype=pos.dtype, device=pos.device)
        return start // self.block if torch.equal(pos, run) else None

    def _pairs(self, pos: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distinct (kernel block, pattern block) memberships of ``pos`` and their row counts."""
        n_units = int(pos.max()) // self.block + 1 if pos.numel() else 1
        blk = torch.arange(pos.numel(), dtype=torch.int64, device=pos.device) // rows
        key, cnt = torch.unique(blk * n_units + pos // self.block, return_counts=True)
        return key // n_units, key % n_units, cnt
