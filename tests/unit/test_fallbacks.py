"""Explicit requests that cannot run: every reason is recorded in ``BackendSelection.rejected``
and in one WARNING (logger "usp_attn"); strict mode raises instead; the fallback chains."""

from __future__ import annotations

import logging

import pytest
import torch

from usp_attn import AttentionBackendEnum as B
from usp_attn import AttentionBackendUnavailableError, AttentionConfig, global_force_attn_backend
from usp_attn.platforms import Platform
from usp_attn.selector import get_attn_backend, set_cli_attention_backend
from usp_attn.selector import FALLBACK_CHAIN, set_strict_backend

BF16, FP32 = torch.bfloat16, torch.float32


def cuda(cap, *packages):
    return Platform.make("cuda", capability=cap, packages=list(packages))


HOPPER_FA3 = cuda((9, 0), "flash_attn_interface")
HOPPER_ALL = cuda((9, 0), "flash_attn_interface", "sageattention")
# SageAttention 1.x cannot return the LSE (2.x can).
HOPPER_SAGE1 = Platform.make("cuda", capability=(9, 0), packages={"sageattention": "1.0.6", "flash_attn_interface": ""})

# (request, platform, head_size, dtype, need_lse, need_mask, supported, expected backend, words in the reason)
REASONS = {
    "missing package": (B.SAGE_ATTN, HOPPER_FA3, 128, BF16, False, False, None, B.FA, ["'sageattention' package"]),
    "missing fa runtime": (B.FA, cuda((8, 0)), 128, BF16, False, False, None, B.TORCH_SDPA, ["flash_attn", "not installed"]),
    "capability fa": (B.FA, cuda((7, 5), "flash_attn"), 128, BF16, False, False, None,
                      B.TORCH_SDPA, ["compute capability >= 8.0", "7.5"]),
    "capability sage": (B.SAGE_ATTN, cuda((7, 5), "sageattention"), 128, BF16, False, False, None, B.TORCH_SDPA,
                        ["sage_attn needs compute capability >= 8.0"]),
    "capability sage3": (B.SAGE_ATTN_3, cuda((9, 0), "sageattn3"), 128, BF16, False, False, None, B.TORCH_SDPA,
                         ["Blackwell"]),
    "device kind": (B.AITER, HOPPER_FA3, 128, BF16, False, False, None, B.FA, ["aiter needs ROCM", "CUDA"]),
    "dtype": (B.FA, HOPPER_FA3, 128, FP32, False, False, None, B.TORCH_SDPA, ["dtype float32", "bfloat16, float16"]),
    "head size": (B.FA, HOPPER_FA3, 512, BF16, False, False, None, B.TORCH_SDPA, ["head sizes 8..256", "512"]),
    "head size sage": (B.SAGE_ATTN, HOPPER_ALL, 80, BF16, False, False, None, B.FA, ["64, 96, 128", "not 80"]),
    "lse needed": (B.SAGE_ATTN, HOPPER_SAGE1, 128, BF16, True, False, None, B.FA, ["log-sum-exp"]),
    "mask needed": (B.FA, HOPPER_FA3, 128, BF16, False, True, None, B.TORCH_SDPA, ["does not support attention masks"]),
    "supported set": (B.FA, HOPPER_FA3, 128, BF16, False, False, ("torch_sdpa",), B.TORCH_SDPA,
                      ["not in this layer's supported_attention_backends"]),
}


def select(request, platform, head_size, dtype, need_lse, need_mask, supported, strict=None):
    global_force_attn_backend(request)
    return get_attn_backend(head_size, dtype, supported, platform=platform, need_lse=need_lse,
                            need_mask=need_mask, strict=strict)


def warnings_of(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "usp_attn"]


@pytest.mark.parametrize("case", REASONS.values(), ids=REASONS.keys())
def test_each_reason_is_recorded_and_warned_once(case, caplog, capsys):
    request, platform, head_size, dtype, need_lse, need_mask, supported, expected, words = case
    caplog.set_level(logging.DEBUG, logger="usp_attn")
    sel = select(request, platform, head_size, dtype, need_lse, need_mask, supported)
    assert sel.backend is expected and sel.fell_back and sel.requested is request
    rejected_backend, reason = sel.rejected[0]
    assert rejected_backend is request
    for word in words:
        assert word in reason, f"{word!r} not in {reason!r}"
    assert sel.to_dict()["rejected"][0] == {"backend": str(request), "reason": reason}

    (warning,) = warnings_of(caplog)
    text = warning.getMessage()
    assert f"'{request}'" in text and f"'{expected}'" in text and reason in text

    # Asked again (another layer with the same properties): no second warning.
    caplog.clear()
    assert select(request, platform, head_size, dtype, need_lse, need_mask, supported) == sel
    assert warnings_of(caplog) == []
    assert capsys.readouterr().out == ""  # nothing printed, only logged


@pytest.mark.parametrize("case", REASONS.values(), ids=REASONS.keys())
def test_strict_raises_with_the_reason(case):
    request, platform, head_size, dtype, need_lse, need_mask, supported, expected, words = case
    with pytest.raises(AttentionBackendUnavailableError) as info:
        select(request, platform, head_size, dtype, need_lse, need_mask, supported, strict=True)
    message = str(info.value)
    assert f"attention backend '{request}' cannot run" in message
    for word in words:
        assert word in message


