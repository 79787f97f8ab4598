"""Exact masked attention for sparse patterns, and the error a pattern causes.

Sequence layout: ``S = num_replicated_prefix + N + num_replicated_suffix`` where the middle
``N`` rows are the grid tokens the pattern speaks about (positions ``0 .. N-1`` in the
pattern's token order) and the prefix/suffix rows are text tokens, dense in both directions.

This builds ``S x S`` score matrices (one head at a time), so it is for CPU checks, tests,
and measuring a pattern on small inputs, not for production lengths.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch

from usp_attn.sparse.patterns import SparsityPattern, check_bshd

__all__ = ["masked_reference", "sparsity_error"]


def _check_nonneg_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be a non-negative int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{owner}: {name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_inputs(owner: str, q: Any, k: Any, v: Any, pattern: Any, prefix: Any, suffix: Any) -> tuple[int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_bshd(owner, name, t)
        if t.device != q.device:
            raise ValueError(f"{owner}: {name} is on {t.device} but q is on {q.device}")
    b, s, h, d = q.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{owner}: k {list(k.shape)} and v {list(v.shape)} must agree in B, S, H_kv")
    if k.shape[0] != b or k.shape[1] != s:
        raise ValueError(f"{owner}: k {list(k.shape)} must have q's batch {b} and length {s} (self-attention over "
                         f"prefix + grid + suffix)")
    if k.shape[3] != d:
        raise ValueError(f"{owner}: q has head dim {d} but k has {k.shape[3]}")
    if h % k.shape[2]:
        raise ValueError(f"{owner}: q has H={h} heads, not a multiple of k's H_kv={k.shape[2]}")
    if pattern is not None and not isinstance(pattern, SparsityPattern):
        raise TypeError(f"{owner}: pattern must be a SparsityPattern (or None for dense), got {type(pattern).__name__}")
    prefix = _check_nonneg_int(owner, "num_replicated_prefix", prefix)
    suffix = _check_nonneg_int(owner, "num_replicated_suffix", suffix)
    n = s - prefix - suffix
    if n <= 0:
        raise ValueError(f"{owner}: num_replicated_prefix={prefix} + num_replicated_suffix={suffix} leave no grid "
                         f"tokens in a sequence of {s}")
    return prefix, suffix, n


def _full_mask(pattern: Optional[SparsityPattern], q: torch.Tensor, k: torch.Tensor, prefix: int, n: int,
               scale: Optional[float]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grid mask bool ``[B|1, H|1, N, N]``, full mask bool ``[B|1, H|1, S, S]`` with text rows/cols True)."""
    if pattern is None:
        return None, None
    h = q.shape[2]
    pattern.check(n, h)
    pos = torch.arange(n, dtype=torch.int64, device=q.device)
    if pattern.dynamic:
        grid = pattern.token_mask(pos, pos, range(h), q=q[:, prefix:prefix + n], k=k[:, prefix:prefix + n],
                                  scale=scale)
    else:
        grid = pattern.token_mask(pos, pos, range(h)).unsqueeze(0)
    s = q.shape[1]
    full = torch.ones(grid.shape[0], grid.shape[1], s, s, dtype=torch.bool, device=q.device)
    full[:, :, prefix:prefix + n, prefix:prefix + n] = grid
    return grid, full


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in ``dtype``: out ``[B, S, H, Dv]``, lse ``[B, H, S]`` (both ``dtype``)."""
    b, s, h, _ = q.shape
    group = h // k.shape[2]
    out = torch.empty(b, s, h, v.shape[3], dtype=dtype, device=q.device)
    lse = torch.empty(b, h, s, dtype=dtype, device=q.device)
    for i in range(h):  # one head at a time keeps the S x S scores to B * S^2 elements
        qi = q[:, :, i].to(dtype)
        ki = k[:, :, i // group].to(dtype)
        vi = v[:, :, i // group].to(dtype)
        scores = torch.matmul(qi, ki.transpose(1, 2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask[:, i if mask.shape[1] > 1 else 0], -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)
        # A row with no key has lse -inf; subtracting 0 instead gives exp(-inf) = 0 weights, so
        # its output is 0 rather than NaN.
        p = torch.exp(scores - torch.where(torch.isfinite(row_lse), row_lse, 0.0)[..., None])
        out[:, :, i] = torch.matmul(p, vi)
        lse[:, i] = row_lse
    return out, lse


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Optional[SparsityPattern], *,
                     scale: Optional[float] = None, num_replicated_prefix: int = 0, num_replicated_suffix: int = 0,
                     return_lse: bool = False):
    """Exact attention under ``pattern`` (text rows dense both ways).

    Args:
        q: ``[B, S, H, D]``; k, v: ``[B, S, H_kv, D]`` / ``[B, S, H_kv, Dv]`` with ``H % H_kv == 0``
            (query head ``h`` reads kv head ``h // (H // H_kv)``); any floating dtype, one device.
            ``S = num_replicated_prefix + N + num_replicated_suffix``, the middle ``N`` rows being
            the grid tokens in the pattern's token order.
        pattern: a :class:`SparsityPattern` (``None`` = dense). Dynamic patterns choose their
            blocks from q and k as given (before any upcast).
        scale: logit scale (default ``D ** -0.5``).
        num_replicated_prefix / num_replicated_suffix: text tokens before / after the grid.
        return_lse: also return the log-sum-exp of the scaled, masked scores.
    Returns:
        out ``[B, S, H, Dv]`` in q's dtype; with ``return_lse`` also lse ``[B, H, S]`` float32
        (float64 for float64 inputs). Scores and softmax run in float32, or float64 when any
        input is float64 (on CUDA, float32 matmuls follow torch's TF32 setting). Rows without
        any kept key give output 0 and lse ``-inf``, never NaN.
    """
    owner = "masked_reference"
    prefix, _, n = _check_inputs(owner, q, k, v, pattern, num_replicated_prefix, num_replicated_suffix)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    _, full = _full_mask(pattern, q, k, prefix, n, scale)
    out, lse = _attend(q, k, v, full, scale, dtype)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def sparsity_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsityPattern, *,
                   scale: Optional[float] = None, num_replicated_prefix: int = 0,
                   num_replicated_suffix: int = 0) -> tuple[float, float]:
    """How sparse ``pattern`` is on these inputs and how far its output is from dense attention.

    Args:
        q, k, v, scale, num_replicated_prefix, num_replicated_suffix: as for :func:`masked_reference`.
        pattern: the :class:`SparsityPattern` to measure (static or dynamic; a dynamic one
            selects its blocks from q and k as given, as a layer would).
    Returns:
        ``(density, relative_error)`` python floats. ``density``: fraction of (query, key)
        grid-token pairs kept, mean over batch (dynamic patterns only) and heads; text rows
        are not counted. ``relative_error``: ``||sparse - dense||_F / ||dense||_F`` over the
        whole output (text query rows see every key either way, so they add nothing), both
        computed in float64 on the inputs' device.
    """
    owner = "sparsity_error"
    if pattern is None:
        raise TypeError(f"{owner}: pattern must be a SparsityPattern, got None")
    prefix, _, n = _check_inputs(owner, q, k, v, pattern, num_replicated_prefix, num_replicated_suffix)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    grid, full = _full_mask(pattern, q, k, prefix, n, scale)
    density = grid.to(torch.float64).mean().item()
    sparse, _ = _attend(q, k, v, full, scale, torch.float64)
    dense, _ = _attend(q, k, v, None, scale, torch.float64)
    num = torch.linalg.vector_norm(sparse - dense).item()
    den = torch.linalg.vector_norm(dense).item()
    if den == 0.0:
        return density, (0.0 if num == 0.0 else math.inf)
    return density, num / den
