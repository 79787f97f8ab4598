"""Split a full sequence into this rank's shard, and gather shards back.

Convention: the global sequence is cut into ``W = U * R`` contiguous chunks in
sequence-parallel rank order, with ``torch.tensor_split`` sizes (the first
``S % W`` shards are one token longer). Uneven lengths are fine. With
``load_balance=True`` the layout is the zigzag one of :mod:`usp_attn.distributed.zigzag`
(rank r holds chunks r and 2W-1-r of 2W), which balances causal attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_attn.arguments import check_load_balance
from usp_attn.distributed.collectives_grad import gather_sequence_with_grad
from usp_attn.kernels import grad_required
from usp_attn.distributed.state import SequenceParallelState, get_sequence_parallel_state
from usp_attn.distributed.zigzag import rank_chunks, shard_zigzag, to_global_order

__all__ = ["shard_sequence", "gather_sequence", "require_state"]


def require_state(state: SequenceParallelState | None) -> SequenceParallelState:
    state = state or get_sequence_parallel_state()
    if state is None:
        raise RuntimeError("sequence parallelism is not initialised: call usp_attn.init_sequence_parallel() first")
    return state


def shard_sequence(x: torch.Tensor, dim: int = 1, state: SequenceParallelState | None = None,
                   record_length: bool = True, *, load_balance: bool | None = None,
                   align: int | None = None) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim``.

    ``load_balance``: ``False`` = a contiguous chunk (a view, no copy); ``True`` = the zigzag
    layout (chunks ``r`` and ``2W-1-r`` of ``2W``, a copy; balanced causal work, see
    :mod:`usp_attn.distributed.zigzag`); ``None`` = the layout recorded on the state
    (contiguous until one is recorded). With ``record_length`` (default) the global length,
    and an explicit ``load_balance``, are recorded on the state, so the attention layers know
    every shard's size and the layout without communicating. Call it with the same full
    length on every rank.

    ``align``: cut contiguous shards in units of ``align`` tokens (recorded on the state like the
    layout; ``None``: the recorded one, 1 until one is recorded). Sparse attention under ring wants
    ``align=128``: every shard then starts at a 128-token kernel block, so whole tiles stay whole
    blocks on every hop.
    """
    state = require_state(state)
    balanced = _layout(state, load_balance)
    if align is not None:
        state.set_shard_align(align)
    if record_length:
        state.set_sequence_length(x.shape[dim])
        if load_balance is not None:
            state.set_load_balance(balanced)
    if state.world_size == 1:
        return x
    if balanced:
        return shard_zigzag(x, dim, state.world_size, state.sp_rank)
    sizes = state.sizes(x.shape[dim], False)
    start = sum(sizes[: state.sp_rank])
    return x.narrow(dim, start, sizes[state.sp_rank])


def gather_sequence(x: torch.Tensor, dim: int = 1, state: SequenceParallelState | None = None,
                    total_length: int | None = None, *, load_balance: bool | None = None) -> torch.Tensor:
    """The full tensor on every rank, from each rank's shard ``x`` (inverse of :func:`shard_sequence`).

    ``total_length`` (default: the state's recorded length) gives every shard's size; if
    neither is known the shard lengths are exchanged first (one extra small collective).
    ``load_balance``: the layout of the shards (``None``: the one recorded on the state).

    Under autograd its backward is a reduce-scatter: each rank gets the gradient of its rows
    summed over the ranks, so when every rank computes a loss from the full tensor, the
    gradients are those of the sum of the ranks' losses (see ``collectives_grad``).
    """
    state = require_state(state)
    if state.world_size == 1:
        return x
    dim = dim % x.dim()
    balanced = _layout(state, load_balance)
    total = total_length if total_length is not None else state.sequence_length
    layout = "zigzag (load_balance=True)" if balanced else "contiguous"
    if total is None:
        sizes = exchange_lengths(x.shape[dim], state)
        if balanced and sizes != state.sizes(sum(sizes), True):  # the same tuple, so the same verdict, everywhere
            raise ValueError(
                f"gather_sequence: the ranks' shard lengths {list(sizes)} along dim {dim} are not a {layout} "
                f"layout of {sum(sizes)} tokens ({list(state.sizes(sum(sizes), True))})"
            )
    else:
        sizes = state.sizes(total, balanced)
        if sizes[state.sp_rank] != x.shape[dim]:
            raise ValueError(
                f"gather_sequence: this rank's shard has length {x.shape[dim]} along dim {dim}, but a global "
                f"length of {total} in the {layout} layout gives shard sizes {list(sizes)}; pass "
                "total_length= (and load_balance=) for this tensor"
            )
    if grad_required(x):  # backward: the reduce-scatter (sum of every rank's gradient of our rows)
        full = gather_sequence_with_grad(
            x, lambda t: _all_gather_rows(t, dim, sizes, state),
            dim=dim, sizes=sizes, rank=state.sp_rank, group=state.sp_group,
        )
    else:
        full = _all_gather_rows(x, dim, sizes, state)
    if balanced:  # rank order [c_0 c_2W-1 c_1 c_2W-2 ...] -> global order
        world = state.world_size
        full = to_global_order(full, [rank_chunks(sum(sizes), world, w) for w in range(world)], dim)
    return full


def _layout(state: SequenceParallelState, load_balance) -> bool:
    if load_balance is None:
        return state.load_balance
    return check_load_balance(load_balance, none_means="the state's layout")


def _all_gather_rows(x: torch.Tensor, dim: int, sizes: tuple[int, ...], state) -> torch.Tensor:
    """Every rank's rows along ``dim``, concatenated in SP-rank order (uneven sizes allowed)."""
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
