"""Automatic selection per platform, with platforms injected through Platform.make so the
CUDA / ROCm / MPS rules are exercised on a CPU-only machine."""

from __future__ import annotations

import logging

import pytest
import torch

from usp_attn import AttentionBackendEnum as B
from usp_attn import global_force_attn_backend
from usp_attn.platforms import Platform, PlatformKind, current_platform, detect_platform, override_platform
from usp_attn.selector import get_attn_backend, set_cli_attention_backend
from usp_attn.backends.flash import flash_generation
from usp_attn.selector import fa_min_keys_hopper

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def cuda(cap, *packages):
    return Platform.make("cuda", capability=cap, packages=list(packages))


def auto(platform, dtype=BF16, head_size=128, **kw):
    return get_attn_backend(head_size, dtype, platform=platform, **kw)


# ---- CUDA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 9)])
def test_cuda_sm8x_with_flash_attn_uses_fa_for_half(cap):
    p = cuda(cap, "flash_attn")
    assert flash_generation(p) == "fa2"
    for dtype in (BF16, FP16):
        sel = auto(p, dtype)
        assert (sel.backend, sel.source, sel.rejected) == (B.FA, "auto", ())
        assert sel.impl.generation == "fa2"


@pytest.mark.parametrize("dtype", [FP32, FP64])
def test_cuda_sm80_full_precision_uses_torch_sdpa(dtype):
    assert auto(cuda((8, 0), "flash_attn"), dtype).backend is B.TORCH_SDPA


def test_cuda_sm80_without_flash_packages_uses_torch_sdpa():
    assert auto(cuda((8, 0))).backend is B.TORCH_SDPA


def test_cuda_sm90_with_only_flash_attn2_uses_torch_sdpa():
    # Documented rule: on Hopper cuDNN attention (inside torch_sdpa) beats FA2 by ~1.6x.
    p = cuda((9, 0), "flash_attn")
    assert auto(p).backend is B.TORCH_SDPA
    # ...but an explicit request for fa is honoured there (FA2 can run).
    global_force_attn_backend("fa")
    sel = auto(p)
    assert (sel.backend, sel.fell_back) == (B.FA, False) and sel.impl.generation == "fa2"


@pytest.mark.parametrize("packages", [("flash_attn_interface",), ("flash_attn_interface", "flash_attn")])
def test_cuda_sm90_with_fa3_uses_fa(packages):
    p = cuda((9, 0), *packages)
    sel = auto(p)
    assert sel.backend is B.FA and sel.impl.generation == "fa3"
    assert auto(p, FP16).backend is B.FA
    assert auto(p, FP32).backend is B.TORCH_SDPA


@pytest.mark.parametrize("packages,generation", [(("flash_attn.cute",), "fa4"),
                                                 (("flash_attn_interface", "flash_attn.cute"), "fa4"),
                                                 (("flash_attn_interface",), "fa3")])
def test_cuda_sm90_static_rule_by_number_of_keys(packages, generation):
    """Static rule on Hopper (measured on H200): cuDNN below fa_min_keys_hopper(D) keys, FA4/FA3 from there."""
    p = cuda((9, 0), *packages)
    assert (fa_min_keys_hopper(64), fa_min_keys_hopper(128), fa_min_keys_hopper(256)) == (2048, 3072, 3072)
    for d in (64, 128):
        long = auto(p, num_keys=fa_min_keys_hopper(d), head_size=d)
        assert long.backend is B.FA and long.impl.generation == generation
        short = auto(p, num_keys=fa_min_keys_hopper(d) - 1, head_size=d)
        assert short.backend is B.TORCH_SDPA and short.impl.kernel is None  # aten cuDNN, decided per call
    assert auto(p, num_keys=2560, head_size=64).backend is B.FA
    assert auto(p, num_keys=2560, head_size=128).backend is B.TORCH_SDPA
    assert auto(p).backend is B.FA  # length unknown: the long-sequence choice
    # Blackwell and Ampere do not depend on the length
    assert auto(cuda((10, 0), "flash_attn.cute"), num_keys=64).backend is B.FA
    assert auto(cuda((8, 0), "flash_attn"), num_keys=64).backend is B.FA


def test_cuda_sm100_with_fa4_uses_fa():
    p = cuda((10, 0), "flash_attn.cute")
    sel = auto(p)
    assert sel.backend is B.FA and sel.impl.generation == "fa4"
    assert auto(p, FP32).backend is B.TORCH_SDPA


def test_cuda_sm100_with_only_fa2_uses_torch_sdpa():
    assert auto(cuda((10, 0), "flash_attn")).backend is B.TORCH_SDPA


@pytest.mark.parametrize("cap", [(7, 5), (7, 0)])
def test_cuda_before_sm80_uses_torch_sdpa(cap):
    p = cuda(cap, "flash_attn", "flash_attn_interface")
    assert flash_generation(p) is None
    for dtype in (BF16, FP16, FP32):
        assert auto(p, dtype).backend is B.TORCH_SDPA


