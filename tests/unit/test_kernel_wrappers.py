"""The wrappers around optional kernel packages, run against pure-torch stand-ins of those
packages (tests/helpers/fake_kernels.py) that compute real attention. This checks what our
code does around the kernel: argument passing (scale, causal, layout), the LSE contract,
SageAttention's K-smoothing (never mutating the caller's K) and its LSE correction, and
honouring softmax_scale where the kernel has no scale argument."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import fake_kernels
from tests.helpers.reference import reference_attention
from usp_attn import AttentionBackendEnum as B
from usp_attn import LocalAttention, global_force_attn_backend
from usp_attn.platforms import Platform, override_platform
from usp_attn.backends import make_backend

FP32, BF16 = torch.float32, torch.bfloat16
# Inputs are fp32 so the comparison sees our arithmetic, not bf16 rounding (the stand-ins are exact).
TOL = dict(atol=1e-5, rtol=1e-5)


def qkv(b=2, s_q=6, s_k=6, h=4, h_kv=4, d=64, dtype=FP32, k_offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_q, h, d, generator=g).to(dtype)
    k = (torch.randn(b, s_k, h_kv, d, generator=g) + k_offset).to(dtype)
    v = torch.randn(b, s_k, h_kv, d, generator=g).to(dtype)
    return q, k, v


def check(out, lse, q, k, v, *, scale=None, causal=False):
    ref_out, ref_lse = reference_attention(q, k, v, scale=scale, causal=causal, return_lse=True)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        torch.testing.assert_close(lse.double(), ref_lse, **TOL)


# ---- fa ---------------------------------------------------------------------------------------------
FA_CASES = {
    "fa2": (Platform.make("cuda", capability=(8, 0), packages=["flash_attn"]), fake_kernels.fake_flash_attn2),
    "fa3": (Platform.make("cuda", capability=(9, 0), packages=["flash_attn_interface"]), fake_kernels.fake_flash_attn3),
    "fa3-beta": (Platform.make("cuda", capability=(9, 0), packages=["flash_attn_interface"]),
                 fake_kernels.fake_flash_attn3_beta),
    "fa4": (Platform.make("cuda", capability=(10, 0), packages=["flash_attn.cute"]), fake_kernels.fake_flash_attn4),
    "fa4-hopper": (Platform.make("cuda", capability=(9, 0), packages=["flash_attn.cute", "flash_attn_interface"]),
                   fake_kernels.fake_flash_attn4),
}


@pytest.mark.parametrize("name", FA_CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.05])
def test_flash_wrapper(monkeypatch, name, causal, scale):
    platform, make_fake = FA_CASES[name]
    fake = fake_kernels.install(monkeypatch, make_fake())
    fa = make_backend(B.FA, platform)
    assert fa.generation == name[:3]
    q, k, v = qkv(h=4, h_kv=2)  # GQA goes to the kernel as is
    out = fa.forward(q, k, v, causal=causal, softmax_scale=scale)
    assert isinstance(out, torch.Tensor)
    check(out, None, q, k, v, scale=scale, causal=causal)
    out, lse = fa.forward(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    check(out, lse, q, k, v, scale=scale, causal=causal)
    assert all(c["softmax_scale"] == scale and c["causal"] == causal for c in fake.calls)
    # each generation was asked for the LSE its own way, and only when it was needed
    flags = [c.get("return_lse", c.get("return_attn_probs")) for c in fake.calls]
    assert flags == ([None, None] if name == "fa3-beta" else [False, True])


def test_flash_rejects_masks(monkeypatch):
    fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn2())
    fa = make_backend(B.FA, FA_CASES["fa2"][0])
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask"):
        fa.forward(q, k, v, attn_mask=torch.ones(2, 1, 1, 6, dtype=torch.bool))


# ---- sage_attn --------------------------------------------------------------------------------------
SAGE1 = Platform.make("cuda", capability=(8, 9), packages={"sageattention": "1.0.6"})
SAGE2 = Platform.make("cuda", capability=(9, 0), packages={"sageattention": "2.1.1"})


def test_stand_in_v1_really_mutates_k():
    """The hazard the wrapper must avoid, shown on the stand-in itself."""
    fake = fake_kernels.fake_sageattention(1)
    q, k, v = qkv(k_offset=3.0)
    before = k.clone()
    fake.sageattn(q, k, v, tensor_layout="NHD")  # smooth_k=True is the package default
    assert not torch.equal(k, before)


@pytest.mark.parametrize("major,platform", [(1, SAGE1), (2, SAGE2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.07])
def test_sage_never_mutates_callers_k(monkeypatch, major, platform, causal, scale):
    fake = fake_kernels.install(monkeypatch, fake_kernels.fake_sageattention(major))
    q, k, v = qkv(k_offset=3.0)  # a large key mean: smoothing really changes K
    k_before, q_before, v_before = k.clone(), q.clone(), v.clone()
    out = make_backend(B.SAGE_ATTN, platform).forward(q, k, v, causal=causal, softmax_scale=scale)
    assert torch.equal(k, k_before) and torch.equal(q, q_before) and torch.equal(v, v_before)
    check(out, None, q, k, v, scale=scale, causal=causal)  # smoothing leaves softmax unchanged
    (call,) = fake.calls
    assert call["tensor_layout"] == "NHD" and call["is_causal"] == causal
    assert call["sm_scale"] == pytest.approx(64**-0.5 if scale is None else scale)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.07])
def test_sage2_lse_is_corrected_for_smoothing(monkeypatch, causal, scale):
    """lse(q, k) = lse(q, k - m) + scale * q·m: with a key mean of 3 the correction is
    large (~scale * 3 * sum(q)), so a missing or wrong correction fails by far."""
    fake_kernels.install(monkeypatch, fake_kernels.fake_sageattention(2))
    q, k, v = qkv(k_offset=3.0)
    k_before = k.clone()
    out, lse = make_backend(B.SAGE_ATTN, SAGE2).forward(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    assert torch.equal(k, k_before)
    check(out, lse, q, k, v, scale=scale, causal=causal)


def test_sage_through_the_layer_with_gqa(monkeypatch):
    """sage_attn declares no GQA: the layer must repeat kv heads before calling it."""
    fake = fake_kernels.install(monkeypatch, fake_kernels.fake_sageattention(2))
    q, k, v = qkv(h=4, h_kv=1, k_offset=1.0)
    layer = LocalAttention(num_heads=4, head_size=64, num_kv_heads=1)
    global_force_attn_backend("sage_attn")
    with override_platform(SAGE2):
        out = layer(q.to(BF16), k.to(BF16), v.to(BF16))
    assert layer.backend is B.SAGE_ATTN and len(fake.calls) == 1
    ref = reference_attention(q.to(BF16), k.to(BF16), v.to(BF16))
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)  # bf16 in/out (see test_local_attention)


def test_sage_rejects_masks(monkeypatch):
    fake_kernels.install(monkeypatch, fake_kernels.fake_sageattention(2))
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask"):
        make_backend(B.SAGE_ATTN, SAGE2).forward(q, k, v, attn_mask=torch.ones(2, 1, 1, 6, dtype=torch.bool))


# ---- sage_attn_3 --------------------------------------------------------------------------------------
SAGE3 = Platform.make("cuda", capability=(10, 0), packages=["sageattn3"])


@pytest.mark.parametrize("scale", [None, 64**-0.5, 0.3, 0.01])
@pytest.mark.parametrize("causal", [False, True])
def test_sage3_honours_softmax_scale(monkeypatch, scale, causal):
    """SageAttention3 has no scale argument (always D**-0.5); the reference implementation
    silently ignored softmax_scale there."""
    fake = fake_kernels.install(monkeypatch, fake_kernels.fake_sageattn3())
    q, k, v = qkv()
    q_before = q.clone()
    out = make_backend(B.SAGE_ATTN_3, SAGE3).forward(q, k, v, causal=causal, softmax_scale=scale)
    assert torch.equal(q, q_before)
    check(out, None, q, k, v, scale=scale, causal=causal)
    assert fake.calls == [{"is_causal": causal}]


def test_sage3_refuses_lse_and_masks(monkeypatch):
    fake_kernels.install(monkeypatch, fake_kernels.fake_sageattn3())
    q, k, v = qkv()
    impl = make_backend(B.SAGE_ATTN_3, SAGE3)
    with pytest.raises(ValueError, match="return_lse"):
        impl.forward(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="attn_mask"):
        impl.forward(q, k, v, attn_mask=torch.ones(2, 1, 1, 6, dtype=torch.bool))


# ---- aiter -------------------------------------------------------------------------------------------
AITER = Platform.make("rocm", packages=["aiter"])


@pytest.mark.parametrize("scale", [None, 0.2])
@pytest.mark.parametrize("causal", [False, True])
def test_aiter_passes_scale_and_returns_lse(monkeypatch, scale, causal):
    fake = fake_kernels.install(monkeypatch, fake_kernels.fake_aiter())
    q, k, v = qkv(h=4, h_kv=2)
    impl = make_backend(B.AITER, AITER)
    check(impl.forward(q, k, v, causal=causal, softmax_scale=scale), None, q, k, v, scale=scale, causal=causal)
    out, lse = impl.forward(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    check(out, lse, q, k, v, scale=scale, causal=causal)
    expected_scale = 64**-0.5 if scale is None else scale
    assert all(c["softmax_scale"] == pytest.approx(expected_scale) for c in fake.calls)  # always explicit
