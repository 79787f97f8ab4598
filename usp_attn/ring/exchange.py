"""Point-to-point exchanges of the ring loop, with double buffering.

:class:`RingExchange`: every step each rank sends the block it holds to the next ring rank
and receives the previous rank's block into a fresh buffer, through one ``batch_isend_irecv``.
:class:`DirectExchange`: at step t each rank sends its *own* block straight to rank r+t+1 and
receives rank r-t-1's, but only where the receiver needs it (a static sparse pattern says
which blocks a rank's queries read): K/V that no kept block of a rank reads is never sent to
it, and a step where no rank needs anything moves nothing. Both hand the loop rank r-t-1's
block at step t+1, so :func:`~usp_attn.ring.forward.ring_attention` runs either unchanged.

The caller starts the transfer, computes on the block it already has, then waits:
communication of step t+1 overlaps computation of step t.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

__all__ = ["DirectExchange", "RingExchange"]


class RingExchange:
    """Pass tensors around a ring of global ranks ``ring_ranks`` (ring order).

    Args:
        ring_ranks: global ranks of the ring, in ring order.
        ring_rank: this rank's position in ``ring_ranks``.
        group: the ring's process group.
        timeout: how long :meth:`wait` blocks before raising (gloo; NCCL's watchdog
            enforces the group timeout itself).
    """

    def __init__(self, ring_ranks: tuple[int, ...], ring_rank: int, group, timeout: datetime.timedelta):
        size = len(ring_ranks)
        self.next_rank = ring_ranks[(ring_rank + 1) % size]
        self.prev_rank = ring_ranks[(ring_rank - 1) % size]
        self.group = group
        self.timeout = timeout
        self._requests = None
        self._incoming: list[torch.Tensor] | None = None
        self._gloo = dist.get_backend(group) == "gloo"

    def start(self, outgoing: list[torch.Tensor], incoming_like: list[tuple[torch.Size, torch.dtype]]) -> None:
        """Send ``outgoing`` (contiguous) to the next rank; receive tensors of the given
        shapes/dtypes from the previous rank."""
        if self._requests is not None:
            raise RuntimeError("RingExchange.start called twice without wait()")
        device = outgoing[0].device
        self._incoming = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in incoming_like]
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group) for t in outgoing]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group) for t in self._incoming]
        self._requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        """Block until the transfer started by :meth:`start` is done; return the received tensors."""
        if self._requests is None:
            raise RuntimeError("RingExchange.wait called without start()")
        for request in self._requests:
            if self._gloo:
                request.wait(self.timeout)
            else:
                request.wait()
        incoming, self._requests, self._incoming = self._incoming, None, None
        return incoming


class DirectExchange(RingExchange):
    """Each rank's own block sent straight to the ring ranks that need it (see the module doc).

    Args:
        ring_ranks, ring_rank, group, timeout: as for :class:`RingExchange`.
        needs: ``needs[receiver][source]``, ring positions: whether ``receiver`` reads ``source``'s
            block. The same on every rank (it is derived from the agreed pattern), so sender and
            receiver of every transfer agree without asking each other.
    """

    def __init__(self, ring_ranks: tuple[int, ...], ring_rank: int, group, timeout: datetime.timedelta,
                 needs: tuple[tuple[bool, ...], ...]):
        super().__init__(ring_ranks, ring_rank, group, timeout)
        self.ring_ranks, self.ring_rank, self.needs = ring_ranks, ring_rank, needs
        self._step = 0
        self._own: list[torch.Tensor] | None = None
        #: tensors sent so far (this rank), for tests and reports
        self.sent_blocks = 0

    def start(self, outgoing: list[torch.Tensor] | None, incoming_like) -> None:
        """Step t (the t-th call): send the own block (``outgoing`` at the first call) to r+t+1
        if it needs it; receive from r-t-1 if this rank needs that block."""
        if self._requests is not None:
            raise RuntimeError("DirectExchange.start called twice without wait()")
        if self._own is None:
            self._own = outgoing
        self._step += 1
        size, me = len(self.ring_ranks), self.ring_rank
        target, source = (me + self._step) % size, (me - self._step) % size
        device = self._own[0].device
        ops = []
        if self.needs[target][me]:
            ops += [dist.P2POp(dist.isend, t, self.ring_ranks[target], self.group) for t in self._own]
            self.sent_blocks += 1
        self._incoming = None
        if self.needs[me][source]:
            self._incoming = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in incoming_like]
            ops += [dist.P2POp(dist.irecv, t, self.ring_ranks[source], self.group) for t in self._incoming]
        self._requests = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> list[torch.Tensor] | None:
        """The block of rank r-t-1, or ``None`` when this rank does not read it (nothing was sent)."""
        return super().wait()
