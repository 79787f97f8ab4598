"""Reset usp_attn's process settings and caches so tests cannot leak into each other."""

from __future__ import annotations

__all__ = ["reset_usp_attn_state"]


def reset_usp_attn_state() -> None:
    from usp_attn import settings

    settings.reset()
