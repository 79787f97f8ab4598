"""Merging partial attention results by their log-sum-exp.

Attention of a query row over keys split into blocks A and B:

    lse = logaddexp(lse_A, lse_B)
    out = out_A * exp(lse_A - lse) + out_B * exp(lse_B - lse)

exact, in fp32. A row with no attendable key in either block has lse = -inf in both;
then both weights are defined as 0 so the row stays 0 (never NaN).
"""

from __future__ import annotations

import torch

from usp_attn.layers.merge_triton import fused_merge_, fused_merge_available

__all__ = ["PartialAttention"]


class PartialAttention:
    """Running fp32 accumulator of attention over key blocks.

    ``out``: ``[B, S, H, D]`` float32; ``lse``: ``[B, H, S]`` float32.
    """

    def __init__(self, fused: bool | None = None) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self._fused = fused  # None: use the Triton kernel when the device supports it

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Fold in one block's ``out [B, S, H, D]`` (any float dtype) and ``lse [B, H, S]``."""
        if self.out is None:
            # Contiguous fp32 copies we own (a kernel's fp32 output is already ours: no copy).
            self.out = out.to(torch.float32).contiguous()
            self.lse = lse.to(torch.float32).contiguous()
            if self._fused is None:
                self._fused = fused_merge_available(out.device)
            return
        if self._fused:
            fused_merge_(self.out, self.lse, out, lse)
            return
        lse = lse.float()
        new_lse = torch.logaddexp(self.lse, lse)
        # Rows where both are -inf: subtract 0 instead, so exp(-inf - 0) = 0, not NaN.
        ref = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
        weight_acc = torch.exp(self.lse - ref).transpose(1, 2).unsqueeze(-1)
        weight_new = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
        self.out.mul_(weight_acc).add_(out.float() * weight_new)
        self.lse = new_lse

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        if self.out is None:
            raise RuntimeError("no attention block was added")
        return self.out.to(dtype)
