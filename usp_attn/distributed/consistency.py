"""Cross-rank argument checks, so ranks that disagree get an error instead of a hang.

A sequence-parallel forward runs different collectives depending on its arguments
(mask present or not, replicated-token counts, shapes, dtype, sequence length). Ranks
that disagree enter different collectives, or the same ones with different sizes:
they block until the timeout, gloo aborts the process, or a rank returns garbage.

What is checked, and when (``state.validate``):

* ``None`` (default): the **first call of each layer** (per :func:`init_sequence_parallel`)
  and **every call whose signature differs from the one this rank last agreed on** for
  that layer. The signature (:func:`call_signature`) is host-only: q/k/v/mask shapes,
  dtypes and devices, the replicated counts, the global sequence length (so shard
  length vs. ``seq_len`` is part of it) and whether autograd records the call. A steady-state call compares one tuple: no
  collective, no store access, no host-device sync.
* ``True``: every call. ``False``: never.

A check shares every rank's summary and any local argument error through the c10d store
(:mod:`~usp_attn.distributed.rank_channel`: host only, independent of the process groups).
Every rank decides from the same gathered list, so all raise the same ``ValueError``
naming the argument, the ranks and their values, or all go on.

When only some ranks' signature changed, only they enter the check; the others go on
into the data collectives. That cannot be detected at zero cost (the unchanged ranks
would have to communicate every call), but it cannot hang or corrupt either: the check
runs outside the process groups, so a waiting rank never pairs its messages with a
peer's data collective, and both sides stop at the group timeout. The checking rank
raises ``ValueError`` naming the ranks that did not join and what changed; the others'
collective fails and :mod:`~usp_attn.distributed.failures` finds the changed rank's
pending check in the store and raises the same kind of error. The first call of a
layer is always checked by every rank, so every disagreement present from the start
(the usual integration bug) is reported at once, in milliseconds.
"""

from __future__ import annotations

import torch

from usp_attn.distributed.failures import CollectiveError, report_failure
from usp_attn.distributed.rank_channel import channel_for

__all__ = ["call_signature", "check_reason", "check_call", "shared_summary"]


def _tensor_sig(t):
    if isinstance(t, torch.Tensor):
        return (tuple(t.shape), t.dtype, t.device)
    return ("not a tensor", type(t).__name__)


def _plain_sig(x):
    # Exact type: True must not compare equal to an agreed 1.
    return x if x is None or type(x) is int else ("not an int", type(x).__name__)


def call_signature(q, k, v, attn_mask, n_pre, n_suf, total, **options) -> tuple:
    """Host-only description of one call: everything that decides which collectives run
    and their sizes (with gradients recorded, the forward adds its own). Cheap: shapes and
    flags, no device access. ``options``: further named arguments that change the
    collectives (e.g. ``return_lse``, the replicated key/value counts, the layout)."""
    mask = None if attn_mask is None else _tensor_sig(attn_mask)
    grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v))
    extra = tuple((name, value if type(value) is bool else _plain_sig(value)) for name, value in
                  sorted(options.items()))
    return (_tensor_sig(q), _tensor_sig(k), _tensor_sig(v), mask, _plain_sig(n_pre), _plain_sig(n_suf),
            _plain_sig(total), grad, extra)


def shared_summary(layer, signature: tuple) -> dict:
    """The values every rank must agree on, readable in an error message."""
    q, k, _, mask, n_pre, n_suf, total, grad = signature[:8]
    tensors_ok = len(q) == 3 and len(q[0]) == 4 and len(k) == 3 and len(k[0]) == 4
    summary = {
        "num_heads, num_kv_heads, head_size": (layer.num_heads, layer.num_kv_heads, layer.head_size),
        "causal": layer.causal,
        "softmax_scale": layer.local.softmax_scale,
        "q shape (B, H, D)": (q[0][0], q[0][2], q[0][3]) if tensors_ok else None,
        "k shape (B, H_kv, D)": (k[0][0], k[0][2], k[0][3]) if tensors_ok else None,
        "dtype": str(q[1]) if len(q) == 3 else None,
        "device type": q[2].type if len(q) == 3 else None,
        "attn_mask given": mask is not None,
        "num_replicated_prefix": n_pre,
        "num_replicated_suffix": n_suf,
        "seq_len": total,
        "gradients recorded": grad,
    }
    if mask is not None and len(mask) == 3:  # bool and additive masks travel differently
        summary["attn_mask dims, dtype"] = (len(mask[0]), str(mask[1]))
    summary.update(dict(signature[8]) if len(signature) > 8 else {})
    return summary


def _token(state) -> tuple:
    return (state.generation, id(state))


def check_reason(layer, state, signature: tuple) -> str | None:
    """Why this call must be checked (``"first call"``, ``"changed"``, ``"every call"``), or None."""
    if state.validate is False:
        return None
    if state.validate:
        return "every call"
    agreed = layer.__dict__.get("_usp_agreed_call")
    if agreed is None or agreed[0] != _token(state):
        return "first call"
    return "changed" if agreed[1] != signature else None


def check_call(layer, state, signature: tuple, reason: str, error: str | None, shard_length,
               where: str) -> list[int] | None:
    """Share this rank's summary (and local ``error``) with the SP group; raise on every rank if
    any rank has an error or the summaries differ.

    Returns every SP rank's shard length (so the caller need not exchange them again), or
    None when no channel is available (then a local ``error`` is raised here, locally).
    """
    channel = channel_for(state)
    if channel is None:
        if error:
            raise ValueError(error)
        return None
    summary = shared_summary(layer, signature)
    name = f"check{state._checks}"
    state._checks += 1  # the same count on every rank: every rank checks the same calls
    values, missing = channel.exchange(name, (summary, shard_length, error), state.timeout)
    if missing:
        raise _missing_ranks(layer, state, channel, reason, missing, summary, error, where)
    if state._checks >= 2:  # every rank has read the previous round's keys: they all posted this one since
        channel.forget(f"check{state._checks - 2}")
    problems = describe_disagreement([v[0] for v in values], [v[2] for v in values])
    if problems:
        raise ValueError(f"{where}: the ranks' arguments do not agree:\n" + "\n".join(problems) +
                         "\nEvery rank of the sequence-parallel group must call the layer with the same "
                         "arguments (its own shard of the sequence)")
    layer.__dict__["_usp_agreed_call"] = (_token(state), signature)
    return [v[1] for v in values]


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


def _missing_ranks(layer, state, channel, reason, missing, summary, error, where) -> Exception:
    seconds = state.timeout.total_seconds()
    ranks = ", ".join(map(str, missing))
    own = f"; this rank's arguments are also invalid: {error}" if error else ""
    if reason == "changed":
        before = shared_summary(layer, layer.__dict__["_usp_agreed_call"][1])
        changed = "; ".join(f"{k}: {before[k]!r} -> {summary[k]!r}" for k in summary
                            if k in before and summary[k] != before[k])
        exc: Exception = ValueError(
            f"{where}: rank {state.sp_rank}'s arguments changed since the last check ({changed or 'shard shapes'}) "
            f"but rank(s) {ranks} did not enter the argument check within {seconds:g} s: their arguments "
            f"presumably did not change. Every rank must change its arguments together{own}"
        )
    else:
        exc = CollectiveError(
            f"{where}: rank(s) {ranks} did not reach the argument check of this call ({reason}) within "
            f"{seconds:g} s: they exited, are stuck, or do not call this layer{own}"
        )
    report_failure(channel, exc)
    return exc
