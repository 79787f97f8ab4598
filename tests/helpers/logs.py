"""Capture ``usp_attn`` log records where pytest's ``caplog`` is not available (spawned ranks)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ["capture_logs", "messages_at"]


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def capture_logs(name: str = "usp_attn", level: int = logging.DEBUG) -> Iterator[list[logging.LogRecord]]:
    """Collect the records logged to logger ``name`` (at ``level`` or above) inside the block."""
    logger = logging.getLogger(name)
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def messages_at(records: list[logging.LogRecord], level: int) -> list[str]:
    """The formatted messages of ``records`` logged exactly at ``level``."""
    return [r.getMessage() for r in records if r.levelno == level]
