"""Merging partial attention results by their log-sum-exp.

Attention of a query row over keys split into blocks A and B:

    lse = logaddexp(lse_A, lse_B)
    out = out_A * exp(lse_A - lse) + out_B * exp(lse_B - lse)

exact, in fp32. A row with no attendable key in either block has lse = -inf in both;
then both weights are defined as 0 so the row stays 0 (never NaN).
"""

from __future__ import annotations

import torch

__all__ = ["PartialAttention"]


class PartialAttention:
    """Running fp32 accumulator of attention over key blocks.

    ``out``: ``[B, S, H, D]`` float32; ``lse``: ``[B, H, S]`` float32.
    """

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Fold in one block's ``out [B, S, H, D]`` (any float dtype) and ``lse [B, H, S]``."""
        lse = lse.float()
        if self.out is None:
            self.out = out.float()  # kernel outputs are ours: updating them in place is safe
            self.lse = lse.clone()
            return
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
