"""One backend for the whole group: rank 0 decides, every rank runs the same kernel.

Protocol (two collectives, once per process group, never per layer):

1. every rank contributes ``(request, source, platform, why each backend can't run)``
   through ``all_gather_object``;
2. group rank 0 computes :func:`decide` over the gathered list and broadcasts the
   resulting :class:`~usp_attn.selector.GroupAgreement` (or the error) to all ranks;
3. each rank installs it with :func:`~usp_attn.selector.set_group_agreement`.

From then on, :func:`~usp_attn.selector.get_attn_backend` evaluates rank 0's request
against rank 0's platform, restricted to backends every rank can run — a pure
function of broadcast data, so per-layer choices (head size, dtype) agree without
further communication. A request on a non-zero rank that differs from rank 0's is
ignored with a warning. If rank 0's choice cannot run on some rank, every rank falls
back together; with ``strict=True`` every rank raises an error naming that rank.
"""

from __future__ import annotations

import dataclasses
import logging

import torch.distributed as dist

from usp_attn.backends import BACKEND_CLASSES, AttentionBackendEnum, parse_attention_backend
from usp_attn.platforms import Platform, current_platform
from usp_attn.settings import SETTINGS
from usp_attn.selector import (
    FALLBACK_CHAIN,
    AttentionBackendUnavailableError,
    GroupAgreement,
    auto_preference,
    local_request,
    set_group_agreement,
)

__all__ = ["RankReport", "agree_on_backend", "decide", "local_report"]

logger = logging.getLogger("usp_attn")

_UNSET = object()


@dataclasses.dataclass(frozen=True)
class RankReport:
    """What one rank contributes to the agreement."""

    rank: int
    requested: AttentionBackendEnum | None
    source: str
    platform: Platform
    #: backend -> why it cannot run on this rank (None = it can)
    reasons: tuple[tuple[AttentionBackendEnum, str | None], ...]

    def reason(self, backend: AttentionBackendEnum) -> str | None:
        return dict(self.reasons)[backend]


def local_report(rank: int, requested=_UNSET, platform: Platform | None = None) -> RankReport:
    """This rank's report; ``requested`` defaults to the forced/CLI setting."""
    if requested is _UNSET:
        requested, source = local_request()
    else:
        requested = parse_attention_backend(requested)  # names and aliases, like everywhere else
        source = "argument" if requested is not None else "auto"
    platform = platform or current_platform()
    reasons = tuple((b, cls.machine_reason(platform)) for b, cls in BACKEND_CLASSES.items())
    return RankReport(rank, requested, source, platform, reasons)


def decide(reports: list[RankReport], strict: bool = False) -> GroupAgreement:
    """Rank 0's decision over every rank's report (index = group rank). Pure, deterministic.

    Raises:
        AttentionBackendUnavailableError: strict mode and rank 0's request cannot run on
            some rank (the message names the rank and the reason).
    """
    lead = reports[0]
    available = tuple(b for b in AttentionBackendEnum if all(r.reason(b) is None for r in reports))
    unavailable = []
    for b in AttentionBackendEnum:
        if b not in available:
            first = next(r for r in reports if r.reason(b) is not None)
            unavailable.append((b, first.rank, first.reason(b)))
    agreement = GroupAgreement(
        backend=AttentionBackendEnum.TORCH_SDPA,
        requested=lead.requested,
        source=lead.source,
        platform=lead.platform,
        available=available,
        unavailable=tuple(unavailable),
        world_size=len(reports),
        platforms=tuple(r.platform for r in reports),
    )
    if lead.requested is not None:
        candidates = (lead.requested,) + FALLBACK_CHAIN[lead.requested]
    else:
        candidates = auto_preference(lead.platform) + (AttentionBackendEnum.TORCH_SDPA,)
    chosen = next((b for b in candidates if b in available), None)
    if chosen is None or (strict and lead.requested is not None and chosen != lead.requested):
        raise AttentionBackendUnavailableError(
            f"attention backend '{lead.requested or candidates[0]}' cannot run on every rank: "
            f"{agreement.reason_unavailable(lead.requested or candidates[0])}"
        )
    return dataclasses.replace(agreement, backend=chosen)


def agree_on_backend(
    group: dist.ProcessGroup | None = None,
    *,
    requested=_UNSET,
    platform: Platform | None = None,
    strict: bool | None = None,
    install: bool = True,
) -> GroupAgreement:
    """Make every rank of ``group`` use the same attention backend.

    Args:
        group: the process group (default: the world; a single process if torch.distributed
            is not initialised).
        requested: this rank's request (default: forced backend, else ``--attention-backend``).
            Only rank 0's counts.
        platform: this rank's platform (default: detected); tests inject differing ones.
        strict: raise on every rank instead of falling back (default: the selector's setting).
        install: make the result this process's group agreement.

    Returns:
        The :class:`~usp_attn.selector.GroupAgreement`, identical on every rank.
    """
    strict = SETTINGS.strict if strict is None else bool(strict)
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank(group)
        world = dist.get_world_size(group)
    else:
        rank, world = 0, 1
    local_error: Exception | None = None
    try:
        report = local_report(rank, requested, platform)
    except (TypeError, ValueError) as exc:  # e.g. a bad backend name: still join the collectives
        local_error = exc
        report = f"rank {rank}: {type(exc).__name__}: {exc}"
    if world == 1:
        reports = [report]
        outcome = _decide_or_error(reports, strict)
    else:
        reports: list = [None] * world
        dist.all_gather_object(reports, report, group=group)
        box = [_decide_or_error(reports, strict) if rank == 0 else None]
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(box, src=src, group=group)
        outcome = box[0]
    if local_error is not None:
        raise local_error
    if isinstance(outcome, tuple):  # (exception class name, message), raised on every rank
        kind, message = outcome
        raise _ERRORS[kind](message)
    if rank != 0 and report.requested != outcome.requested:
        logger.warning(
            "usp_attn: rank %d requested attention backend %s but rank 0 requested %s; using rank 0's choice",
            rank, report.requested or "auto", outcome.requested or "auto",
        )
    if rank == 0:
        logger.info(
            "usp_attn: %d rank(s) agreed on attention backend '%s' (requested: %s)",
            world, outcome.backend, outcome.requested or "auto",
        )
        for b, bad_rank, reason in outcome.unavailable:
            if b == outcome.requested:
                logger.warning("usp_attn: '%s' is unavailable on rank %d (%s); all ranks fall back to '%s'",
                               b, bad_rank, reason, outcome.backend)
    if install:
        set_group_agreement(outcome, local_platform=report.platform)
    return outcome


_ERRORS = {
    "AttentionBackendUnavailableError": AttentionBackendUnavailableError,
    "ValueError": ValueError,
    "RuntimeError": RuntimeError,
}


def _decide_or_error(reports, strict):
    """Rank 0's outcome: the agreement, or ``(error class name, message)`` to broadcast so
    that every rank raises it and none is left waiting in a collective."""
    failed = [r for r in reports if isinstance(r, str)]
    if failed:
        return "ValueError", "attention backend agreement failed: " + "; ".join(failed)
    try:
        return decide(reports, strict)
    except AttentionBackendUnavailableError as exc:
        return "AttentionBackendUnavailableError", str(exc)
    except Exception as exc:  # a bug must not become a hang on the other ranks
        return "RuntimeError", f"rank 0 could not decide the attention backend: {type(exc).__name__}: {exc}"
