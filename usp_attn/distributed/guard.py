"""The guard: every rank of a sequence-parallel group agrees on a call's arguments, or all raise.

One object per :func:`~usp_attn.init_sequence_parallel` (``state.guard``) owns the whole protocol:

1. **The argument check** (:meth:`CallGuard.check_reason`, :meth:`CallGuard.check`).
A sequence-parallel forward runs different collectives depending on its arguments
(mask present or not, replicated-token counts, shapes, dtype, sequence length). Ranks
that disagree enter different collectives, or the same ones with different sizes:
they block until the timeout, gloo aborts the process, or a rank returns garbage.

What is checked, and when (``state.validate``):

* ``None`` (default): the **first call of each layer** (per :func:`init_sequence_parallel`)
  and **every call whose signature differs from the one this rank last agreed on** for
  that layer. The signature (:class:`CallSignature`) is host-only: q/k/v/mask shapes,
  dtypes and devices, the replicated counts, the global sequence length (so shard
  length vs. ``seq_len`` is part of it) and whether autograd records the call. A steady-state call compares one tuple: no
  collective, no store access, no host-device sync.
* ``True``: every call. ``False``: never.

A check shares every rank's summary and any local argument error through the c10d store
(:class:`RankChannel`, step 2).
Every rank decides from the same gathered list, so all raise the same ``ValueError``
naming the argument, the ranks and their values, or all go on.

When only some ranks' signature changed, only they enter the check; the others go on
into the data collectives. That cannot be detected at zero cost (the unchanged ranks
would have to communicate every call), but it cannot hang or corrupt either: the check
runs outside the process groups, so a waiting rank never pairs its messages with a
peer's data collective, and both sides stop at the group timeout. The checking rank
raises ``ValueError`` naming the ranks that did not join and what changed; the others'
collective fails and step 3 finds the changed rank's
pending check in the store and raises the same kind of error. The first call of a
layer is always checked by every rank, so every disagreement present from the start
(the usual integration bug) is reported at once, in milliseconds.

2. **The channel** (:class:`RankChannel`).
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

3. **Naming failed ranks** (:meth:`CallGuard.name_failure`).
A gloo collective that fails says "Connection reset by peer" or "Timed out waiting
3000ms for recv operation": it names no rank, and the rank that caused it (one that
died, raised, or changed its arguments alone) is elsewhere. So every rank whose
sequence-parallel forward fails posts one line about its failure in the store
(step 2), and a rank whose *collective* failed reads
its peers' lines, waiting up to :data:`REPORT_GRACE_S` for ranks that have not written
yet, and raises an error that names:

* ranks that reported an error of their own (e.g. an argument error raised on that
  rank only), with the error;
* ranks waiting in an argument check this rank did not enter (their arguments changed
  alone; step 1), with what changed;
* ranks that wrote nothing: they have exited (a dead process cannot write) or are stuck
  elsewhere.

It costs nothing until something fails. On NCCL a collective does not fail on the host:
the watchdog ends the process at the group timeout, so there only the argument checks
and the failures gloo or the store see are named.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import logging
import pickle
import re
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from usp_attn.logs import log_once

__all__ = ["CallGuard", "CallSignature", "CollectiveError", "RankChannel", "REPORT_GRACE_S", "describe_disagreement",
           "group_ranks", "is_collective_failure", "named_backward", "recording_guard"]

# The guard of the forward being recorded by autograd: the backward of each collective and ring step it records
# keeps it, so a failure there names the rank behind it as the forward does.
_RECORDING: contextvars.ContextVar = contextvars.ContextVar("usp_attn_recording_guard", default=None)

#: Seconds a rank whose collective failed waits for its peers' reports before naming the silent ones.
REPORT_GRACE_S = 2.0

_COLLECTIVE_HINTS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer")


class CollectiveError(RuntimeError):
    """A collective of the sequence-parallel group failed or timed out; the message names the ranks."""


# ---- 1. what a call is checked on ------------------------------------------------------------

def _tensor_sig(t):
    if isinstance(t, torch.Tensor):
        return (tuple(t.shape), t.dtype, t.device)
    return ("not a tensor", type(t).__name__)


def _plain_sig(x):
    # Exact type: True must not compare equal to an agreed 1.
    return x if x is None or type(x) is int else ("not an int", type(x).__name__)


def _records(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _option_sig(value):
    # Flags and counts compare exactly; a frozen dataclass (a sparse pattern) compares as itself.
    if value is None or type(value) is bool or type(value) is int:  # the usual values, without a lookup
        return value
    params = getattr(type(value), "__dataclass_params__", None)
    if params is not None and params.frozen:
        return value
    return _plain_sig(value)


class CallSignature(NamedTuple):
    """Host-only description of one call: everything that decides which collectives run and
    their sizes. Cheap to build and compare: shapes and flags, no device access (a tuple, so
    torch.compile traces the steady-state comparison without a graph break).

    ``options``: further named arguments that change the collectives (``return_lse``, the
    replicated key/value counts, the layout, ...), as sorted ``(name, value)`` pairs.
    """

    q: tuple
    k: tuple
    v: tuple
    mask: tuple | None
    prefix: object
    suffix: object
    seq_len: object
    grad: bool
    options: tuple = ()

    @classmethod
    def of(cls, q, k, v, attn_mask, n_pre, n_suf, total, **options) -> "CallSignature":
        grad = torch.is_grad_enabled() and (_records(q) or _records(k) or _records(v))
        extra = tuple([(name, _option_sig(options[name])) for name in sorted(options)])  # once per call: no generator
        return cls(_tensor_sig(q), _tensor_sig(k), _tensor_sig(v), None if attn_mask is None else _tensor_sig(attn_mask),
                   _plain_sig(n_pre), _plain_sig(n_suf), _plain_sig(total), grad, extra)

    def summary(self, layer) -> dict:
        """The values every rank must agree on, readable in an error message."""
        q, k, mask = self.q, self.k, self.mask
        tensors_ok = len(q) == 3 and len(q[0]) == 4 and len(k) == 3 and len(k[0]) == 4
        summary = {
            "num_heads, num_kv_heads, head_size": (layer.num_heads, layer.num_kv_heads, layer.head_size),
            "causal": layer.causal,
            "ulysses_pipeline": getattr(layer, "ulysses_pipeline", None),  # the number of all-to-alls depends on it
            "softmax_scale": layer.local.softmax_scale,
            "q shape (B, H, D)": (q[0][0], q[0][2], q[0][3]) if tensors_ok else None,
            "k shape (B, H_kv, D)": (k[0][0], k[0][2], k[0][3]) if tensors_ok else None,
            "dtype": str(q[1]) if len(q) == 3 else None,
            "device type": q[2].type if len(q) == 3 else None,
            "attn_mask given": mask is not None,
            "num_replicated_prefix": self.prefix,
            "num_replicated_suffix": self.suffix,
            "seq_len": self.seq_len,
            "gradients recorded": self.grad,
        }
        if mask is not None and len(mask) == 3:  # bool and additive masks travel differently
            summary["attn_mask dims, dtype"] = (len(mask[0]), str(mask[1]))
        summary.update(dict(self.options))
        return summary


def describe_disagreement(summaries: list[dict], errors: list[str | None]) -> list[str]:
    """One line per rank with an argument error and per value the ranks disagree on."""
    lines = [f"  rank {rank}: {err}" for rank, err in enumerate(errors) if err]
    for key in summaries[0]:
        values = [s.get(key) for s in summaries]
        if any(v != values[0] for v in values):
            lines.append(f"  {key}: {group_ranks(values)}")
    return lines


def group_ranks(values: list) -> str:
    """``"rank 0: 48; ranks 1, 2: 49"``: ranks listed by value, in order of first appearance."""
    groups: dict = {}
    for rank, value in enumerate(values):
        groups.setdefault(repr(value), []).append(rank)
    parts = []
    for value, ranks in groups.items():
        label = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
        parts.append(f"{label}: {value}")
    return "; ".join(parts)


# ---- 2. the channel ----------------------------------------------------------------------------

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


# ---- the guard ---------------------------------------------------------------------------------

class CallGuard:
    """The argument check, its channel and the naming of failed ranks for one SP group.

    Made by :func:`~usp_attn.init_sequence_parallel`; ``state.guard``. Keeps, host only: the
    channel (made on first use) and how many checks ran (the same count on every rank, since
    every rank checks the same calls). Each layer keeps the signature it last agreed on with
    this guard (``agreed``, passed in), so a new guard (re-initialisation) checks every layer anew.
    """

    def __init__(self, state) -> None:
        self.state = state
        self.checks = 0
        self._channel: RankChannel | None = None

    @property
    def channel(self) -> RankChannel | None:
        """The :class:`RankChannel` of the SP group; ``None`` when torch.distributed has no
        default store to reach (then checks and failure reports are skipped; the process
        groups' own timeouts still apply)."""
        if self._channel is None:
            state = self.state
            try:
                store = dist.distributed_c10d._get_default_store().clone()
            except (AttributeError, RuntimeError, ValueError) as exc:
                log_once(logging.WARNING, f"usp_attn: no c10d store to reach the other ranks through ({exc}); "
                         "cross-rank argument checks and failure reports are off")
                return None
            prefix = f"usp_attn/g{state.generation}/sp{state.sp_ranks[0]}/"
            self._channel = RankChannel(store, prefix, state.world_size, state.sp_rank)
        return self._channel

    # ---- 1. the argument check ----
    def check_reason(self, agreed: CallSignature | None, signature: CallSignature) -> str | None:
        """Why this call must be checked (``"first call"``, ``"changed"``, ``"every call"``), or None.
        ``agreed``: the signature the layer last agreed on with this guard, if any."""
        validate = self.state.validate
        if validate is False:
            return None
        if validate:
            return "every call"
        if agreed is None:
            return "first call"
        return "changed" if agreed != signature else None

    def check(self, layer, signature: CallSignature, agreed: CallSignature | None, reason: str, error: str | None,
              shard_length, where: str) -> list[int] | None:
        """Share this rank's summary (and local ``error``) with the SP group; raise on every rank if
        any rank has an error or the summaries differ. ``layer`` gives the summary its
        configuration (heads, head size, causal, scale).

        Returns every SP rank's shard length (so the caller need not exchange them again, and
        the layer records ``signature`` as agreed), or None when no channel is available (then
        a local ``error`` is raised here, locally).
        """
        channel = self.channel
        if channel is None:
            if error:
                raise ValueError(error)
            return None
        summary = signature.summary(layer)
        name = f"check{self.checks}"
        self.checks += 1
        values, missing = channel.exchange(name, (summary, shard_length, error), self.state.timeout)
        if missing:
            before = None if agreed is None else agreed.summary(layer)
            raise self._missing_ranks(reason, missing, summary, before, error, where)
        if self.checks >= 2:  # every rank has read the previous round's keys: they all posted this one since
            channel.forget(f"check{self.checks - 2}")
        problems = describe_disagreement([v[0] for v in values], [v[2] for v in values])
        if problems:
            raise ValueError(f"{where}: the ranks' arguments do not agree:\n" + "\n".join(problems) +
                             "\nEvery rank of the sequence-parallel group must call the layer with the same "
                             "arguments (its own shard of the sequence)")
        return [v[1] for v in values]

    def _missing_ranks(self, reason, missing, summary, before, error, where) -> Exception:
        seconds = self.state.timeout.total_seconds()
        ranks = ", ".join(map(str, missing))
        own = f"; this rank's arguments are also invalid: {error}" if error else ""
        if reason == "changed" and before is not None:
            changed = "; ".join(f"{k}: {before[k]!r} -> {summary[k]!r}" for k in summary
                                if k in before and summary[k] != before[k])
            exc: Exception = ValueError(
                f"{where}: rank {self.state.sp_rank}'s arguments changed since the last check "
                f"({changed or 'shard shapes'}) but rank(s) {ranks} did not enter the argument check within "
                f"{seconds:g} s: their arguments presumably did not change. Every rank must change its arguments "
                f"together{own}"
            )
        else:
            exc = CollectiveError(
                f"{where}: rank(s) {ranks} did not reach the argument check of this call ({reason}) within "
                f"{seconds:g} s: they exited, are stuck, or do not call this layer{own}"
            )
        self.report(exc)
        return exc

    # ---- 3. naming failed ranks ----
    def report(self, exc: BaseException) -> None:
        """Post this rank's first failure (one line) for its peers; never raises."""
        channel = self.channel
        if channel is None:
            return
        try:
            if not channel.has_posted("failed"):
                channel.post("failed", (type(exc).__name__, _first_line(exc)))
        except RuntimeError:  # the store is gone too (its host died): nothing left to tell
            pass

    def start_recording(self):
        """While autograd records a forward (until :meth:`stop_recording` with the token returned): the backwards
        of its collectives and ring steps name failed ranks through this guard."""
        return _RECORDING.set(self)

    def stop_recording(self, token) -> None:
        _RECORDING.reset(token)

    def raise_named(self, exc: BaseException, where: str, summary=None):
        """Re-raise ``exc``, as the error :meth:`name_failure` makes of it when it is a collective failure."""
        named = self.name_failure(exc, where, summary)
        if named is None:
            raise exc
        raise named from exc

    def name_failure(self, exc: BaseException, where: str, summary=None) -> Exception | None:
        """Post ``exc`` for the peers; for a collective failure return an error naming the ranks.

        Args:
            exc: what the collective (or the kernel) raised on this rank.
            where: the operation, for the message.
            summary: optional callable returning this rank's argument summary
                (:meth:`CallSignature.summary`), to show what a rank that changed its
                arguments alone differs in.

        Returns:
            ``None`` when ``exc`` is not a collective failure (the caller re-raises it), else
            a :class:`CollectiveError`, or a ``ValueError`` when a peer's arguments were at fault.
        """
        self.report(exc)
        channel = self.channel
        if channel is None or not is_collective_failure(exc):
            return None
        me, mine = self.state.sp_rank, _first_line(exc)
        try:
            reports, silent = channel.collect("failed", REPORT_GRACE_S)
            pending, _ = channel.peek(f"check{self.checks}")
        except RuntimeError as store_exc:  # the store went with its host: the one rank it can still name
            return CollectiveError(
                f"{where}: a collective of the sequence-parallel group failed on rank {me}: {mine}\n"
                f"  the c10d store cannot be reached either ({_first_line(store_exc)}): the process that hosts it has "
                "exited. Ranks started without torchrun host it in global rank 0's process, so global rank 0 has "
                "presumably exited; without the store no other rank can be named (under torchrun the agent hosts it)")
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


def recording_guard() -> CallGuard | None:
    """The guard of the forward autograd is recording now (an autograd Function's forward keeps it on ``ctx``)."""
    return _RECORDING.get()


def named_backward(backward):
    """For an autograd Function's ``backward``: a collective that fails there (a peer died, or raised in its own
    backward and reported it) raises an error naming the ranks, as in the forward; ``ctx.guard`` from
    :func:`recording_guard` (None: no naming)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        guard = getattr(ctx, "guard", None)
        if guard is None:
            return backward(ctx, *grads)
        try:
            return backward(ctx, *grads)
        except Exception as exc:  # any failure is reported for the peers, not only a collective's
            guard.raise_named(exc, "USPAttention backward")

    return wrapper


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text[0]) if text else ""  # gloo's source location
    return f"{type(exc).__name__}: {line[:240]}"


def is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(hint in text for hint in _COLLECTIVE_HINTS)


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
