"""What each backend class declares, read through its classmethods with injected platforms
(the kernels themselves cannot run on this CPU machine)."""

from __future__ import annotations

import pytest
import torch

from usp_attn import AttentionBackendEnum as B
from usp_attn.platforms import Platform
from usp_attn.backends import BACKEND_CLASSES, backend_class, make_backend
from usp_attn.backends.aiter import AiterBackend
from usp_attn.backends.flash import FlashAttentionBackend, flash_generation, flash_generations
from usp_attn.backends.sage import SageAttention3Backend, SageAttentionBackend, sage_major_version
from usp_attn.backends.sdpa import TorchSDPABackend, cuda_subkernel

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
CPU, MPS = Platform.make("cpu"), Platform.make("mps")


def cuda(cap, packages=()):
    return Platform.make("cuda", capability=cap, packages=packages)


def test_every_member_has_a_class_named_after_it():
    assert set(BACKEND_CLASSES) == set(B)
    for member, cls in BACKEND_CLASSES.items():
        assert cls.name is member and backend_class(member) is cls
    assert make_backend(B.TORCH_SDPA, CPU) is make_backend(B.TORCH_SDPA, CPU)  # shared, stateless


# ---- fa -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "platform,generation",
    [
        (cuda((8, 0), ["flash_attn"]), "fa2"),
        (cuda((8, 0), ["flash_attn_interface"]), None),  # FA3 is Hopper-only
        (cuda((8, 6), ["flash_attn_interface", "flash_attn.cute"]), "fa4"),  # FA4 runs forward on SM80+
        (cuda((8, 0), ["flash_attn", "flash_attn.cute"]), "fa2"),  # FA2 preferred on Ampere
        (cuda((9, 0), ["flash_attn"]), "fa2"),
        (cuda((9, 0), ["flash_attn", "flash_attn_interface"]), "fa3"),
        (cuda((9, 0), ["flash_attn.cute"]), "fa4"),
        (cuda((9, 0), ["flash_attn", "flash_attn_interface", "flash_attn.cute"]), "fa4"),
        (cuda((10, 0), ["flash_attn", "flash_attn.cute"]), "fa4"),
        (cuda((12, 0), ["flash_attn.cute"]), "fa4"),
        (cuda((10, 0), ["flash_attn_interface"]), None),  # FA3 is Hopper-only
        (cuda((7, 5), ["flash_attn", "flash_attn.cute"]), None),
        (Platform.make("rocm", packages=["flash_attn"]), "fa2"),
        (Platform.make("rocm"), None),
        (Platform.make("cpu", packages=["flash_attn"]), None),
    ],
)
def test_flash_generation(platform, generation):
    assert flash_generation(platform) == generation
    assert (FlashAttentionBackend.machine_reason(platform) is None) == (generation is not None)


@pytest.mark.parametrize(
    "platform,words",
    [
        (CPU, ["fa needs CUDA/ROCM", "CPU"]),
        (MPS, ["MPS"]),
        (cuda((7, 5), ["flash_attn"]), ["compute capability >= 8.0", "7.5"]),
        (cuda((8, 6)), ["flash_attn (FA2) or flash_attn.cute (FA4)"]),
        (cuda((9, 0)), ["flash_attn.cute (FA4, pip install flash-attn-4), flash_attn_interface (FA3) or flash_attn"]),
        (cuda((10, 0)), ["flash_attn.cute (FA4, pip install flash-attn-4) or flash_attn"]),
        (Platform.make("cuda", capability=(9, 0), unusable={"flash_attn": "flash_attn is a namespace package"}),
         ["not installed", "flash_attn: flash_attn is a namespace package"]),
        (Platform.make("rocm"), ["flash_attn (ROCm build)"]),
    ],
)
def test_flash_machine_reasons(platform, words):
    reason = FlashAttentionBackend.machine_reason(platform)
    for word in words:
        assert word in reason


