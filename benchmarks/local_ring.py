"""Drive ``usp_attn``'s ring loop on one device, to measure the per-rank work of a ring (tests/gpu check
one rank's output through the same exchange).

``usp_attn.ring.forward.ring_attention`` is exactly the code ``RingAttention`` (and ``USPAttention``
with ring_degree > 1) runs on each rank; it gets its K/V blocks from an exchange object with
``start(outgoing, incoming_like)`` / ``wait() -> [tensors]``. :class:`LocalRingExchange` hands over
the next block from memory instead of receiving it: the attention and merge work per hop are
unchanged, the communication is left out. A benchmark instrument, not a test double: the
distributed tests exercise the real transport in real process groups.
"""

from __future__ import annotations

import contextlib

import torch

from usp_attn.ring.forward import ring_attention

__all__ = ["LocalRingExchange", "split_blocks", "run_local_ring", "merge_variant"]


class LocalRingExchange:
    """Hands ring rank ``ring_rank`` the blocks ``(k_j, v_j)`` (each ``[B, S_j, H_kv, D]``, contiguous
    like received buffers) it would receive, in ring order: rank r-1's first; ``masks``: optional
    uint8 ``[B, S_j]`` key masks travelling with them."""

    def __init__(self, blocks: list, ring_rank: int, masks: list[torch.Tensor] | None = None):
        self.blocks, self.masks, self.source = blocks, masks, ring_rank

    def start(self, outgoing: list[torch.Tensor], incoming_like: list[tuple]) -> None:
        self.source = (self.source - 1) % len(self.blocks)
        if tuple(self.blocks[self.source][0].shape) != tuple(incoming_like[0][0]):
            raise ValueError(f"ring expects a block of shape {tuple(incoming_like[0][0])}, "
                             f"have {tuple(self.blocks[self.source][0].shape)}")

    def wait(self) -> list[torch.Tensor]:
        k_j, v_j = self.blocks[self.source]
        return [k_j, v_j] if self.masks is None else [k_j, v_j, self.masks[self.source]]


def split_blocks(k: torch.Tensor, v: torch.Tensor, ring_size: int) -> tuple[list[tuple], tuple[int, ...]]:
    """Full ``k, v [B, S, H_kv, D]`` -> ring_size contiguous ``(k_j, v_j)`` blocks (``torch.tensor_split``
    sizes, as ``usp_attn.shard_sequence`` cuts) and their lengths."""
    ks, vs = torch.tensor_split(k, ring_size, dim=1), torch.tensor_split(v, ring_size, dim=1)
    return [(kj.contiguous(), vj.contiguous()) for kj, vj in zip(ks, vs)], tuple(kj.shape[1] for kj in ks)


def run_local_ring(attend, q: torch.Tensor, blocks: list, lengths: tuple[int, ...], *, ring_rank: int = 0,
                   causal: bool = False) -> torch.Tensor:
    """One rank's ring forward: ``q [B, S_q, H, D]`` against every block; returns ``[B, S_q, H, D]``.
    ``attend`` is a ``LocalAttention.attend`` (as ``USPAttention`` passes it)."""
    k, v = blocks[ring_rank]
    exchange = LocalRingExchange(blocks, ring_rank) if len(blocks) > 1 else None
    return ring_attention(attend, q, k, v, exchange=exchange, ring_rank=ring_rank, block_lengths=lengths,
                          causal=causal)


@contextlib.contextmanager
def merge_variant(fused: bool):
    """Inside the block, ring merges use the fused Triton kernel (``fused=True``, where it can run) or the
    unfused torch ops, by swapping ``usp_attn.ring.merge.fused_merge_available`` for the duration."""
    from usp_attn.ring import merge

    original = merge.fused_merge_available
    merge.fused_merge_available = original if fused else (lambda device: False)
    try:
        yield
    finally:
        merge.fused_merge_available = original
