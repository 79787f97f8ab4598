"""add_attention_args (argparse) and AttentionConfig."""

from __future__ import annotations

import argparse

import pytest

from usp_attn import AttentionBackendEnum as B
from usp_attn import AttentionConfig, add_attention_args, selector
from usp_attn.settings import SETTINGS


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prog")
    assert add_attention_args(parser) is parser
    return parser


def test_defaults():
    args = make_parser().parse_args([])
    assert args.attention_backend is None
    assert args.ulysses_degree == 1 and args.ring_degree == 1
    assert args.attention_strict is False


@pytest.mark.parametrize(
    "text,expected",
    [("fa", B.FA), ("FA3", B.FA), ("fa4", B.FA), (" torch_sdpa ", B.TORCH_SDPA), ("Sage_Attn", B.SAGE_ATTN),
     ("sage_attn_3", B.SAGE_ATTN_3), ("aiter", B.AITER), ("auto", None), ("", None)],
)
def test_backend_is_parsed_and_normalised_at_parse_time(text, expected):
    args = make_parser().parse_args(["--attention-backend", text])
    assert args.attention_backend is expected


def test_bad_backend_name_fails_at_parse_time(capsys):
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args(["--attention-backend", "flash3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--attention-backend" in err
    assert "flash3" in err
    assert "torch_sdpa" in err and "sage_attn" in err  # the valid names are listed


@pytest.mark.parametrize("flag", ["--ulysses-degree", "--ring-degree"])
@pytest.mark.parametrize("value", ["0", "-2", "1.5", "two", ""])
def test_degrees_must_be_positive_ints(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args([flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "positive integer" in err


def test_degrees_parse():
    args = make_parser().parse_args(["--ulysses-degree", "4", "--ring-degree", "2", "--attention-strict"])
    assert (args.ulysses_degree, args.ring_degree, args.attention_strict) == (4, 2, True)


# ---- AttentionConfig ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value,expected",
    [("FA3 ", B.FA), ("fa4", B.FA), ("TORCH_SDPA", B.TORCH_SDPA), ("auto", None), ("", None), (None, None),
     (B.SAGE_ATTN, B.SAGE_ATTN)],
)
def test_post_init_normalises(value, expected):
    assert AttentionConfig(attention_backend=value).attention_backend is expected


def test_post_init_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*torch_sdpa"):
        AttentionConfig(attention_backend="flash")
    with pytest.raises(TypeError):
        AttentionConfig(attention_backend=3)


@pytest.mark.parametrize("field", ["ulysses_degree", "ring_degree"])
@pytest.mark.parametrize("value", [0, -1, 1.0, "2", True, None])
def test_post_init_rejects_bad_degrees(field, value):
    with pytest.raises(ValueError) as info:
        AttentionConfig(**{field: value})
    assert field in str(info.value) and "positive int" in str(info.value) and repr(value) in str(info.value)


def test_from_args_and_degree():
    args = make_parser().parse_args(["--attention-backend", "fa3", "--ulysses-degree", "2", "--ring-degree", "3"])
    cfg = AttentionConfig.from_args(args)
    assert cfg == AttentionConfig(attention_backend=B.FA, ulysses_degree=2, ring_degree=3, strict=False)
    assert cfg.sequence_parallel_degree == 6


def test_apply_sets_cli_request_and_strictness():
    cfg = AttentionConfig(attention_backend="fa4", strict=True)
    assert cfg.apply() is cfg
    assert selector.get_cli_attention_backend() is B.FA
    assert SETTINGS.strict is True
    AttentionConfig().apply()
    assert selector.get_cli_attention_backend() is None
    assert SETTINGS.strict is False


def test_kernel_choice_flags_reach_the_measured_choice(tmp_path):
    from usp_attn import measured_choice

    parser = add_attention_args(argparse.ArgumentParser())
    args = parser.parse_args(["--kernel-choice", "static", "--kernel-cache", str(tmp_path / "k.json")])
    config = AttentionConfig.from_args(args)
    assert (config.kernel_choice, config.kernel_cache) == ("static", str(tmp_path / "k.json"))
    try:
        config.apply()
        assert measured_choice.kernel_choice_settings() == ("static", str(tmp_path / "k.json"))
    finally:
        measured_choice.set_kernel_choice()
    assert measured_choice.kernel_choice_settings()[0] == "measure"  # the default
    with pytest.raises(ValueError, match="kernel_choice"):
        AttentionConfig(kernel_choice="fastest")


def test_kernel_choice_from_the_environment(monkeypatch):
    from usp_attn import measured_choice

    monkeypatch.setenv("USP_ATTN_KERNEL_CHOICE", "static")
    monkeypatch.setenv("USP_ATTN_KERNEL_CACHE", "/tmp/x.json")
    assert measured_choice.kernel_choice_settings() == ("static", "/tmp/x.json")
    monkeypatch.setenv("USP_ATTN_KERNEL_CHOICE", "bogus")
    assert measured_choice.kernel_choice_settings()[0] == "static"  # unknown: the safe, static rule