def test_cuda_head_size_fa_cannot_take_falls_to_torch_sdpa(caplog):
    caplog.set_level(logging.INFO, logger="usp_attn")
    sel = auto(cuda((9, 0), "flash_attn_interface"), head_size=512)
    assert sel.backend is B.TORCH_SDPA and not sel.fell_back  # auto: not a fallback from a request
    assert sel.rejected[0][0] is B.FA and "512" in sel.rejected[0][1]
    assert any("512" in r.getMessage() for r in caplog.records)  # explained (at INFO)


@pytest.mark.parametrize("head_size,expected", [(64, B.FA), (80, B.FA), (128, B.FA), (256, B.FA), (192, B.TORCH_SDPA),
                                               (12, B.TORCH_SDPA)])
def test_cuda_fa4_head_sizes(head_size, expected):
    """SM100: FA4 takes 8..128 in multiples of 8, or 256 (its _validate_head_dims)."""
    assert auto(cuda((10, 0), "flash_attn.cute"), head_size=head_size).backend is expected


# ---- ROCm ---------------------------------------------------------------------------------------
def test_rocm_with_flash_attn_uses_fa_for_half():
    p = Platform.make("rocm", packages=["flash_attn"])
    assert auto(p, BF16).backend is B.FA and auto(p, FP16).backend is B.FA
    assert auto(p, FP32).backend is B.TORCH_SDPA


def test_rocm_without_flash_attn_uses_torch_sdpa():
    sel = auto(Platform.make("rocm"))
    assert sel.backend is B.TORCH_SDPA
    assert sel.rejected[0][0] is B.FA and "flash_attn (ROCm build)" in sel.rejected[0][1]


@pytest.mark.parametrize("packages,expected", [(["aiter"], B.TORCH_SDPA), (["aiter", "flash_attn"], B.FA)])
def test_rocm_aiter_is_never_picked_automatically(packages, expected):
    p = Platform.make("rocm", packages=packages)
    sel = auto(p)
    assert sel.backend is expected
    assert B.AITER not in [b for b, _ in sel.rejected]  # not even considered


def test_rocm_aiter_on_request():
    set_cli_attention_backend("aiter")
    sel = auto(Platform.make("rocm", packages=["aiter"]))
    assert (sel.backend, sel.fell_back, sel.source) == (B.AITER, False, "cli")


# ---- MPS / CPU ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_mps_always_torch_sdpa(dtype):
    p = Platform.make("mps", packages=["flash_attn", "sageattention", "aiter"])
    assert auto(p, dtype).backend is B.TORCH_SDPA


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32, FP64])
def test_cpu_always_torch_sdpa(dtype):
    p = Platform.make("cpu", packages=["flash_attn", "flash_attn_interface", "sageattention"])
    sel = auto(p, dtype)
    assert sel.backend is B.TORCH_SDPA and sel.rejected == ()


def test_need_lse_and_mask_keep_torch_sdpa_on_cpu():
    sel = auto(Platform.make("cpu"), FP32, need_lse=True, need_mask=True)
    assert sel.backend is B.TORCH_SDPA


# ---- the Platform object itself -----------------------------------------------------------------
def test_this_machine_is_detected_as_cpu():
    p = detect_platform()
    assert p.kind is PlatformKind.CPU and p.capability is None and p.device_type == "cpu"
    assert current_platform() == p
    assert get_attn_backend(64, FP32).backend is B.TORCH_SDPA


def test_platform_make_and_queries():
    p = Platform.make("cuda", capability=[9, 0], packages={"sageattention": "2.1.1", "flash_attn": ""})
    assert p.capability == (9, 0) and p.kind is PlatformKind.CUDA and p.device_type == "cuda"
    assert p.has_package("sageattention") and not p.has_package("aiter")
    assert p.package_version("sageattention") == "2.1.1" and p.package_version("aiter") is None
    assert "sm90" in p.describe()
    assert Platform.make("rocm").device_type == "cuda"
    # Hashable and order-insensitive in packages (selections are cached on it).
    assert p == Platform.make("cuda", capability=(9, 0), packages={"flash_attn": "", "sageattention": "2.1.1"})
    assert len({p, Platform.make("cuda", capability=(9, 0), packages={"flash_attn": "", "sageattention": "2.1.1"})}) == 1
    with pytest.raises(ValueError):
        Platform.make("tpu")


def test_override_platform_is_used_and_restored():
    hopper = cuda((9, 0), "flash_attn_interface")
    before = current_platform()
    with override_platform(hopper):
        assert current_platform() == hopper
        assert get_attn_backend(128, BF16).backend is B.FA
    assert current_platform() == before
    assert get_attn_backend(128, BF16).backend is B.TORCH_SDPA
