"""Checks of :func:`~usp_attn.init_sequence_parallel`'s arguments, done before any collective
so a bad value fails alike on every rank, with its name and value in the message."""

from __future__ import annotations

import datetime
import math
import os

__all__ = ["DEFAULT_TIMEOUT", "VALIDATE_ENV", "check_flag", "check_timeout", "validate_from_env"]

#: Default of ``validate``: unset = check each layer's first call and every call whose
#: arguments changed; 1 = check every call; 0 = never (see usp_attn.distributed.consistency).
VALIDATE_ENV = "USP_ATTN_VALIDATE"

#: Bound on every collective of the SP groups. Inference ranks run the same kernels in
#: lockstep, so a healthy peer is late by at most one layer's work plus first-call
#: compilation skew (seconds to a minute); 5 minutes still allows for that and for
#: uneven model loading before the first collective, and ends a job with a dead or
#: stuck rank well before torch's 10-minute NCCL / 30-minute gloo defaults would.
DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)


def check_timeout(value) -> datetime.timedelta:
    """``timeout``: ``None`` (:data:`DEFAULT_TIMEOUT`), positive finite seconds, or a positive timedelta."""
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, datetime.timedelta):
        if value <= datetime.timedelta(0):
            raise ValueError(f"timeout must be positive, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"timeout must be a number of seconds or a datetime.timedelta, got {type(value).__name__} {value!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {value!r}")
    try:
        return datetime.timedelta(seconds=value)
    except OverflowError:
        raise ValueError(f"timeout of {value!r} seconds is too large for a datetime.timedelta") from None


def check_flag(name: str, value) -> bool | None:
    """``strict`` / ``validate``: ``True``, ``False`` or ``None``."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or None, got {type(value).__name__} {value!r}")
    return value


def validate_from_env() -> bool | None:
    """The ``validate`` default from ``USP_ATTN_VALIDATE``: unset = None, 1 = True, 0 = False."""
    text = os.environ.get(VALIDATE_ENV, "").strip().lower()
    if text in ("", "auto", "default"):
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {VALIDATE_ENV}={text!r}: expected 1 (every call), 0 (off) or unset")
