"""Selection priority (forced > CLI > auto) and the force context manager."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import fake_kernels
from usp_attn import AttentionBackendEnum as B
from usp_attn import AttentionConfig, LocalAttention, global_force_attn_backend, global_force_attn_backend_context_manager, selector
from usp_attn.platforms import Platform, override_platform
from usp_attn.selector import get_attn_backend, set_cli_attention_backend

# A machine where fa, torch_sdpa and sage_attn can all run, and auto prefers fa (FA3 on Hopper).
HOPPER = Platform.make("cuda", capability=(9, 0), packages=["flash_attn_interface", "sageattention"])
BF16 = torch.bfloat16


def pick(platform=HOPPER, head_size=128, dtype=BF16):
    return get_attn_backend(head_size, dtype, platform=platform)


def test_auto_when_nothing_requested():
    sel = pick()
    assert (sel.backend, sel.requested, sel.source, sel.fell_back) == (B.FA, None, "auto", False)


def test_cli_beats_auto():
    set_cli_attention_backend("sage_attn")
    sel = pick()
    assert (sel.backend, sel.requested, sel.source) == (B.SAGE_ATTN, B.SAGE_ATTN, "cli")


def test_cli_through_config_apply():
    AttentionConfig(attention_backend="TORCH_SDPA").apply()
    assert pick().backend is B.TORCH_SDPA
    assert pick().source == "cli"


def test_forced_beats_cli():
    set_cli_attention_backend("sage_attn")
    global_force_attn_backend("torch_sdpa")
    sel = pick()
    assert (sel.backend, sel.requested, sel.source) == (B.TORCH_SDPA, B.TORCH_SDPA, "forced")
    global_force_attn_backend(None)  # clearing the force re-exposes the CLI choice
    assert pick().backend is B.SAGE_ATTN


def test_force_accepts_names_and_aliases():
    global_force_attn_backend(" FA3 ")
    assert selector.get_global_forced_attn_backend() is B.FA
    with pytest.raises(ValueError, match="unknown attention backend"):
        global_force_attn_backend("flash")
    assert selector.get_global_forced_attn_backend() is B.FA  # a bad name changes nothing


def test_context_manager_restores_previous_value():
    assert selector.get_global_forced_attn_backend() is None
    with global_force_attn_backend_context_manager("sage_attn") as forced:
        assert forced is B.SAGE_ATTN
        assert pick().backend is B.SAGE_ATTN
        with global_force_attn_backend_context_manager(B.TORCH_SDPA):
            assert pick().backend is B.TORCH_SDPA
        assert selector.get_global_forced_attn_backend() is B.SAGE_ATTN
        assert pick().backend is B.SAGE_ATTN
    assert selector.get_global_forced_attn_backend() is None
    assert pick().backend is B.FA


def test_context_manager_restores_on_exception():
    global_force_attn_backend("fa")
    with pytest.raises(RuntimeError, match="boom"):
        with global_force_attn_backend_context_manager("torch_sdpa"):
            raise RuntimeError("boom")
    assert selector.get_global_forced_attn_backend() is B.FA


def test_context_manager_none_means_auto_inside():
    set_cli_attention_backend("sage_attn")
    global_force_attn_backend("torch_sdpa")
    with global_force_attn_backend_context_manager(None):
        assert pick().backend is B.SAGE_ATTN  # no force: the CLI value applies
    assert pick().backend is B.TORCH_SDPA


def test_context_manager_takes_effect_after_an_earlier_lookup():
    # The reference implementation cached on (head size, dtype) only, so a lookup made before
    # entering the context manager pinned the old choice. Same key, before / inside / after:
    assert pick(head_size=128, dtype=BF16).backend is B.FA
    with global_force_attn_backend_context_manager("torch_sdpa"):
        assert pick(head_size=128, dtype=BF16).backend is B.TORCH_SDPA
    assert pick(head_size=128, dtype=BF16).backend is B.FA


def test_layer_follows_context_manager_after_earlier_forward(monkeypatch):
    """End to end on CPU: the layer has already run on fa (a FlashAttention 2 stand-in
    installed for the test) for this dtype; inside the context manager it runs torch_sdpa."""
    fa2 = fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn2())
    sm80 = Platform.make("cuda", capability=(8, 0), packages=["flash_attn"])
    layer = LocalAttention(num_heads=2, head_size=16)
    q, k, v = (torch.randn(1, 8, 2, 16, dtype=BF16) for _ in range(3))
    with override_platform(sm80):
        out_fa = layer(q, k, v)
        assert layer.backend is B.FA and len(fa2.calls) == 1
        with global_force_attn_backend_context_manager("torch_sdpa"):
            out_sdpa = layer(q, k, v)
            assert layer.backend is B.TORCH_SDPA
            assert len(fa2.calls) == 1  # the stand-in was not called again
        layer(q, k, v)
        assert layer.backend is B.FA and len(fa2.calls) == 2
    # Both paths compute the same attention (bf16 output rounding apart).
    torch.testing.assert_close(out_fa, out_sdpa, atol=2e-2, rtol=2e-2)


def test_layer_uses_the_real_tensor_dtype(monkeypatch):
    """The reference took the dtype from a global policy; the layer must use the tensors'."""
    fa2 = fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn2())
    sm80 = Platform.make("cuda", capability=(8, 0), packages=["flash_attn"])
    assert torch.get_default_dtype() == torch.float32
    layer = LocalAttention(num_heads=2, head_size=16)
    with override_platform(sm80):
        assert layer.backend is B.TORCH_SDPA  # before any call: the default dtype (fp32) pick
        layer(*(torch.randn(1, 4, 2, 16, dtype=BF16) for _ in range(3)))
        assert layer.backend is B.FA and len(fa2.calls) == 1  # bf16 tensors -> fa
        layer(*(torch.randn(1, 4, 2, 16, dtype=torch.float32) for _ in range(3)))
        assert layer.backend is B.TORCH_SDPA and len(fa2.calls) == 1  # fa has no fp32
        assert layer.selection(torch.float16).backend is B.FA