def test_flash_layer_properties():
    p = cuda((9, 0), ["flash_attn_interface"])
    fa = FlashAttentionBackend
    assert fa.supports_lse(p) and fa.supports_gqa and fa.supports_causal and not fa.supports_mask
    assert fa.unsupported_reason(p, 128, BF16, need_lse=True) is None
    assert "float32" in fa.unsupported_reason(p, 128, FP32)
    assert "masks" in fa.unsupported_reason(p, 128, BF16, need_mask=True)
    assert fa.unsupported_reason(p, 256, FP16) is None
    assert "264" in fa.unsupported_reason(p, 264, FP16)
    assert "100" in fa.unsupported_reason(p, 100, FP16)  # not a multiple of 8
    fa4 = cuda((10, 0), ["flash_attn.cute"])
    assert fa.unsupported_reason(fa4, 96, BF16) is None


# FA4's own limits (flash_attn/cute/interface.py, _validate_head_dims): SM90 8..256, SM100/110
# 8..128 or 256 (multiples of 8 for 16-bit dtypes); FA2/FA3 up to 256.
@pytest.mark.parametrize("cap,packages,head_size,kernels", [
    ((9, 0), ["flash_attn.cute"], 192, ("fa4",)),
    ((9, 0), ["flash_attn.cute"], 256, ("fa4",)),
    ((9, 0), ["flash_attn.cute"], 264, ()),
    ((10, 0), ["flash_attn.cute"], 128, ("fa4",)),
    ((10, 0), ["flash_attn.cute"], 256, ("fa4",)),
    ((10, 0), ["flash_attn.cute"], 192, ()),
    ((10, 0), ["flash_attn.cute", "flash_attn"], 192, ("fa2",)),  # FA2 takes what FA4 cannot
    ((9, 0), ["flash_attn.cute", "flash_attn_interface", "flash_attn"], 64, ("fa4", "fa3", "fa2")),
    ((9, 0), ["flash_attn.cute"], 12, ()),
])
def test_flash_kernels_per_head_size(cap, packages, head_size, kernels):
    p = cuda(cap, packages)
    assert FlashAttentionBackend.kernels(p, head_size, BF16) == kernels
    reason = FlashAttentionBackend.unsupported_reason(p, head_size, BF16)
    assert (reason is None) == bool(kernels)
    if not kernels:
        assert str(head_size) in reason
    else:  # the kernel object binds to the first generation that takes the head size
        assert make_backend(B.FA, p, FlashAttentionBackend.default_kernel(p, head_size)).generation == kernels[0]
    assert FlashAttentionBackend.kernels(p, head_size, BF16, need_mask=True) == ()


def test_flash_generations_order():
    assert flash_generations(cuda((9, 0), ["flash_attn", "flash_attn_interface", "flash_attn.cute"])) == (
        "fa4", "fa3", "fa2")
    assert flash_generations(cuda((8, 0), ["flash_attn", "flash_attn.cute"])) == ("fa2", "fa4")


# ---- torch_sdpa ------------------------------------------------------------------------------------
@pytest.mark.parametrize("platform", [CPU, MPS, cuda((7, 0)), cuda((9, 0)), Platform.make("rocm")])
def test_torch_sdpa_runs_everywhere_with_lse_and_masks(platform):
    sdpa = TorchSDPABackend
    assert sdpa.machine_reason(platform) is None and sdpa.supports_lse(platform)
    assert sdpa.supports_mask and sdpa.supports_gqa
    for dtype in (BF16, FP16, FP32, FP64):
        assert sdpa.unsupported_reason(platform, 80, dtype, need_lse=True, need_mask=True) is None


@pytest.mark.parametrize(
    "capability,dtype,head_size,has_mask,kernel",
    [
        ((9, 0), BF16, 128, False, "cudnn"),
        ((9, 0), FP16, 64, False, "cudnn"),
        ((9, 0), BF16, 256, False, "flash"),  # cuDNN only up to 128 here
        ((8, 0), BF16, 128, False, "flash"),
        ((8, 0), BF16, 128, True, "efficient"),  # masks go to the kernel that takes a bias
        ((9, 0), BF16, 128, True, "efficient"),
        ((8, 0), FP32, 128, False, "efficient"),
        ((7, 5), FP16, 64, False, "efficient"),
        ((8, 0), FP32, 12, False, "efficient"),  # fp32 needs D % 4 == 0
        ((8, 0), FP16, 12, False, "math"),  # half needs D % 8 == 0
        ((8, 0), FP32, 6, False, "math"),
        ((8, 0), FP32, 7, True, "math"),
        ((8, 0), FP64, 64, False, "math"),  # the efficient kernel has no fp64
        ((9, 0), FP64, 64, True, "math"),
    ],
)
def test_torch_sdpa_cuda_subkernel(capability, dtype, head_size, has_mask, kernel):
    assert cuda_subkernel(capability, dtype, head_size, has_mask) == kernel


