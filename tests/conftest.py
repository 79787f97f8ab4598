"""Fixtures for every test: each test starts and ends with usp_attn's global selection state
reset (forced/CLI backend, strict flag, group agreement, selection cache, logged-once set)."""

from __future__ import annotations

import pytest

from tests.helpers.state import reset_usp_attn_state


@pytest.fixture(autouse=True)
def _fresh_usp_attn_state():
    from usp_attn import platforms

    reset_usp_attn_state()
    yield
    reset_usp_attn_state()
    # A leaked platform override would silently change every later selection.
    assert platforms.current_platform() == platforms.detect_platform(), "a test leaked override_platform()"
