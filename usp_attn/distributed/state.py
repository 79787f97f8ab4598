"""Process groups for sequence parallelism, and the state object the layers read.

Layout of one sequence-parallel (SP) group of W = U * R ranks (U = Ulysses degree,
R = ring degree), in SP-rank order ``sp_ranks``:

    sp_rank = ring_rank * U + ulysses_rank

    Ulysses groups: contiguous SP ranks   {r*U, ..., r*U + U-1}   (all-to-all inside)
    ring groups:    strided SP ranks      {u, U+u, 2U+u, ...}      (K/V passed around)

The global sequence is split into W contiguous shards in SP-rank order, sized as
``torch.tensor_split`` sizes them, so each Ulysses group owns one contiguous
*segment* (its U shards) and the ring circulates segments. With ``load_balance``
the shards follow the zigzag layout instead (rank r: chunks r and 2W-1-r of 2W,
see :mod:`usp_attn.distributed.zigzag`), which balances causal attention.

With classifier-free-guidance (CFG) parallelism (``cfg_degree`` C > 1) the ranks of one
*CFG unit* (the world, or each list given as ``ranks``) form C SP groups; CFG is the
outermost (slowest) dimension, as in xDiT:

    unit position = cfg_rank * (U * R) + sp_rank

    SP groups:  unit positions {c*W, ..., c*W + W-1}  (one per CFG branch; W = U * R)
    CFG groups: unit positions {p, W+p, 2W+p, ...}     (the same SP position in every
                                                        SP group: one gather per step)

Each SP group runs one branch (or one slice of the batch) of the model on its own; the
only CFG communication is the gather of the predictions in
:mod:`usp_attn.distributed.cfg`.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
from typing import Sequence

import torch
import torch.distributed as dist

from usp_attn.backends.enum import AttentionBackendEnum, parse_attention_backend
from usp_attn.distributed.agreement import agree_on_backend
from usp_attn.distributed.guard import CallGuard
from usp_attn.arguments import (  # noqa: F401 - VALIDATE_ENV, DEFAULT_TIMEOUT: documented here too
    DEFAULT_TIMEOUT,
    VALIDATE_ENV,
    check_bool,
    check_flag,
    check_positive_int,
    check_timeout,
    validate_from_env,
)
from usp_attn.distributed.zigzag import zigzag_sizes
from usp_attn.selector import GroupAgreement, get_global_forced_attn_backend, set_group_agreement

__all__ = [
    "DEFAULT_TIMEOUT",
    "SequenceParallelState",
    "check_timeout",
    "init_sequence_parallel",
    "destroy_sequence_parallel",
    "get_sequence_parallel_state",
    "shard_sizes",
]

logger = logging.getLogger("usp_attn")

# init_sequence_parallel calls so far in this process (the same on every rank): each gets
# its own key space in the c10d store (usp_attn.distributed.guard).
_generation = 0
# (store, rank, world_size) of this process's env:// rendezvous, reused by every default
# group it creates (see _init_default_group).
_rendezvous = None


def shard_sizes(total: int, world: int, align: int = 1) -> tuple[int, ...]:
    """Shard lengths of a sequence of ``total`` tokens over ``world`` ranks: ``tensor_split`` sizes of units of
    ``align`` tokens (the last unit may be partial), so every shard but the one holding the tail is a multiple
    of ``align`` and every shard starts at one (sparse attention's 128-token blocks then stay whole)."""
    units = -(-total // align)
    base, extra = divmod(units, world)
    sizes = [(base + 1 if i < extra else base) * align for i in range(world)]
    for i in reversed(range(world)):  # the partial last unit: the last rank that holds any unit
        if sizes[i]:
            sizes[i] -= units * align - total
            break
    return tuple(sizes)


@dataclasses.dataclass
class SequenceParallelState:
    """What :func:`init_sequence_parallel` built; layers take it (default: the global one).

    Attributes:
        ulysses_degree, ring_degree: U and R; ``world_size = U * R``.
        sp_rank, ulysses_rank, ring_rank: this process's positions (see module doc).
        sp_ranks: global ranks of this SP group, in SP-rank order.
        sp_group, ulysses_group, ring_group: process groups (``None`` where degree 1).
        ulysses_ranks, ring_ranks: global ranks of this rank's Ulysses / ring group, in order.
        agreement: the backend decision shared by the SP group (by the whole CFG unit when
            ``cfg_degree > 1``: every CFG group runs the same model, so the same kernel).
        timeout: bound on every collective.
        validate: cross-rank argument checks: ``None`` = each layer's first call and calls
            whose arguments changed, ``True`` = every call, ``False`` = none.
        sequence_length: global length of the sharded sequence, recorded by
            :func:`~usp_attn.distributed.sharding.shard_sequence` (or set by hand), so
            layers know every shard's size without communicating.
        load_balance: the layout of the sharded sequence, recorded by ``shard_sequence(...,
            load_balance=...)``: ``False`` = contiguous shards, ``True`` = the zigzag layout of
            :mod:`~usp_attn.distributed.zigzag` (balanced causal work).
        cfg_degree: C, the number of SP groups that split the CFG branches (1 = none).
        cfg_rank: which of them this rank's SP group is (0 .. C-1).
        cfg_group, cfg_ranks: the process group (``None`` where ``cfg_degree`` is 1) and global
            ranks, in CFG-rank order, of the ranks at this rank's SP position in every CFG group:
            the group the predictions are gathered over.
    """

    ulysses_degree: int
    ring_degree: int
    sp_rank: int
    sp_ranks: tuple[int, ...]
    sp_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    ulysses_ranks: tuple[int, ...]
    ring_ranks: tuple[int, ...]
    agreement: GroupAgreement
    timeout: datetime.timedelta
    validate: bool | None = None
    sequence_length: int | None = None
    load_balance: bool = False
    shard_align: int = 1
    generation: int = 0
    cfg_degree: int = 1
    cfg_rank: int = 0
    cfg_group: dist.ProcessGroup | None = None
    cfg_ranks: tuple[int, ...] = ()
    _created_groups: list = dataclasses.field(default_factory=list, repr=False)
    _owns_default_group: bool = False
    _guard: CallGuard | None = dataclasses.field(default=None, repr=False)
    _device_mesh: object = dataclasses.field(default=None, repr=False)

    @property
    def device_mesh(self):
        """A torch ``DeviceMesh`` with dims ``("ring", "ulysses")`` over this SP group (the one passed to
        ``init_sequence_parallel(mesh=...)``, else built on first use from the SP groups, without a collective)."""
        if self._device_mesh is None:
            from usp_attn.distributed.mesh import build_device_mesh

            self._device_mesh = build_device_mesh(self)
        return self._device_mesh

    @property
    def guard(self) -> CallGuard:
        """The cross-rank check of this group's calls (:class:`~usp_attn.distributed.guard.CallGuard`)."""
        if self._guard is None:
            self._guard = CallGuard(self)
        return self._guard

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses_degree

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses_degree

    @property
    def backend(self) -> AttentionBackendEnum:
        return self.agreement.backend

    def set_sequence_length(self, total: int | None) -> None:
        """Record the global length of the sharded sequence (all ranks must record the same)."""
        self.sequence_length = None if total is None else int(total)

    def set_load_balance(self, load_balance: bool) -> None:
        """Record the layout of the sharded sequence (all ranks must record the same)."""
        self.load_balance = check_bool("load_balance", load_balance)

    def set_shard_align(self, align: int) -> None:
        """Record that contiguous shards are cut in units of ``align`` tokens (all ranks must record the same)."""
        self.shard_align = check_positive_int("align", align)

    def sizes(self, total: int, load_balance: bool | None = None) -> tuple[int, ...]:
        """Every SP rank's shard length for a global length ``total`` in the given layout
        (``None``: the recorded one); contiguous shards in units of the recorded ``shard_align``."""
        if self.load_balance if load_balance is None else load_balance:
            return zigzag_sizes(total, self.world_size)
        return shard_sizes(total, self.world_size, self.shard_align)


_state: SequenceParallelState | None = None


def get_sequence_parallel_state() -> SequenceParallelState | None:
    """The state built by :func:`init_sequence_parallel`, or ``None``."""
    return _state


def _global_rank(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ranks must hold global ranks (ints) or lists of them, got {type(value).__name__} {value!r}")
    return value


def _sp_partition(ranks, world: int, degree: int,
                  what: str = "ulysses_degree * ring_degree") -> list[tuple[int, ...]]:
    """Normalise ``ranks`` (None, one list, or a list of lists) to a list of disjoint groups of ``degree`` ranks
    (SP groups; CFG units when ``what`` names ``cfg_degree``)."""
    if ranks is None:
        groups = [tuple(range(world))]
    else:
        ranks = list(ranks)
        nested = bool(ranks) and all(isinstance(r, (list, tuple)) for r in ranks)
        groups = [tuple(_global_rank(x) for x in g) for g in ranks] if nested else [tuple(map(_global_rank, ranks))]
    seen: set[int] = set()
    for g in groups:
        if len(g) != degree:
            raise ValueError(
                f"{what} = {degree} must equal the number of sequence-parallel ranks, "
                f"got {len(g)} ranks {list(g)} (world size {world})"
            )
        for r in g:
            if not 0 <= r < world:
                raise ValueError(f"ranks contains {r}, outside the world of {world} ranks")
            if r in seen:
                raise ValueError(f"ranks lists rank {r} more than once")
            seen.add(r)
    return groups


def _init_default_group(timeout: datetime.timedelta, generation: int) -> bool:
    """Initialise torch.distributed from the torchrun environment (or as a 1-rank group)."""
    global _rendezvous
    if dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if use_cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # Rendezvous once per process and keep the store. A destroyed default group leaves
        # its keys in torchrun's store (the agent hosts it), and torch names the next default
        # group like the old one, so a plain second env:// init reads the old group's
        # addresses (connection refused, or a hang); without torchrun, rank 0 would have to
        # host a new store on the same port while peers may still reach the old one. So each
        # default group we create reuses the store under a fresh key prefix.
        if _rendezvous is None:
            _rendezvous = next(dist.rendezvous("env://", timeout=timeout))
        store, rank, world = _rendezvous
        store.set_timeout(timeout)
        prefixed = dist.PrefixStore(f"usp_attn/default_pg/g{generation}", store)
        dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)
    else:
        # Plain `python script.py`: a group of one, so the same code runs without torchrun.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout)
    logger.info("usp_attn: initialised torch.distributed (%s, world size %d)", backend, dist.get_world_size())
    return True


def init_sequence_parallel(
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    attention_backend: AttentionBackendEnum | str | None = None,
    ranks: Sequence[int] | Sequence[Sequence[int]] | None = None,
    timeout: datetime.timedelta | float | None = None,
    *,
    strict: bool | None = None,
    validate: bool | None = None,
    mesh=None,
    cfg_degree: int = 1,
) -> SequenceParallelState:
    """Build the Ulysses and ring groups and agree on one attention backend.

    Every rank of the world calls this with the same arguments (process-group creation
    is collective). Initialises torch.distributed from the torchrun environment if needed
    (NCCL when CUDA is usable, else gloo; CUDA device from ``LOCAL_RANK``).

    Args:
        ulysses_degree, ring_degree: U and R; U * R must equal the SP group size.
        attention_backend: this rank's backend request (name or enum; a forced backend
            still wins). Only rank 0's request counts; ``None`` = the CLI value / auto.
        ranks: the SP ranks (default: all). One list of global ranks, or a list of
            disjoint lists (several SP groups beside data/tensor parallel groups). With
            ``cfg_degree`` C > 1 each list is a CFG unit of C * U * R ranks, split into C SP
            groups in order (see the module doc).
        timeout: bound on every collective: positive finite seconds or a timedelta
            (default :data:`DEFAULT_TIMEOUT`, 5 minutes).
        strict: fail instead of falling back if the request cannot run on every rank.
        validate: cross-rank argument checks (see :mod:`usp_attn.distributed.guard`):
            ``None`` = the first call of each layer and every call whose arguments changed
            (default, unless env ``USP_ATTN_VALIDATE`` is 1 = every call or 0 = never),
            ``True`` = every call, ``False`` = never.
        mesh: a torch ``DeviceMesh`` with dims ``("ring", "ulysses")`` (others allowed): use its layout
            (degrees and groups of ranks) instead of ``ulysses_degree``/``ring_degree``/``ranks``; the
            state's ``device_mesh`` is then that mesh (see ``usp_attn.distributed.mesh``). A ``"cfg"`` dim
            gives ``cfg_degree``.
        cfg_degree: C, the number of SP groups that run the CFG branches side by side (default 1: every
            rank computes every branch). Each group computes its branch or its slice of the batch and the
            predictions are gathered once per step (:mod:`usp_attn.distributed.cfg`). Two-call pipelines
            need C = 2; C > 2 needs a batch that C divides (checked when the batch is split).

    Raises:
        ValueError: a bad argument (named, before any collective); every rank raises it.
        AttentionBackendUnavailableError: strict mode and the request cannot run.

    A failed call destroys what it created (its groups, the default group if it made it),
    so the process can call it again.

    Returns:
        The :class:`SequenceParallelState`, also available from
        :func:`get_sequence_parallel_state`.
    """
    global _state, _generation
    if mesh is not None:
        from usp_attn.distributed.mesh import init_from_device_mesh

        return init_from_device_mesh(mesh, ulysses_degree, ring_degree, ranks, init_sequence_parallel,
                                     attention_backend=attention_backend, timeout=timeout, strict=strict,
                                     validate=validate, cfg_degree=cfg_degree)
    # Every argument is checked before any collective, so a bad one fails alike on every rank.
    check_positive_int("ulysses_degree", ulysses_degree)
    check_positive_int("ring_degree", ring_degree)
    check_positive_int("cfg_degree", cfg_degree)
    request = parse_attention_backend(attention_backend)
    timeout = check_timeout(timeout)
    strict = check_flag("strict", strict)
    validate = validate_from_env() if check_flag("validate", validate) is None else validate
    if _state is not None:
        raise RuntimeError("sequence parallelism is already initialised; call destroy_sequence_parallel() first")
    generation, _generation = _generation, _generation + 1
    owns_default = _init_default_group(timeout, generation)
    created: list = []
    try:
        _state = _build_state(ulysses_degree, ring_degree, request, ranks, timeout, strict, validate, created,
                              cfg_degree)
    except BaseException:
        # Leave nothing behind: the groups made so far, the agreement, the default group if ours.
        set_group_agreement(None)
        for group in reversed(created):
            dist.destroy_process_group(group)
        if owns_default and dist.is_initialized():
            dist.destroy_process_group()
        raise
    _state.generation = generation
    _state._owns_default_group = owns_default
    if _state.sp_rank == 0:
        logger.info(
            "usp_attn: sequence parallel U=%d x R=%d over ranks %s (CFG group %d of %d), backend '%s'",
            ulysses_degree, ring_degree, list(_state.sp_ranks), _state.cfg_rank, cfg_degree,
            _state.agreement.backend,
        )
    return _state


def _build_state(ulysses_degree, ring_degree, request, ranks, timeout, strict, validate,
                 created: list, cfg_degree: int = 1) -> SequenceParallelState:
    """Create the groups (appending each to ``created``) and agree on the backend."""
    world, rank = dist.get_world_size(), dist.get_rank()
    degree = ulysses_degree * ring_degree
    if cfg_degree > 1:
        # A CFG unit is cut into cfg_degree SP groups, CFG outermost; the SP groups then go through the
        # same machinery as several SP groups given as ranks=[[...], [...]].
        units = _sp_partition(ranks, world, cfg_degree * degree, what="cfg_degree * ulysses_degree * ring_degree")
        partition = [unit[c * degree:(c + 1) * degree] for unit in units for c in range(cfg_degree)]
    else:
        partition = units = _sp_partition(ranks, world, degree)
    mine = [g for g in partition if rank in g]
    if not mine:
        raise ValueError(f"rank {rank} is in none of the sequence-parallel groups {partition}")

    def new_group(members: Sequence[int]):
        # Always a group of our own, even for all ranks: it carries our timeout, and our
        # collectives cannot interleave with the application's on the default group.
        members = list(members)
        try:
            group = dist.new_group(members, timeout=timeout, sort_ranks=False)
        except TypeError:  # torch without sort_ranks: group ranks follow global rank order
            if members != sorted(members):
                raise ValueError(
                    f"this torch version orders process-group ranks by global rank; pass ranks in ascending "
                    f"order (got {members})"
                ) from None
            group = dist.new_group(members, timeout=timeout)
        created.append(group)
        return group

    sp_group = ulysses_group = ring_group = None
    ulysses_ranks = ring_ranks = ()
    sp_ranks = mine[0]
    for members in partition:  # every rank creates every group, in the same order
        group = new_group(members)
        if members == sp_ranks:
            sp_group = group
        for r in range(ring_degree):
            u_members = members[r * ulysses_degree : (r + 1) * ulysses_degree]
            group = new_group(u_members) if ulysses_degree > 1 else None
            if rank in u_members:
                ulysses_group, ulysses_ranks = group, tuple(u_members)
        for u in range(ulysses_degree):
            r_members = members[u::ulysses_degree]
            group = new_group(r_members) if ring_degree > 1 else None
            if rank in r_members:
                ring_group, ring_ranks = group, tuple(r_members)
    cfg_group, cfg_ranks, agree_group = None, (rank,), sp_group
    if cfg_degree > 1:
        for unit in units:
            group = new_group(unit)  # the agreement: every CFG group runs the same model, so one kernel
            if rank in unit:
                agree_group = group
            for position in range(degree):
                members = unit[position::degree]
                group = new_group(members)
                if rank in members:
                    cfg_group, cfg_ranks = group, tuple(members)
    # A forced backend beats the argument, which beats the CLI value (agree_on_backend's default).
    use_argument = request is not None and get_global_forced_attn_backend() is None
    kwargs = {"requested": request} if use_argument else {}
    agreement = agree_on_backend(agree_group, strict=strict, **kwargs)
    return SequenceParallelState(
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        sp_rank=sp_ranks.index(rank),
        sp_ranks=sp_ranks,
        sp_group=sp_group,
        ulysses_group=ulysses_group,
        ring_group=ring_group,
        ulysses_ranks=ulysses_ranks,
        ring_ranks=ring_ranks,
        agreement=agreement,
        timeout=timeout,
        validate=validate,
        cfg_degree=cfg_degree,
        cfg_rank=cfg_ranks.index(rank),
        cfg_group=cfg_group,
        cfg_ranks=cfg_ranks,
        _created_groups=created,
    )


def destroy_sequence_parallel() -> None:
    """Undo :func:`init_sequence_parallel` (groups, agreement; the default group if we made it)."""
    global _state
    state, _state = _state, None
    set_group_agreement(None)
    if state is None:
        return
    for group in state._created_groups:
        dist.destroy_process_group(group)
    if state._owns_default_group and dist.is_initialized():
        dist.destroy_process_group()
