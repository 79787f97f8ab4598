"""``log_once``: one log line per distinct message per process (a fallback repeats for every layer)."""

from __future__ import annotations

import logging

from usp_attn.settings import SETTINGS

__all__ = ["log_once", "logger"]

logger = logging.getLogger("usp_attn")


def log_once(level: int, message: str) -> None:
    """Log ``message`` at most once per process (until :func:`usp_attn.settings.reset`)."""
    if message not in SETTINGS.logged:
        SETTINGS.logged.add(message)
        logger.log(level, message)
