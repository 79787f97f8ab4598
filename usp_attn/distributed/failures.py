"""Name the rank behind a failed collective.

A gloo collective that fails says "Connection reset by peer" or "Timed out waiting
3000ms for recv operation": it names no rank, and the rank that caused it (one that
died, raised, or changed its arguments alone) is elsewhere. So every rank whose
sequence-parallel forward fails posts one line about its failure in the store
(:mod:`~usp_attn.distributed.rank_channel`), and a rank whose *collective* failed reads
its peers' lines, waiting up to :data:`REPORT_GRACE_S` for ranks that have not written
yet, and raises an error that names:

* ranks that reported an error of their own (e.g. an argument error raised on that
  rank only), with the error;
* ranks waiting in an argument check this rank did not enter (their arguments changed
  alone; see :mod:`~usp_attn.distributed.consistency`), with what changed;
* ranks that wrote nothing: they have exited (a dead process cannot write) or are stuck
  elsewhere.

It costs nothing until something fails. On NCCL a collective does not fail on the host:
the watchdog ends the process at the group timeout, so there only the argument checks
and the failures gloo or the store see are named.
"""

from __future__ import annotations

import re

import torch.distributed as dist

from usp_attn.distributed.rank_channel import channel_for

__all__ = ["CollectiveError", "REPORT_GRACE_S", "name_failed_ranks", "report_failure"]

#: Seconds a rank whose collective failed waits for its peers' reports before naming the silent ones.
REPORT_GRACE_S = 2.0

_COLLECTIVE_HINTS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer")


class CollectiveError(RuntimeError):
    """A collective of the sequence-parallel group failed or timed out; the message names the ranks."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text[0]) if text else ""  # gloo's source location
    return f"{type(exc).__name__}: {line[:240]}"


def report_failure(channel, exc: BaseException) -> None:
    """Post this rank's first failure (one line) for its peers; never raises."""
    if channel is None:
        return
    try:
        if not channel.has_posted("failed"):
            channel.post("failed", (type(exc).__name__, _first_line(exc)))
    except RuntimeError:  # the store is gone too (its host died): nothing left to tell
        pass


def is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(hint in text for hint in _COLLECTIVE_HINTS)


def name_failed_ranks(state, exc: BaseException, where: str, summary=None) -> Exception | None:
    """Post ``exc`` for the peers; for a collective failure return an error naming the ranks.

    Args:
        state: the :class:`SequenceParallelState` whose collective failed.
        exc: what the collective (or the kernel) raised on this rank.
        where: the operation, for the message.
        summary: optional callable returning this rank's argument summary (see
            :func:`~usp_attn.distributed.consistency.shared_summary`), to show what a
            rank that changed its arguments alone differs in.

    Returns:
        ``None`` when ``exc`` is not a collective failure (the caller re-raises it), else
        a :class:`CollectiveError`, or a ``ValueError`` when a peer's arguments were at fault.
    """
    channel = channel_for(state)
    report_failure(channel, exc)
    if channel is None or not is_collective_failure(exc):
        return None
    try:
        reports, silent = channel.collect("failed", REPORT_GRACE_S)
        pending, _ = channel.peek(f"check{state._checks}")
    except RuntimeError:
        return None
    me, mine = state.sp_rank, _first_line(exc)
    lines, argument_fault = [], False
    silent = [r for r in silent if r != me]
    if silent:
        lines.append(f"  {_ranks(silent)}: no report within {REPORT_GRACE_S:g} s: exited (a crashed process "
                     "cannot report) or stuck elsewhere")
    for rank, entry in enumerate(pending):
        if entry is not None and rank != me:
            argument_fault = True
            lines.append(f"  rank {rank}: changed its arguments alone and waited in the argument check instead"
                         + _difference(entry[0], summary))
    same = []
    for rank, report in enumerate(reports):
        if report is None or rank == me:
            continue
        if _shape(report[1]) == _shape(mine):  # the same kind of failure, seen from another rank
            same.append(rank)
        else:
            argument_fault |= report[0] in ("ValueError", "TypeError")
            lines.append(f"  rank {rank}: {report[1]}")
    if same:
        lines.append(f"  {_ranks(same)}: the same failure")
    head = f"{where}: a collective of the sequence-parallel group failed on rank {me}: {mine}"
    cls = ValueError if argument_fault else CollectiveError
    return cls("\n".join([head] + lines))


def _shape(line: str) -> str:
    return re.sub(r"\d+", "#", line)  # ports, addresses and milliseconds differ between ranks


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _difference(theirs: dict, summary) -> str:
    if summary is None:
        return ""
    mine = summary()
    diffs = [f"{k}: {theirs[k]!r} there, {mine.get(k)!r} here" for k in theirs if theirs[k] != mine.get(k)]
    return f" ({'; '.join(diffs)})" if diffs else ""
