"""The front door stays small, and every name that moved one level down works from its new place."""

from __future__ import annotations

import importlib

import pytest

import usp_attn

FRONT_DOOR = {
    "AttentionBackendEnum", "AttentionBackendUnavailableError", "AttentionConfig", "CollectiveError",
    "LocalAttention", "ReplicatedRows", "RingAttention", "SequenceParallelState", "UlyssesAttention", "USPAttention",
    "add_attention_args", "destroy_sequence_parallel", "gather_sequence", "get_sequence_parallel_state",
    "global_force_attn_backend", "global_force_attn_backend_context_manager", "init_sequence_parallel",
    "shard_sequence", "SlidingTileSparsity", "TopMassSparsity", "VideoGrid", "sparsity_error",
}

MOVED = {
    "usp_attn.backends": ["parse_attention_backend"],
    "usp_attn.distributed.agreement": ["agree_on_backend"],
    "usp_attn.measured_choice": ["set_kernel_choice"],
    "usp_attn.platforms": ["Platform", "PlatformKind", "current_platform", "detect_platform", "override_platform"],
    "usp_attn.selector": ["BackendSelection", "GroupAgreement", "get_attn_backend", "set_cli_attention_backend",
                          "global_force_attn_backend", "global_force_attn_backend_context_manager"],
    "usp_attn.settings": ["SETTINGS", "Settings", "reset"],
    "usp_attn.ring": [], "usp_attn.ulysses": [],
}


def test_front_door_is_exactly_the_documented_names():
    assert set(usp_attn.__all__) >= FRONT_DOOR
    assert all(hasattr(usp_attn, name) for name in usp_attn.__all__)


@pytest.mark.parametrize("module", sorted(MOVED))
def test_moved_names_work_from_their_new_place(module):
    mod = importlib.import_module(module)
    for name in MOVED[module]:
        assert hasattr(mod, name), f"{module}.{name}"


def test_settings_snapshot_and_restore_round_trip():
    from usp_attn import settings, selector

    snap = settings.SETTINGS.snapshot()
    try:
        usp_attn.global_force_attn_backend("torch_sdpa")
        selector.set_strict_backend(True)
        assert settings.SETTINGS.forced is usp_attn.AttentionBackendEnum.TORCH_SDPA and settings.SETTINGS.strict
        version = settings.SETTINGS.version
    finally:
        settings.SETTINGS.restore(snap)
    assert settings.SETTINGS.forced is None and settings.SETTINGS.strict is False
    assert settings.SETTINGS.version > version  # caches keyed on the version re-select


def test_replicated_rows_description_or_keywords_not_both():
    rows = usp_attn.ReplicatedRows(prefix=2)
    assert usp_attn.ReplicatedRows.of(None, 2) == rows
    assert usp_attn.ReplicatedRows.of(rows) is rows
    with pytest.raises(ValueError, match="not both"):
        usp_attn.ReplicatedRows.of(rows, 2)
    with pytest.raises(TypeError, match="replicated must be"):
        usp_attn.ReplicatedRows.of((2, 0))
