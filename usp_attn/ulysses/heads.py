"""How heads are divided among the U ranks of a Ulysses group.

Rank u receives the contiguous query-head block u. Its key/value heads must be the
ones those query heads read (query head h reads kv head h // (H / H_kv)):

    H % U == 0 and H_kv % U == 0   split kv heads the same way            (no copy)
    H % U == 0 and U % H_kv == 0   repeat each kv head U / H_kv times, so  (GQA/MQA with
                                   every rank gets the one kv head it needs  few kv heads)
    otherwise                      repeat kv heads up to H (plain MHA), then pad q and kv
                                   with zero heads to a multiple of U; the padded heads'
                                   outputs are dropped on return.

Optionally the query heads are first permuted (``order``; kv heads follow their query heads), so a
rank's block is a chosen set of heads: sparse attention with per-head windows balances its work so
(:mod:`usp_attn.sparse.balance`). The layer restores the order on the way back.
"""

from __future__ import annotations

import dataclasses

import torch

from usp_attn.backends import expand_kv_heads

__all__ = ["HeadPlan"]


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    num_heads: int
    num_kv_heads: int
    degree: int
    kv_heads_before_split: int  # after repetition, before padding
    padded_heads: int
    order: tuple[int, ...] | None = None  # query head at each position (only where kv heads split evenly)

    @classmethod
    def make(cls, num_heads: int, num_kv_heads: int, degree: int, order=None) -> "HeadPlan":
        if num_heads % degree == 0 and num_kv_heads % degree == 0:
            return cls(num_heads, num_kv_heads, degree, num_kv_heads, num_heads, order)
        if order is not None:
            raise ValueError(f"a head order needs heads ({num_heads}) and kv heads ({num_kv_heads}) divisible by the "
                             f"Ulysses degree {degree}")
        if num_heads % degree == 0 and degree % num_kv_heads == 0:
            return cls(num_heads, num_kv_heads, degree, degree, num_heads)
        padded = -(-num_heads // degree) * degree
        return cls(num_heads, num_kv_heads, degree, num_heads, padded)

    @property
    def padded_kv_heads(self) -> int:
        return self.kv_heads_before_split + (self.padded_heads - self.num_heads if self.is_padded else 0)

    @property
    def is_padded(self) -> bool:
        return self.padded_heads != self.num_heads

    @property
    def local_heads(self) -> int:
        return self.padded_heads // self.degree

    @property
    def local_kv_heads(self) -> int:
        return self.padded_kv_heads // self.degree

    def heads_of(self, rank: int) -> tuple[int, ...]:
        """The layer's query head at each position of rank ``rank``'s block (``local_heads`` of them); a padded
        position (zeros, its output dropped) names the last head, so per-head data can be looked up for it."""
        n, last = self.local_heads, self.num_heads - 1
        block = [min(i, last) for i in range(rank * n, (rank + 1) * n)]
        return tuple(block) if self.order is None else tuple(self.order[i] for i in block)

    def prepare_q(self, q: torch.Tensor) -> torch.Tensor:
        """``[B, S, H, D]`` -> ``[B, S, padded_heads, D]`` (permuted by ``order``)."""
        if self.order is not None:
            q = q[:, :, list(self.order)]
        return _pad_heads(q, self.padded_heads)

    def restore(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Undo ``order`` along the heads dimension ``dim`` of a result with ``num_heads`` heads."""
        if self.order is None:
            return x
        inverse = [0] * self.num_heads
        for position, head in enumerate(self.order):
            inverse[head] = position
        return x.index_select(dim, torch.tensor(inverse, device=x.device))

    def prepare_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """``[B, S, H_kv, D]`` -> ``[B, S, padded_kv_heads, D]`` (permuted with their query heads, repeated, padded)."""
        if self.order is not None:
            group = self.num_heads // self.num_kv_heads
            kv = kv[:, :, [self.order[i] // group for i in range(0, self.num_heads, group)]]
        if self.kv_heads_before_split != self.num_kv_heads:
            kv = expand_kv_heads(kv, self.kv_heads_before_split)
        return _pad_heads(kv, self.padded_kv_heads)

    def local_block(self, x: torch.Tensor, rank: int, kv: bool) -> torch.Tensor:
        """Rank ``rank``'s head block of a prepared (replicated) tensor."""
        n = self.local_kv_heads if kv else self.local_heads
        return x[:, :, rank * n : (rank + 1) * n]


def _pad_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    if x.shape[2] == heads:
        return x
    pad = x.new_zeros(x.shape[0], x.shape[1], heads - x.shape[2], x.shape[3])
    return torch.cat([x, pad], dim=2)
