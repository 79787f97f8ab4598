"""Fused log-sum-exp merge for CUDA: one pass over the accumulator per ring hop.

The unfused merge in :mod:`usp_attn.layers.merge` makes ~6 passes over an fp32
``[B, S, H, D]`` tensor per hop (casts, two exps broadcast over D, mul, add); on a
long sequence that costs a noticeable fraction of the hop's attention time. This
kernel reads the accumulator, the block output (any float dtype, any strides) and
both LSEs once and writes the accumulator and the new LSE in place:

    m     = max(lse_acc, lse_blk)                      (per row b, s, h)
    lse   = m + log(exp(lse_acc - m) + exp(lse_blk - m))
    acc   = acc * exp(lse_acc - lse) + blk * exp(lse_blk - lse)
    rows with m = -inf (no key yet in either) keep acc = 0, lse = -inf.

Triton is imported lazily; :func:`fused_merge_available` says whether it can run.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["fused_merge_", "fused_merge_available"]


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def merge_kernel(
        acc_ptr, acc_lse_ptr, blk_ptr, blk_lse_ptr,
        n_rows, seq, heads, dim,
        blk_sb, blk_ss, blk_sh, blk_sd,
        lse_sb, lse_sh, lse_ss,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # row = (b * S + s) * H + h
        row_ok = rows < n_rows
        h = rows % heads
        s = (rows // heads) % seq
        b = rows // (heads * seq)
        acc_lse_off = (b * heads + h) * seq + s  # the accumulator's LSE is contiguous [B, H, S]
        blk_lse_off = b * lse_sb + h * lse_sh + s * lse_ss
        lse_a = tl.load(acc_lse_ptr + acc_lse_off, mask=row_ok, other=float("-inf"))
        lse_b = tl.load(blk_lse_ptr + blk_lse_off, mask=row_ok, other=float("-inf")).to(tl.float32)
        m = tl.maximum(lse_a, lse_b)
        empty = m == float("-inf")
        m_safe = tl.where(empty, 0.0, m)
        sum_exp = tl.exp(lse_a - m_safe) + tl.exp(lse_b - m_safe)
        lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, sum_exp)))
        lse_safe = tl.where(empty, 0.0, lse)
        w_a = tl.where(empty, 0.0, tl.exp(lse_a - lse_safe))
        w_b = tl.where(empty, 0.0, tl.exp(lse_b - lse_safe))
        d = tl.arange(0, BLOCK_D)
        tile_ok = row_ok[:, None] & (d[None, :] < dim)
        acc_off = rows[:, None] * dim + d[None, :]
        blk_off = (b * blk_sb + s * blk_ss + h * blk_sh)[:, None] + d[None, :] * blk_sd
        acc = tl.load(acc_ptr + acc_off, mask=tile_ok, other=0.0)
        blk = tl.load(blk_ptr + blk_off, mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(acc_ptr + acc_off, acc * w_a[:, None] + blk * w_b[:, None], mask=tile_ok)
        tl.store(acc_lse_ptr + acc_lse_off, lse, mask=row_ok)

    return merge_kernel, triton


def fused_merge_available(device: torch.device) -> bool:
    """True if the Triton kernel can run for tensors on ``device``."""
    if device.type != "cuda" and not _interpreting():
        return False
    try:
        _kernel()
    except Exception:  # Triton missing or broken: the unfused merge is used
        return False
    return True


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_merge_(acc: torch.Tensor, acc_lse: torch.Tensor, blk: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """In place: fold ``blk [B, S, H, D]`` / ``blk_lse [B, H, S]`` into ``acc`` (fp32, contiguous
    ``[B, S, H, D]``) and ``acc_lse`` (fp32, contiguous ``[B, H, S]``)."""
    kernel, triton = _kernel()
    batch, seq, heads, dim = acc.shape
    n_rows = batch * seq * heads
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(dim)
    rows = max(1, 4096 // block_d)  # ~4K elements per program
    grid = (triton.cdiv(n_rows, rows),)
    kernel[grid](
        acc, acc_lse, blk, blk_lse,
        n_rows, seq, heads, dim,
        *blk.stride(), *blk_lse.stride(),
        ROWS=rows, BLOCK_D=block_d,
    )