def test_strict_default_from_settings_and_config():
    set_strict_backend(True)
    with pytest.raises(AttentionBackendUnavailableError, match="sageattention"):
        select(B.SAGE_ATTN, HOPPER_FA3, 128, BF16, False, False, None)
    assert select(B.SAGE_ATTN, HOPPER_FA3, 128, BF16, False, False, None, strict=False).backend is B.FA
    AttentionConfig(strict=False).apply()
    assert select(B.SAGE_ATTN, HOPPER_FA3, 128, BF16, False, False, None).backend is B.FA
    AttentionConfig(attention_backend="sage_attn", strict=True).apply()
    global_force_attn_backend(None)
    with pytest.raises(AttentionBackendUnavailableError, match="sage_attn"):
        get_attn_backend(128, BF16, platform=HOPPER_FA3)


def test_strict_allows_a_request_that_runs():
    sel = select(B.FA, HOPPER_FA3, 128, BF16, True, False, None, strict=True)
    assert sel.backend is B.FA and not sel.fell_back and sel.rejected == ()


def test_mps_explicit_fa_warns_once_and_runs_torch_sdpa(caplog):
    caplog.set_level(logging.WARNING, logger="usp_attn")
    set_cli_attention_backend("fa")
    mps = Platform.make("mps")
    for head_size in (64, 128, 64):
        sel = get_attn_backend(head_size, torch.float16, platform=mps)
        assert sel.backend is B.TORCH_SDPA and sel.fell_back and sel.source == "cli"
        assert "MPS" in sel.rejected[0][1]
    (warning,) = warnings_of(caplog)
    assert "'fa'" in warning.getMessage() and "MPS" in warning.getMessage()


def test_auto_selection_never_warns(caplog):
    caplog.set_level(logging.DEBUG, logger="usp_attn")
    for p in (HOPPER_FA3, cuda((8, 0)), Platform.make("rocm"), Platform.make("mps"), Platform.make("cpu")):
        for dtype in (BF16, FP32):
            assert not get_attn_backend(128, dtype, platform=p).fell_back
    assert warnings_of(caplog) == []


def test_no_backend_fits_raises_even_without_strict():
    with pytest.raises(AttentionBackendUnavailableError) as info:
        get_attn_backend(64, FP32, ["fa"], platform=Platform.make("cpu"))
    assert "supported_attention_backends" in str(info.value)


# ---- fallback chains ---------------------------------------------------------------------------
def test_chain_table():
    assert FALLBACK_CHAIN[B.SAGE_ATTN_3] == (B.SAGE_ATTN, B.FA, B.TORCH_SDPA)
    assert FALLBACK_CHAIN[B.SAGE_ATTN] == (B.FA, B.TORCH_SDPA)
    assert FALLBACK_CHAIN[B.AITER] == (B.FA, B.TORCH_SDPA)
    assert FALLBACK_CHAIN[B.FA] == (B.TORCH_SDPA,)
    assert FALLBACK_CHAIN[B.TORCH_SDPA] == ()
    for chain in FALLBACK_CHAIN.values():
        assert not chain or chain[-1] is B.TORCH_SDPA  # every chain ends where everything runs


@pytest.mark.parametrize(
    "request_,platform,expected_path",
    [
        (B.SAGE_ATTN_3, cuda((10, 0), "sageattn3"), [B.SAGE_ATTN_3]),
        (B.SAGE_ATTN_3, cuda((9, 0), "sageattention", "flash_attn_interface"), [B.SAGE_ATTN_3, B.SAGE_ATTN]),
        (B.SAGE_ATTN_3, cuda((9, 0), "flash_attn_interface"), [B.SAGE_ATTN_3, B.SAGE_ATTN, B.FA]),
        (B.SAGE_ATTN_3, Platform.make("cpu"), [B.SAGE_ATTN_3, B.SAGE_ATTN, B.FA, B.TORCH_SDPA]),
        (B.SAGE_ATTN, cuda((8, 0), "sageattention"), [B.SAGE_ATTN]),
        (B.SAGE_ATTN, cuda((8, 0), "flash_attn"), [B.SAGE_ATTN, B.FA]),
        (B.SAGE_ATTN, cuda((8, 0)), [B.SAGE_ATTN, B.FA, B.TORCH_SDPA]),
        (B.AITER, Platform.make("rocm", packages=["aiter"]), [B.AITER]),
        (B.AITER, Platform.make("rocm", packages=["flash_attn"]), [B.AITER, B.FA]),
        (B.AITER, Platform.make("rocm"), [B.AITER, B.FA, B.TORCH_SDPA]),
        (B.AITER, cuda((9, 0), "flash_attn_interface"), [B.AITER, B.FA]),
    ],
)
def test_chains(request_, platform, expected_path, caplog):
    caplog.set_level(logging.WARNING, logger="usp_attn")
    sel = select(request_, platform, 128, BF16, False, False, None)
    *passed_over, chosen = expected_path
    assert sel.backend is chosen
    assert [b for b, _ in sel.rejected] == passed_over
    assert sel.fell_back == bool(passed_over)
    if passed_over:
        (warning,) = warnings_of(caplog)
        for _, reason in sel.rejected:  # every step of the chain is explained
            assert reason in warning.getMessage()
    else:
        assert warnings_of(caplog) == []


def test_supported_set_outside_the_automatic_order_is_still_used():
    """supported={sage_attn} under auto on a machine with sageattention picks sage, not an error."""
    from usp_attn import AttentionBackendEnum as B
    from usp_attn.platforms import Platform, override_platform
    from usp_attn.selector import get_attn_backend

    hopper_with_sage = Platform.make("cuda", capability=(9, 0), packages={"sageattention": "2.2.0"})
    with override_platform(hopper_with_sage):
        sel = get_attn_backend(128, torch.bfloat16, ["sage_attn"])
    assert sel.backend == B.SAGE_ATTN
    assert [b for b, _ in sel.rejected] == [B.TORCH_SDPA]  # the usual pick, rejected by the layer's set
