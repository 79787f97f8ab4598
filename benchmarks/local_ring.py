"""Drive ``usp_attn``'s ring loop on one device, to measure the per-rank compute of a ring.

``usp_attn.layers.ring.ring_attention`` is exactly the code ``RingAttention`` (and
``USPAttention`` with ring_degree > 1) runs on each rank. It gets its K/V blocks from
an exchange object with ``start(outgoing, incoming_like)`` / ``wait() -> [tensors]``.
:class:`LocalRingExchange` is a stand-in for that transport which hands over the next
block from memory instead of receiving it: the attention and merge work per hop are
unchanged, the communication is left out.

This is a benchmark instrument for a single GPU, not a test double: the distributed
tests exercise the real transport in real process groups.
"""

from __future__ import annotations

import contextlib

import torch

from usp_attn.layers.ring import ring_attention

__all__ = ["LocalRingExchange", "split_blocks", "run_local_ring", "merge_variant"]


class LocalRingExchange:
    """Hands ring rank ``ring_rank`` the blocks it would receive, in ring order.

    Args:
        blocks: ``(k_j, v_j)`` of every ring rank j, each ``[B, S_j, H_kv, D]`` contiguous
            (like received buffers; K and V travel as two tensors).
        ring_rank: the rank being simulated; its first incoming block is rank r-1's.
        masks: optional uint8 ``[B, S_j]`` key masks travelling with the blocks.
    """

    def __init__(self, blocks: list[torch.Tensor], ring_rank: int, masks: list[torch.Tensor] | None = None):
        self.blocks = blocks
        self.masks = masks
        self.source = ring_rank
        self._pending: int | None = None

    def start(self, outgoing: list[torch.Tensor], incoming_like: list[tuple]) -> None:
        if self._pending is not None:
            raise RuntimeError("LocalRingExchange.start called twice without wait()")
        self.source = (self.source - 1) % len(self.blocks)
        expected = tuple(incoming_like[0][0])
        have = tuple(self.blocks[self.source][0].shape)
        if have != expected:
            raise ValueError(f"ring expects a block of shape {expected}, have {have}")
        self._pending = self.source

    def wait(self) -> list[torch.Tensor]:
        if self._pending is None:
            raise RuntimeError("LocalRingExchange.wait called without start()")
        j, self._pending = self._pending, None
        k_j, v_j = self.blocks[j]
        return [k_j, v_j] if self.masks is None else [k_j, v_j, self.masks[j]]


def split_blocks(k: torch.Tensor, v: torch.Tensor, ring_size: int) -> tuple[list[tuple], tuple[int, ...]]:
    """Full ``k, v [B, S, H_kv, D]`` -> ring_size contiguous ``(k_j, v_j)`` blocks
    (``torch.tensor_split`` sizes, as ``usp_attn.shard_sequence`` cuts) and their lengths."""
    ks = torch.tensor_split(k, ring_size, dim=1)
    vs = torch.tensor_split(v, ring_size, dim=1)
    blocks = [(kj.contiguous(), vj.contiguous()) for kj, vj in zip(ks, vs)]
    return blocks, tuple(kj.shape[1] for kj in ks)


def run_local_ring(attend, q: torch.Tensor, blocks: list[torch.Tensor], lengths: tuple[int, ...],
                   *, ring_rank: int = 0, causal: bool = False) -> torch.Tensor:
    """One rank's ring forward: ``q [B, S_q, H, D]`` against every block; returns ``[B, S_q, H, D]``.

    ``attend`` is a ``LocalAttention.attend`` (as ``USPAttention`` passes it).
    """
    own = blocks[ring_rank]
    exchange = LocalRingExchange(blocks, ring_rank) if len(blocks) > 1 else None
    return ring_attention(
        attend, q, own[0], own[1], exchange=exchange, ring_rank=ring_rank, block_lengths=lengths, causal=causal
    )


@contextlib.contextmanager
def merge_variant(fused: bool):
    """Inside the block, ring merges use the fused Triton kernel (``fused=True``, where it can
    run) or the unfused torch ops: compares the two merges on the same ring. Benchmark-only:
    it swaps ``usp_attn.layers.merge.fused_merge_available`` for the duration."""
    from usp_attn.layers import merge

    original = getattr(merge, "fused_merge_available", None)
    if original is None:
        raise RuntimeError("usp_attn.layers.merge has no fused_merge_available (no fused merge to switch)")
    merge.fused_merge_available = original if fused else (lambda device: False)
    try:
        yield
    finally:
        merge.fused_merge_available = original