def test_torch_sdpa_kernels_to_measure():
    """Every fused aten kernel that fits, in static order; math is never worth timing."""
    assert TorchSDPABackend.kernels(cuda((9, 0)), 128, BF16) == ("cudnn", "flash", "efficient")
    assert TorchSDPABackend.kernels(cuda((9, 0)), 256, BF16) == ("flash", "efficient")
    assert TorchSDPABackend.kernels(cuda((9, 0)), 128, BF16, need_mask=True) == ("efficient",)
    assert TorchSDPABackend.kernels(cuda((8, 0)), 128, FP32) == ("efficient",)
    assert TorchSDPABackend.kernels(CPU, 128, BF16) == ()
    bound = make_backend(B.TORCH_SDPA, cuda((9, 0)), "flash")
    assert bound.kernel == "flash" and make_backend(B.TORCH_SDPA, cuda((9, 0))).kernel is None


# ---- sage_attn / sage_attn_3 -----------------------------------------------------------------------
@pytest.mark.parametrize("version,major,lse", [("1.0.6", 1, False), ("2.1.1", 2, True), ("", 2, True), ("dev", 2, True)])
def test_sage_version_decides_lse(version, major, lse):
    p = cuda((9, 0), {"sageattention": version})
    assert sage_major_version(p) == major
    assert SageAttentionBackend.supports_lse(p) is lse
    reason = SageAttentionBackend.unsupported_reason(p, 128, BF16, need_lse=True)
    assert (reason is None) is lse
    if not lse:
        assert "log-sum-exp" in reason


def test_sage_reasons():
    s = SageAttentionBackend
    assert sage_major_version(cuda((9, 0))) is None
    assert "'sageattention' package" in s.machine_reason(cuda((9, 0)))
    assert "compute capability >= 8.0" in s.machine_reason(cuda((7, 5), ["sageattention"]))
    assert "CUDA" in s.machine_reason(Platform.make("rocm", packages=["sageattention"]))
    p = cuda((8, 9), ["sageattention"])
    assert s.machine_reason(p) is None
    for d in (64, 96, 128):
        assert s.unsupported_reason(p, d, FP16) is None
    assert "not 80" in s.unsupported_reason(p, 80, FP16)
    assert "float32" in s.unsupported_reason(p, 64, FP32)
    assert "masks" in s.unsupported_reason(p, 64, FP16, need_mask=True)
    assert not s.supports_gqa  # the layer repeats kv heads for it


def test_sage3_reasons():
    s3 = SageAttention3Backend
    assert "'sageattn3' package" in s3.machine_reason(cuda((10, 0)))
    assert "Blackwell" in s3.machine_reason(cuda((9, 0), ["sageattn3"]))
    p = cuda((10, 0), ["sageattn3"])
    assert s3.machine_reason(p) is None and not s3.supports_lse(p)
    assert s3.unsupported_reason(p, 128, BF16) is None
    assert "not 96" in s3.unsupported_reason(p, 96, BF16)
    assert "log-sum-exp" in s3.unsupported_reason(p, 128, BF16, need_lse=True)


# ---- aiter ------------------------------------------------------------------------------------------
def test_aiter_reasons():
    a = AiterBackend
    rocm = Platform.make("rocm", packages=["aiter"])
    assert a.machine_reason(rocm) is None and a.supports_lse(rocm) and a.supports_gqa
    assert a.unsupported_reason(rocm, 128, BF16, need_lse=True) is None
    assert "'aiter' package" in a.machine_reason(Platform.make("rocm"))
    assert "ROCM" in a.machine_reason(cuda((9, 0), ["aiter"]))
    assert "not 300" in a.unsupported_reason(rocm, 300, BF16)
    assert "float32" in a.unsupported_reason(rocm, 128, FP32)
