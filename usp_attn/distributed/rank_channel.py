"""Small messages between the ranks of one sequence-parallel group, through the c10d store.

The argument check and the failure reports must work when the process groups cannot:
a rank that waits in a check must not share a process group with a rank that went on
into a data collective (they would pair up each other's messages), and a rank whose
collective failed must still learn what its peers saw. The store every process group
was rendezvoused through is such a side channel: host only (no device, no host-device
sync), independent of the groups, and it outlives a dead rank under torchrun (the
agent hosts it).

Keys live under ``usp_attn/g<generation>/sp<first rank>/``: one key space per
:func:`~usp_attn.init_sequence_parallel` and SP group, so a re-initialised layout
never reads an old one's messages.
"""

from __future__ import annotations

import datetime
import logging
import pickle
import time

import torch.distributed as dist

from usp_attn.selector import log_once

__all__ = ["RankChannel", "channel_for"]

#: How often :meth:`RankChannel.collect` looks for messages that have not arrived yet.
_POLL_S = 0.02


class RankChannel:
    """Post and read picklable messages between the ``size`` ranks of one SP group.

    Args:
        store: a c10d ``Store`` (its own client connection, so long waits here never block
            another thread's store traffic, e.g. NCCL's watchdog).
        prefix: key space of this SP group (see module doc).
        size: number of SP ranks; ``index``: this rank's SP rank.
    """

    def __init__(self, store, prefix: str, size: int, index: int) -> None:
        self.store = dist.PrefixStore(prefix, store)
        self.size, self.index = size, index

    def _key(self, name: str, index: int) -> str:
        return f"{name}/{index}"

    def post(self, name: str, value) -> None:
        """Publish this rank's ``value`` under ``name``."""
        self.store.set(self._key(name, self.index), pickle.dumps(value))

    def has_posted(self, name: str) -> bool:
        """Whether this rank has posted under ``name``."""
        return self.store.check([self._key(name, self.index)])

    def exchange(self, name: str, value, timeout: datetime.timedelta) -> tuple[list, list[int]]:
        """Post ``value``, wait up to ``timeout`` for every rank's, return ``(values, missing)``.

        ``values[i]`` is SP rank i's value (``None`` if it did not post in time); ``missing``
        lists those ranks. Every rank that got all values got the same list.
        """
        self.post(name, value)
        keys = [self._key(name, i) for i in range(self.size)]
        try:
            self.store.wait(keys, timeout)
        except RuntimeError:  # DistStoreError: some rank did not post in time
            pass
        return self._read(keys)

    def collect(self, name: str, wait_s: float) -> tuple[list, list[int]]:
        """Every rank's value under ``name``, waiting up to ``wait_s`` for the ones not posted yet.

        Polls instead of a blocking wait: the ranks that never post (dead ones) are the
        expected case here, and a store wait that times out logs a C++ warning per key.
        """
        keys = [self._key(name, i) for i in range(self.size)]
        deadline = time.monotonic() + wait_s
        while not all(self.store.check([k]) for k in keys) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        return self._read(keys)

    def peek(self, name: str) -> tuple[list, list[int]]:
        """The values posted under ``name`` so far, without waiting."""
        return self._read([self._key(name, i) for i in range(self.size)])

    def forget(self, name: str) -> None:
        """Delete this rank's key under ``name`` (only once every rank has read it)."""
        try:
            self.store.delete_key(self._key(name, self.index))
        except RuntimeError:  # a store without deletion keeps the key: harmless, only space
            pass

    def _read(self, keys: list[str]) -> tuple[list, list[int]]:
        # One round trip when every key is there (the usual case), one per key otherwise.
        present = [True] * len(keys) if self.store.check(keys) else [self.store.check([k]) for k in keys]
        wanted = [k for k, ok in zip(keys, present) if ok]
        found = iter(self.store.multi_get(wanted) if wanted else [])
        values = [pickle.loads(next(found)) if ok else None for ok in present]
        return values, [i for i, ok in enumerate(present) if not ok]


def channel_for(state) -> RankChannel | None:
    """The :class:`RankChannel` of ``state``'s SP group (made once, kept on the state).

    ``None`` when torch.distributed has no default store to reach (then checks and
    failure reports are skipped; the process groups' own timeouts still apply).
    """
    channel = state._channel
    if channel is None:
        try:
            store = dist.distributed_c10d._get_default_store().clone()
        except (AttributeError, RuntimeError, ValueError) as exc:
            log_once(logging.WARNING, f"usp_attn: no c10d store to reach the other ranks through ({exc}); "
                     "cross-rank argument checks and failure reports are off")
            return None
        prefix = f"usp_attn/g{state.generation}/sp{state.sp_ranks[0]}/"
        channel = state._channel = RankChannel(store, prefix, state.world_size, state.sp_rank)
    return channel
