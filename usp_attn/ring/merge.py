"""Merging partial attention results by their log-sum-exp.

Attention of a query row over keys split into blocks A and B:

    lse = logaddexp(lse_A, lse_B)
    out = out_A * exp(lse_A - lse) + out_B * exp(lse_B - lse)

exact, accumulated in fp32 (fp64 when the blocks are fp64, so fp64 inputs keep fp64
accuracy through the ring). A row with no attendable key in either block has lse = -inf
in both; then both weights are defined as 0 so the row stays 0 (never NaN).

On CUDA the merges run on a side stream: merging (memory-bound) block t overlaps the
attention kernel (compute-bound) of block t+1 instead of following it.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from usp_attn.ring.merge_triton import fused_merge, fused_merge_available

__all__ = ["PartialAttention", "merge", "merge_partials"]


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def merge(a, lse_a, b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merge of two partial results over disjoint key sets: ``a, b [B, S, H, D]`` (any
    float dtype) with their ``lse_a, lse_b [B, H, S]``. Returns ``(out, lse)`` in fp32, or fp64 when
    any input is fp64. Pure torch ops, so autograd records it."""
    acc = _acc_dtype(a, lse_a, b, lse_b)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    lse = torch.logaddexp(lse_a, lse_b)
    # Rows where both are -inf: subtract 0 instead, so exp(-inf - 0) = 0, not NaN.
    ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - ref).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    weight_b = torch.exp(lse_b - ref).transpose(1, 2).unsqueeze(-1)
    return a.to(acc) * weight_a + b.to(acc) * weight_b, lse


def merge_partials(a, lse_a, b, lse_b, out, lse_out=None) -> None:
    """:func:`merge` written into ``out`` (and ``lse_out``): the contract of
    :func:`~usp_attn.ring.merge_triton.fused_merge`, for the accumulator of :class:`PartialAttention`."""
    merged, lse = merge(a, lse_a, b, lse_b)
    out.copy_(merged)
    if lse_out is not None:
        lse_out.copy_(lse)


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device=device)


class PartialAttention:
    """Running merge of attention over key blocks.

    Blocks are ``out [B, S, H, D]`` (any float dtype, any strides) with ``lse [B, H, S]``.
    The first block is kept as it is; from the second on, an fp32 accumulator (fp64 for
    fp64 blocks, merged with torch ops: the fused kernel computes in fp32) holds the
    merge. The caller flags the last block with ``last_dtype`` to get the result written
    directly in that dtype (no separate cast pass).

    Args:
        fused: use the Triton kernel (``None``: when the device supports it).
    """

    def __init__(self, fused: bool | None = None) -> None:
        self._acc: torch.Tensor | None = None  # fp32, contiguous [B, S, H, D]
        self._acc_lse: torch.Tensor | None = None  # fp32, contiguous [B, H, S]
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fused = fused
        self._stream = None  # CUDA side stream the merges run on, once there is one to run

    @property
    def empty(self) -> bool:
        return self._acc is None and self._first is None

    def add(self, out: torch.Tensor, lse: torch.Tensor, *, last_dtype: torch.dtype | None = None):
        """Fold in one block. With ``last_dtype`` this is the final block: returns the merged
        result in ``last_dtype`` (the accumulator is not updated). Otherwise returns None."""
        if self._fused is None:
            self._fused = fused_merge_available(out.device)
        if self.empty:
            if last_dtype is not None:
                return out.to(last_dtype)
            self._first = (out, lse)
            return None
        a, lse_a = self._first if self._acc is None else (self._acc, self._acc_lse)
        self._first = None
        acc_dtype = _acc_dtype(out, lse)
        merge = fused_merge if self._fused and acc_dtype == torch.float32 else merge_partials
        main = None
        if out.device.type == "cuda":
            main = torch.cuda.current_stream(out.device)
            self._stream = self._stream or _side_stream(out.device)
            self._stream.wait_stream(main)  # the block (and any earlier work) is ready
            for t in (a, lse_a, out, lse):  # used on the side stream: keep their memory until it is done
                t.record_stream(self._stream)
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            if last_dtype is not None:
                result = torch.empty(out.shape, dtype=last_dtype, device=out.device)
                merge(a, lse_a, out, lse, result, None)
                self._acc = self._acc_lse = None
            else:
                result = None
                if self._acc is None:
                    self._acc = torch.empty(out.shape, dtype=acc_dtype, device=out.device)
                    self._acc_lse = torch.empty(lse.shape, dtype=acc_dtype, device=lse.device)
                merge(a, lse_a, out, lse, self._acc, self._acc_lse)
        if result is not None and main is not None:
            main.wait_stream(self._stream)
            result.record_stream(main)
        return result

    def _join(self) -> None:
        """Make the caller's stream wait for the merges before it reads the accumulator."""
        if self._stream is not None:
            main = torch.cuda.current_stream(self._stream.device)
            main.wait_stream(self._stream)
            for t in (self._acc, self._acc_lse):
                if t is not None:  # read on the caller's stream now: keep it alive for that too
                    t.record_stream(main)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """The merge so far, in ``dtype``."""
        if self.empty:
            raise RuntimeError("no attention block was added")
        self._join()
        return (self._first[0] if self._acc is None else self._acc).to(dtype)

    def lse(self) -> torch.Tensor:
        """The log-sum-exp so far, ``[B, H, S]``: fp32, or fp64 for fp64 blocks."""
        if self.empty:
            raise RuntimeError("no attention block was added")
        self._join()
        lse = self._first[1] if self._acc is None else self._acc_lse
        return lse.to(_acc_dtype(lse))

