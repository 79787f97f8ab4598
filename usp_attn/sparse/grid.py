"""The latent patch grid of video tokens and the tile-major token order.

The video tokens of a DiT form a ``frames x height x width`` grid of latent patches; in the
full sequence they are stored row-major, i.e. token ``(f, y, x)`` sits at position
``(f * height + y) * width + x``. Sparse patterns are defined on these coordinates.

Tile-major order groups the tokens of each tile (``tf x th x tw`` patches) into one
contiguous run, so that a kernel block of consecutive tokens covers one tile (or a few)
instead of a thin slice across many tiles: that is what lets block-sparse kernels skip
whole blocks.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "VideoGrid",
    "tile_major_permutation",
    "tile_major_inverse_permutation",
    "as_positive_int_triple",
]


def check_positive_int(owner: str, name: str, value: Any) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise.

    ``bool`` is rejected although it subclasses ``int``: ``True`` as a size is almost
    certainly a bug (a flag passed in the wrong position), not a deliberate 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


def as_positive_int_triple(owner: str, name: str, value: Any) -> tuple[int, int, int]:
    """``value`` (a length-3 sequence of positive ints) -> ``tuple[int, int, int]``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise TypeError(f"{owner}: {name} must be a 3-tuple of positive ints (frames, height, width), got {value!r}")
    items = tuple(value)
    if len(items) != 3:
        raise ValueError(
            f"{owner}: {name} must have 3 entries (frames, height, width), got {len(items)}: {value!r}"
        )
    f, h, w = (check_positive_int(owner, f"{name}[{i}]", v) for i, v in enumerate(items))
    return (f, h, w)


