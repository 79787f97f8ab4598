"""parse_attention_backend and the enum's CLI names."""

from __future__ import annotations

import pytest

import usp_attn
from usp_attn import AttentionBackendEnum as B
from usp_attn.backends import parse_attention_backend

CLI_NAMES = {
    B.FA: "fa",
    B.TORCH_SDPA: "torch_sdpa",
    B.SAGE_ATTN: "sage_attn",
    B.SAGE_ATTN_3: "sage_attn_3",
    B.AITER: "aiter",
}


def test_members_and_str_are_the_cli_names():
    assert {m.name for m in B} == {"FA", "TORCH_SDPA", "SAGE_ATTN", "SAGE_ATTN_3", "AITER"}
    for member, name in CLI_NAMES.items():
        assert str(member) == name
        assert f"{member}" == name


@pytest.mark.parametrize("member,name", CLI_NAMES.items())
def test_every_cli_name_round_trips(member, name):
    assert parse_attention_backend(name) is member
    assert parse_attention_backend(str(member)) is member


@pytest.mark.parametrize(
    "text,expected",
    [
        ("FA", B.FA),
        ("Torch_SDPA", B.TORCH_SDPA),
        ("  sage_attn  ", B.SAGE_ATTN),
        ("\tSAGE_ATTN_3\n", B.SAGE_ATTN_3),
        ("AiTeR", B.AITER),
        ("fa3", B.FA),
        ("fa4", B.FA),
        (" FA3 ", B.FA),
        ("Fa4", B.FA),
    ],
)
def test_case_spaces_and_aliases(text, expected):
    assert parse_attention_backend(text) is expected


@pytest.mark.parametrize("auto", [None, "", "   ", "auto", "AUTO", " Auto "])
def test_auto_spellings_mean_none(auto):
    assert parse_attention_backend(auto) is None


def test_enum_member_passes_through():
    for member in B:
        assert parse_attention_backend(member) is member


@pytest.mark.parametrize("bad", ["flash", "fa2", "sdpa", "sage", "torch-sdpa", "fa 3", "none"])
def test_unknown_name_lists_valid_names(bad):
    with pytest.raises(ValueError) as info:
        parse_attention_backend(bad)
    message = str(info.value)
    assert repr(bad) in message
    for name in ["fa", "torch_sdpa", "sage_attn", "sage_attn_3", "aiter", "fa3", "fa4", "auto"]:
        assert name in message, f"{name!r} missing from {message!r}"


@pytest.mark.parametrize("bad", [3, 1.0, b"fa", ["fa"], object()])
def test_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        parse_attention_backend(bad)


def test_public_api_names():
    for name in [
        "AttentionBackendEnum", "add_attention_args", "AttentionConfig",
        "global_force_attn_backend", "global_force_attn_backend_context_manager", "LocalAttention",
    ]:
        assert hasattr(usp_attn, name), name
    # Selection plumbing lives one level down (tests/unit/test_public_api.py checks every moved name).
    from usp_attn import backends, selector
    from usp_attn.distributed import agreement

    for module, name in [(backends, "parse_attention_backend"), (selector, "get_attn_backend"),
                         (agreement, "agree_on_backend")]:
        assert hasattr(module, name), name
