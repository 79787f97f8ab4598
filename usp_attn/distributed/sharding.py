"""Split a full sequence into this rank's shard, and gather shards back.

Convention: the global sequence is cut into ``W = U * R`` contiguous chunks in
sequence-parallel rank order, with ``torch.tensor_split`` sizes (the first
``S % W`` shards are one token longer). Uneven lengths are fine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_attn.distributed.collectives_grad import gather_sequence_with_grad, grad_required
from usp_attn.distributed.state import SequenceParallelState, get_sequence_parallel_state, shard_sizes

__all__ = ["shard_sequence", "gather_sequence", "require_state"]


def require_state(state: SequenceParallelState | None) -> SequenceParallelState:
    state = state or get_sequence_parallel_state()
    if state is None:
        raise RuntimeError("sequence parallelism is not initialised: call usp_attn.init_sequence_parallel() first")
    return state


def shard_sequence(x: torch.Tensor, dim: int = 1, state: SequenceParallelState | None = None,
                   record_length: bool = True) -> torch.Tensor:
    """This rank's contiguous chunk of the full tensor ``x`` along ``dim``.

    With ``record_length`` (default) the global length is recorded on the state, so the
    attention layers know every rank's shard size without communicating. Call it with
    the same full length on every rank. Returns a view (no copy).
    """
    state = require_state(state)
    if record_length:
        state.set_sequence_length(x.shape[dim])
    if state.world_size == 1:
        return x
    return torch.tensor_split(x, state.world_size, dim=dim)[state.sp_rank]


def gather_sequence(x: torch.Tensor, dim: int = 1, state: SequenceParallelState | None = None,
                    total_length: int | None = None) -> torch.Tensor:
    """The full tensor on every rank, from each rank's shard ``x`` (inverse of :func:`shard_sequence`).

    ``total_length`` (default: the state's recorded length) gives every shard's size; if
    neither is known the shard lengths are exchanged first (one extra small collective).

    Under autograd its backward is a reduce-scatter: each rank gets the gradient of its rows
    summed over the ranks, so when every rank computes a loss from the full tensor, the
    gradients are those of the sum of the ranks' losses (see ``collectives_grad``).
    """
    state = require_state(state)
    if state.world_size == 1:
        return x
    dim = dim % x.dim()
    total = total_length if total_length is not None else state.sequence_length
    if total is None:
        sizes = exchange_lengths(x.shape[dim], state)
    else:
        sizes = shard_sizes(total, state.world_size)
        if sizes[state.sp_rank] != x.shape[dim]:
            raise ValueError(
                f"gather_sequence: this rank's shard has length {x.shape[dim]} along dim {dim}, but a global "
                f"length of {total} gives shard sizes {list(sizes)}; pass total_length= for this tensor"
            )
    if grad_required(x):  # backward: the reduce-scatter (sum of every rank's gradient of our rows)
        return gather_sequence_with_grad(
            x, lambda t: gather_sequence(t, dim, state, total_length=sum(sizes)),
            dim=dim, sizes=sizes, rank=state.sp_rank, group=state.sp_group,
        )
    longest = max(sizes)
    pad = longest - x.shape[dim]
    if pad:
        pad_shape = list(x.shape)
        pad_shape[dim] = pad
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    pieces = [torch.empty_like(x) for _ in range(state.world_size)]
    dist.all_gather(pieces, x.contiguous(), group=state.sp_group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, sizes)], dim=dim)


def exchange_lengths(local_length: int, state: SequenceParallelState) -> tuple[int, ...]:
    """Every SP rank's shard length, by an all-gather (reads the result on the host)."""
    device = "cuda" if dist.get_backend(state.sp_group) == "nccl" else "cpu"
    mine = torch.tensor([local_length], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(state.world_size)]
    dist.all_gather(everyone, mine, group=state.sp_group)
    return tuple(int(t.item()) for t in everyone)
