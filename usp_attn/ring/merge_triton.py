"""Fused log-sum-exp merge for CUDA: one pass per ring hop.

Merging with torch ops costs ~6 passes over an fp32 ``[B, S, H, D]`` tensor per hop
(casts, two exps broadcast over D, mul, add). This kernel reads both partial results
(any float dtype, any strides) and both LSEs once and writes the merged result in the
output's dtype, so the accumulator needs no separate cast on the first hop and the
last hop writes the caller's dtype directly:

    m   = max(lse_a, lse_b)                        (per row b, s, h)
    lse = m + log(exp(lse_a - m) + exp(lse_b - m))
    out = a * exp(lse_a - lse) + b * exp(lse_b - lse)
    rows with m = -inf (no attendable key in either) give out = 0, lse = -inf.

``out`` may alias ``a`` and ``lse_out`` may alias ``lse_a`` (each element is read
before it is written by the same program). Triton is imported lazily;
:func:`fused_merge_available` says whether the kernel can run.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["fused_merge", "fused_merge_available"]


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def merge_kernel(
        a_ptr, lse_a_ptr, b_ptr, lse_b_ptr, out_ptr, lse_out_ptr,
        n_rows, seq, heads, dim,
        a_sb, a_ss, a_sh, a_sd, b_sb, b_ss, b_sh, b_sd,
        la_sb, la_sh, la_ss, lb_sb, lb_sh, lb_ss,
        STORE_LSE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # row = (b * S + s) * H + h
        row_ok = rows < n_rows
        h = rows % heads
        s = (rows // heads) % seq
        b = rows // (heads * seq)
        lse_a = tl.load(lse_a_ptr + b * la_sb + h * la_sh + s * la_ss, mask=row_ok, other=float("-inf"))
        lse_b = tl.load(lse_b_ptr + b * lb_sb + h * lb_sh + s * lb_ss, mask=row_ok, other=float("-inf"))
        lse_a = lse_a.to(tl.float32)
        lse_b = lse_b.to(tl.float32)
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
        a_off = (b * a_sb + s * a_ss + h * a_sh)[:, None] + d[None, :] * a_sd
        b_off = (b * b_sb + s * b_ss + h * b_sh)[:, None] + d[None, :] * b_sd
        x = tl.load(a_ptr + a_off, mask=tile_ok, other=0.0).to(tl.float32)
        y = tl.load(b_ptr + b_off, mask=tile_ok, other=0.0).to(tl.float32)
        merged = x * w_a[:, None] + y * w_b[:, None]
        out_off = rows[:, None] * dim + d[None, :]  # out is contiguous [B, S, H, D]
        tl.store(out_ptr + out_off, merged.to(out_ptr.dtype.element_ty), mask=tile_ok)
        if STORE_LSE:
            tl.store(lse_out_ptr + (b * heads + h) * seq + s, lse, mask=row_ok)  # contiguous [B, H, S]

    return merge_kernel, triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_merge_available(device: torch.device) -> bool:
    """True if the Triton kernel can run for tensors on ``device``."""
    if device.type != "cuda" and not _interpreting():
        return False
    try:
        _kernel()
    except Exception:  # Triton missing or broken: the torch-ops merge is used instead
        return False
    return True


def fused_merge(
    a: torch.Tensor, lse_a: torch.Tensor, b: torch.Tensor, lse_b: torch.Tensor,
    out: torch.Tensor, lse_out: torch.Tensor | None,
) -> None:
    """Merge partial results ``a``/``b`` (``[B, S, H, D]``, any float dtype and strides) with their
    LSEs (``[B, H, S]``, any strides) into ``out`` (contiguous ``[B, S, H, D]``, any float dtype)
    and, unless ``None``, ``lse_out`` (contiguous fp32 ``[B, H, S]``)."""
    kernel, triton = _kernel()
    batch, seq, heads, dim = out.shape
    n_rows = batch * seq * heads
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(dim)
    rows = max(1, 4096 // block_d)  # ~4K elements per program
    grid = (triton.cdiv(n_rows, rows),)
    kernel[grid](
        a, lse_a, b, lse_b, out, out if lse_out is None else lse_out,
        n_rows, seq, heads, dim,
        *a.stride(), *b.stride(), *lse_a.stride(), *lse_b.stride(),
        STORE_LSE=lse_out is not None, ROWS=rows, BLOCK_D=block_d,
    )
