"""Arguments that used to be accepted or fail obscurely: ``timeout``, ``validate``/``strict``,
``softmax_scale`` = inf, meta tensors, tensors on a device the group's backend cannot move, the
``--sp-timeout`` flag; and the pieces of the cross-rank check that need no process group
(signatures, message formatting, failure lines). Each error names the argument and the value."""

from __future__ import annotations

import datetime
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import usp_attn
from usp_attn import arguments
from usp_attn.distributed import guard
from usp_attn.arguments import check_group_device

ROOT = Path(__file__).resolve().parents[2]


# ---- timeout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,seconds", [
    (None, 300.0), (5, 5.0), (0.25, 0.25), (datetime.timedelta(minutes=2), 120.0),
])
def test_timeout_accepts(value, seconds):
    assert arguments.check_timeout(value).total_seconds() == seconds


@pytest.mark.parametrize("value,words", [
    ("abc", ["number of seconds or a datetime.timedelta", "str 'abc'"]),
    (math.nan, ["positive finite", "nan"]),
    (math.inf, ["positive finite", "inf"]),
    (-5, ["positive finite", "-5"]),
    (0, ["positive finite", "got 0"]),
    (True, ["number of seconds", "bool True"]),
    (datetime.timedelta(0), ["must be positive", "timedelta(0)"]),
    (1e300, ["too large", "1e+300"]),
])
def test_timeout_rejects_before_any_process_group(value, words):
    assert not dist.is_initialized()
    with pytest.raises(ValueError) as info:
        usp_attn.init_sequence_parallel(timeout=value)
    assert str(info.value).startswith("timeout"), info.value
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not dist.is_initialized()  # rejected before anything was created


@pytest.mark.parametrize("name", ["validate", "strict"])
def test_flags_must_be_bool_or_none(name):
    with pytest.raises(ValueError, match=f"{name} must be True, False or None, got str 'yes'"):
        usp_attn.init_sequence_parallel(**{name: "yes"})
    assert not dist.is_initialized()


@pytest.mark.parametrize("text,mode", [("", None), ("1", True), ("true", True), ("0", False), ("off", False)])
def test_validate_environment_variable(monkeypatch, text, mode):
    monkeypatch.setenv(arguments.VALIDATE_ENV, text)
    assert arguments.validate_from_env() is mode


def test_validate_environment_variable_rejects_junk(monkeypatch):
    monkeypatch.setenv(arguments.VALIDATE_ENV, "sometimes")
    with pytest.raises(ValueError, match="USP_ATTN_VALIDATE='sometimes'"):
        usp_attn.init_sequence_parallel()
    assert not dist.is_initialized()


# ---- softmax_scale, devices ----------------------------------------------------------------------
@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("cls", [usp_attn.LocalAttention, usp_attn.USPAttention])
def test_softmax_scale_must_be_finite(cls, scale):
    with pytest.raises(ValueError, match=f"softmax_scale must be a finite float > 0 or None, got {scale}"):
        cls(4, 8, softmax_scale=scale)


def test_meta_tensors_are_rejected_by_name():
    x = torch.empty(1, 6, 4, 8, device="meta")
    with pytest.raises(ValueError, match="q, k, v are on device meta .meta tensors have no data"):
        usp_attn.LocalAttention(4, 8)(x, x, x)


def test_group_device_must_suit_the_backend():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        check_group_device(torch.zeros(1), None)  # CPU tensor, gloo: fine
        with pytest.raises(ValueError, match="q is on meta, but the sequence-parallel group uses gloo"):
            check_group_device(torch.zeros(1, device="meta"), None)
    finally:
        dist.destroy_process_group()


# ---- --sp-timeout ------------------------------------------------------------------------------------
def _generate_parser():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import generate
    finally:
        sys.path.remove(str(ROOT / "launch"))
    return generate.build_parser()


def test_sp_timeout_flag():
    parser = _generate_parser()
    assert parser.parse_args([]).sp_timeout == arguments.DEFAULT_TIMEOUT.total_seconds()
    assert parser.parse_args(["--sp-timeout", "45"]).sp_timeout == 45.0
    assert "--sp-timeout SECONDS" in parser.format_help()


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "ten"])
def test_sp_timeout_flag_rejects(text, capsys):
    with pytest.raises(SystemExit) as info:
        _generate_parser().parse_args(["--sp-timeout", text])
    assert info.value.code == 2
    assert f"expected a positive finite number of seconds, got '{text}'" in capsys.readouterr().err


# ---- pieces of the cross-rank check --------------------------------------------------------------
def test_signature_is_host_only_and_exact():
    q = torch.zeros(1, 5, 4, 8)
    base = guard.CallSignature.of(q, q, q, None, 1, 0, 10)
    assert base == guard.CallSignature.of(torch.ones(1, 5, 4, 8), q, q, None, 1, 0, 10)  # values don't matter
    assert base != guard.CallSignature.of(q, q, q, None, True, 0, 10)  # True is not an agreed 1
    assert base != guard.CallSignature.of(q.double(), q, q, None, 1, 0, 10)
    assert base != guard.CallSignature.of(q, q, q, torch.ones(1, 5, dtype=torch.bool), 1, 0, 10)
    assert base != guard.CallSignature.of(q, q, q, None, 1, 0, None)
    assert base != guard.CallSignature.of(q.requires_grad_(), q, q, None, 1, 0, 10)  # training vs inference
    with torch.no_grad():
        assert base == guard.CallSignature.of(q, q, q, None, 1, 0, 10)


def test_disagreement_lists_errors_then_values_grouped_by_rank():
    summaries = [{"seq_len": 48, "dtype": "f32"}, {"seq_len": 49, "dtype": "f32"},
                 {"seq_len": 48, "dtype": "f32"}, {"seq_len": 49, "dtype": "f32"}]
    lines = guard.describe_disagreement(summaries, [None, "q has shape [1]", None, None])
    assert lines == ["  rank 1: q has shape [1]", "  seq_len: ranks 0, 2: 48; ranks 1, 3: 49"]
    assert guard.describe_disagreement(summaries[:1] * 3, [None] * 3) == []


def test_failure_lines_drop_the_source_location():
    exc = RuntimeError("[/x/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6554. More")
    assert guard._first_line(exc) == "RuntimeError: Connection closed by peer [127.0.0.1]:6554. More"
    assert guard.is_collective_failure(exc)
    assert not guard.is_collective_failure(RuntimeError("CUDA out of memory"))
