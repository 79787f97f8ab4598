"""Classifier-free-guidance (CFG) parallelism: the CFG branches on different SP groups, one gather per step.

A guided sampler needs two predictions per step, ``v_cond`` and ``v_uncond``, of the same latents. They share no
activations, so ``init_sequence_parallel(..., cfg_degree=2)`` puts them on two SP groups (``state.cfg_rank`` 0
and 1; see :mod:`usp_attn.distributed.state` for the rank order) that never talk inside the model; this module
has the two operations that join them again:

* :func:`cfg_split` takes this CFG group's slice of a batch. For samplers that batch the branches
  (``cat([uncond, cond])``: CogVideoX, LTX-Video, the built-in model), split every batched input, run the model on
  the slice, and :func:`cfg_gather` the prediction: each group computes ``1 / cfg_degree`` of the batch.
* :func:`cfg_gather` concatenates every CFG group's tensor along ``dim``: one ``all_gather`` over
  ``state.cfg_group`` (the ranks at this rank's SP position in every CFG group), queued on the device without a
  host sync. For samplers that call the model once per branch, compute branch ``state.cfg_rank`` and gather
  ``pred[None]``: ``[cfg_degree, ...]`` with every branch, on every rank.

Inference only (no autograd through the gather). Every rank of the CFG unit must call these with tensors of the
same shape and dtype (SP ranks hold the full prediction after the model's own gather, so they do).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_attn.distributed.sharding import require_state
from usp_attn.distributed.state import SequenceParallelState

__all__ = ["cfg_gather", "cfg_split"]


def _check_dim(x, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is not a dimension of x (shape {list(x.shape)})")
    return dim % x.dim()


def cfg_split(x: torch.Tensor, dim: int = 0, state: SequenceParallelState | None = None) -> torch.Tensor:
    """This CFG group's equal slice of ``x`` along ``dim`` (the batch): slice ``state.cfg_rank`` of
    ``state.cfg_degree``, a view (no copy). ``x`` any shape and dtype; with ``cfg_degree`` 1, ``x`` itself.

    Raises:
        ValueError: ``cfg_degree`` does not divide ``x.shape[dim]`` (e.g. a batch of 2 CFG branches over 4 CFG
        groups, or guidance off); the same on every rank, before any collective.
    """
    st = require_state(state)
    dim = _check_dim(x, dim)
    size = x.shape[dim]
    if size % st.cfg_degree:
        raise ValueError(
            f"cfg_degree={st.cfg_degree} must divide the batch to split, but x has {size} rows along dim {dim} "
            f"(shape {list(x.shape)}); a guided batch has 2 rows per sample (is guidance on?), and cfg_degree > 2 "
            "needs more than one sample per branch"
        )
    if st.cfg_degree == 1:
        return x
    part = size // st.cfg_degree
    return x.narrow(dim, st.cfg_rank * part, part)


def cfg_gather(x: torch.Tensor, dim: int = 0, state: SequenceParallelState | None = None) -> torch.Tensor:
    """Every CFG group's ``x`` concatenated along ``dim`` in CFG-rank order, on every rank.

    ``x``: any shape and dtype, the same on every rank of ``state.cfg_group``. Returns a tensor whose ``dim`` is
    ``cfg_degree`` times longer (``x`` itself when ``cfg_degree`` is 1). One ``all_gather`` over
    ``state.cfg_group``; no host sync. The inverse of :func:`cfg_split` along the same ``dim``.
    """
    st = require_state(state)
    dim = _check_dim(x, dim)
    if st.cfg_degree == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(st.cfg_degree)]
    dist.all_gather(parts, x, group=st.cfg_group)
    return torch.cat(parts, dim=dim)