@dataclass(frozen=True)
class VideoGrid:
    """Latent patch grid ``frames x height x width`` of the video tokens (row-major order).

    Frozen and hashable, so layers can key caches on it.
    """

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            object.__setattr__(self, name, check_positive_int("VideoGrid", name, getattr(self, name)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    def coords(self, pos: torch.Tensor) -> torch.Tensor:
        """Row-major positions -> grid coordinates.

        Args:
            pos: int64 ``[S]``, row-major token positions in ``[0, num_tokens)``.
        Returns:
            int64 ``[S, 3]``: ``(frame, row, column)`` of each position, on ``pos``'s device.
        """
        hw = self.height * self.width
        return torch.stack((pos // hw, (pos // self.width) % self.height, pos % self.width), dim=-1)


def as_grid(owner: str, grid: Any) -> VideoGrid:
    """Accept a :class:`VideoGrid` or a ``(frames, height, width)`` triple."""
    if isinstance(grid, VideoGrid):
        return grid
    try:
        f, h, w = as_positive_int_triple(owner, "grid", grid)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} (grid may also be a VideoGrid)") from None
    return VideoGrid(f, h, w)


#: Tokens per block of the block-sparse kernel (FlashAttention 4's 128 x 128 tiles on SM90/SM100).
KERNEL_BLOCK = 128


@functools.lru_cache(maxsize=16)
def _cached_permutation(grid: VideoGrid, tile: tuple[int, int, int]) -> torch.Tensor:
    # Cached on CPU because patterns map positions through it on every mask call; the
    # public functions hand out clones so a caller writing into the result cannot poison it.
    rm = torch.arange(grid.num_tokens, dtype=torch.int64)
    c = grid.coords(rm)
    n = [-(-s // t) for s, t in zip(grid.shape, tile)]
    tile_id = ((c[:, 0] // tile[0]) * n[1] + c[:, 1] // tile[1]) * n[2] + c[:, 2] // tile[2]
    volume = tile[0] * tile[1] * tile[2]
    partial = torch.bincount(tile_id, minlength=n[0] * n[1] * n[2])[tile_id] < volume
    # Inside one tile, row-major order of (f, y, x) equals the order of the global row-major
    # index, so a stable sort by (partial, tile id) yields "tiles in order, row-major inside",
    # the full tiles first: each starts at a multiple of the tile volume.
    order = torch.sort(partial.to(torch.int64) * (n[0] * n[1] * n[2]) + tile_id, stable=True).indices
    full_tokens = int((~partial).sum())
    edge = order[full_tokens:]
    chunks = edge.numel() // KERNEL_BLOCK
    if volume % KERNEL_BLOCK or chunks == 0 or full_tokens == 0:
        return order
    # Tiles of whole kernel blocks: the edge tokens go in whole-block chunks spread evenly between
    # the full tiles (the remainder last). Every full tile still fills whole blocks, and any run of
    # blocks (a ring rank's segment) holds its share of the edge tiles, whose blocks are only
    # partly kept and cost more; with them all at the end, the last ring rank did most of that work.
    full = order[:full_tokens].view(-1, volume)
    count = full.shape[0]
    slot = (torch.arange(1, chunks + 1) * count) // (chunks + 1)  # full tiles before chunk j
    keys = torch.cat([2 * torch.arange(count), 2 * slot - 1])
    runs = [full[t] for t in range(count)] + [edge[j * KERNEL_BLOCK : (j + 1) * KERNEL_BLOCK] for j in range(chunks)]
    placed = torch.sort(keys, stable=True).indices.tolist()
    return torch.cat([runs[i] for i in placed] + [edge[chunks * KERNEL_BLOCK :]])


@functools.lru_cache(maxsize=16)
def _cached_inverse(grid: VideoGrid, tile: tuple[int, int, int]) -> torch.Tensor:
    perm = _cached_permutation(grid, tile)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return inv


def _device_of(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def tile_major_permutation(grid: VideoGrid | tuple[int, int, int], tile: tuple[int, int, int], *,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """Permutation from row-major to tile-major token order.

    The full tiles come first, in row-major order of their tile coordinates
    ``(f // tf, y // th, x // tw)``, then the smaller edge tiles of a grid that is not a multiple
    of ``tile``, in the same order; the tokens inside a tile in row-major order. Every full tile
    is contiguous and starts at a multiple of the tile volume, so tiles of a multiple of 128
    tokens fill whole 128-token kernel blocks (the block-sparse kernel then runs them without a
    mask; only blocks of the edge tiles are partly kept). When the tile volume is a multiple of
    128, the edge tokens (in that order) are cut into 128-token chunks spread evenly between the
    full tiles (chunk ``j`` of ``C`` after ``floor((j + 1) * F / (C + 1))`` of the ``F`` full
    tiles; the last ``< 128`` edge tokens at the end), so every part of the sequence, such as a
    ring rank's segment, holds its share of the costlier edge blocks.

    Args:
        grid: :class:`VideoGrid` (or ``(frames, height, width)``).
        tile: ``(tf, th, tw)`` positive ints.
        device: where to put the result (default CPU).
    Returns:
        ``perm``: int64 ``[N]`` (``N = grid.num_tokens``) with
        ``x_tile_major = x_row_major[:, perm]`` for ``x`` of shape ``[B, N, ...]``;
        ``perm[j]`` is the row-major position of the ``j``-th tile-major token.
    """
    grid = as_grid("tile_major_permutation", grid)
    tile = as_positive_int_triple("tile_major_permutation", "tile", tile)
    return _cached_permutation(grid, tile).to(_device_of(device), copy=True)


def tile_major_inverse_permutation(grid: VideoGrid | tuple[int, int, int], tile: tuple[int, int, int], *,
                                   device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse of :func:`tile_major_permutation`.

    Args:
        grid, tile, device: as for :func:`tile_major_permutation`.
    Returns:
        ``inv``: int64 ``[N]`` with ``x_row_major = x_tile_major[:, inv]``; ``inv[i]`` is the
        tile-major position of row-major token ``i``.
    """
    grid = as_grid("tile_major_inverse_permutation", grid)
    tile = as_positive_int_triple("tile_major_inverse_permutation", "tile", tile)
    return _cached_inverse(grid, tile).to(_device_of(device), copy=True)
