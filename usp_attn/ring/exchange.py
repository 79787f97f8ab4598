"""Point-to-point ring exchange with double buffering.

Every step each rank sends the block it holds to the next ring rank and receives
the previous rank's block into a fresh buffer, through one ``batch_isend_irecv``.
The caller starts the transfer, computes on the block it already has, then waits:
communication of step t+1 overlaps computation of step t.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

__all__ = ["RingExchange"]


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
