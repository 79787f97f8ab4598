"""The agreement's decision rule (``decide``, pure) and ``agree_on_backend`` in a single process
(torch.distributed not initialised). Multi-rank behaviour: tests/distributed/test_agreement.py."""

from __future__ import annotations

import logging

import pytest
import torch

from usp_attn import AttentionBackendEnum as B
from usp_attn import AttentionBackendUnavailableError, global_force_attn_backend
from usp_attn.distributed.agreement import agree_on_backend
from usp_attn.platforms import Platform
from usp_attn.selector import get_attn_backend, set_cli_attention_backend
from usp_attn.distributed.agreement import _decide_or_error, decide, local_report
from usp_attn.selector import get_group_agreement

BF16 = torch.bfloat16
HOPPER_ALL = Platform.make("cuda", capability=(9, 0), packages={"flash_attn_interface": "", "sageattention": "2.1"})
HOPPER_FA3 = Platform.make("cuda", capability=(9, 0), packages=["flash_attn_interface"])
AMPERE_BARE = Platform.make("cuda", capability=(8, 0))


def reports(requests, platforms):
    return [local_report(r, req, p) for r, (req, p) in enumerate(zip(requests, platforms))]


def test_local_report_parses_requests_and_reads_settings():
    assert local_report(0, " FA3 ", HOPPER_FA3).requested is B.FA
    assert local_report(0, None, HOPPER_FA3).source == "auto"
    with pytest.raises(ValueError, match="unknown attention backend"):
        local_report(0, "flash", HOPPER_FA3)
    set_cli_attention_backend("sage_attn")
    rep = local_report(3, platform=HOPPER_FA3)
    assert (rep.rank, rep.requested, rep.source) == (3, B.SAGE_ATTN, "cli")
    global_force_attn_backend("torch_sdpa")
    assert local_report(0, platform=HOPPER_FA3).source == "forced"
    assert "sageattention" in rep.reason(B.SAGE_ATTN) and rep.reason(B.FA) is None


def test_rank_0_request_wins_and_others_are_ignored():
    agreement = decide(reports([B.TORCH_SDPA, B.FA, B.SAGE_ATTN], [HOPPER_ALL] * 3))
    assert agreement.backend is B.TORCH_SDPA and agreement.requested is B.TORCH_SDPA
    assert agreement.platforms == (HOPPER_ALL,) * 3 and agreement.world_size == 3


def test_unavailable_on_one_rank_falls_back_for_all():
    agreement = decide(reports([B.SAGE_ATTN] * 4, [HOPPER_ALL, HOPPER_ALL, HOPPER_FA3, HOPPER_ALL]))
    assert agreement.backend is B.FA
    assert agreement.reason_unavailable(B.SAGE_ATTN).startswith("unavailable on rank 2: ")
    assert agreement.reason_unavailable(B.FA) is None


def test_first_failing_rank_is_named():
    agreement = decide(reports([B.FA] * 4, [HOPPER_FA3, HOPPER_FA3, AMPERE_BARE, AMPERE_BARE]))
    assert agreement.backend is B.TORCH_SDPA
    assert [(b, r) for b, r, _ in agreement.unavailable if b is B.FA] == [(B.FA, 2)]


def test_strict_names_the_rank_and_the_reason():
    with pytest.raises(AttentionBackendUnavailableError) as info:
        decide(reports([B.SAGE_ATTN] * 3, [HOPPER_ALL, HOPPER_ALL, HOPPER_FA3]), strict=True)
    assert "sage_attn" in str(info.value) and "rank 2" in str(info.value) and "sageattention" in str(info.value)
    kind, message = _decide_or_error(reports([B.SAGE_ATTN] * 2, [HOPPER_ALL, HOPPER_FA3]), True)
    assert kind == "AttentionBackendUnavailableError" and "rank 1" in message


def test_auto_uses_rank_0_platform_and_common_availability():
    assert decide(reports([None] * 2, [HOPPER_FA3, HOPPER_ALL])).backend is B.FA
    assert decide(reports([None] * 2, [AMPERE_BARE, HOPPER_FA3])).backend is B.TORCH_SDPA
    assert decide(reports([None] * 2, [HOPPER_FA3, AMPERE_BARE])).backend is B.TORCH_SDPA
    cpu = Platform.make("cpu")
    assert decide(reports([B.FA], [cpu])).backend is B.TORCH_SDPA


def test_a_failed_report_becomes_an_error_for_everyone():
    good = local_report(0, "fa", HOPPER_FA3)
    kind, message = _decide_or_error([good, "rank 1: ValueError: unknown attention backend 'x'"], False)
    assert kind == "ValueError" and "rank 1" in message


def test_single_process_agreement_installs_and_drives_selection(caplog):
    caplog.set_level(logging.INFO, logger="usp_attn")
    agreement = agree_on_backend(requested="sage_attn", platform=HOPPER_FA3)
    assert agreement.world_size == 1 and agreement.backend is B.FA
    assert get_group_agreement() == agreement
    assert any("unavailable on rank 0" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    sel = get_attn_backend(128, BF16)
    assert sel.backend is B.FA and sel.source == "group" and sel.platform == HOPPER_FA3
    assert sel.impl.platform == HOPPER_FA3


def test_single_process_strict_and_bad_name():
    with pytest.raises(AttentionBackendUnavailableError, match="rank 0"):
        agree_on_backend(requested="sage_attn", platform=HOPPER_FA3, strict=True)
    assert get_group_agreement() is None
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        agree_on_backend(requested="flash", platform=HOPPER_FA3)
    assert agree_on_backend(install=False, platform=HOPPER_FA3).backend is B.FA
    assert get_group_agreement() is None
