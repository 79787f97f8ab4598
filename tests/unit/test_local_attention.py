"""LocalAttention on CPU against the fp64 reference (tests/helpers/reference.py).

Tolerances (|out - ref| <= atol + rtol * |ref|; the reference is computed from the *same*
low-precision inputs upcast to fp64, so input rounding is not counted):
  * fp32: 1e-5. Accumulating ~S*D products in fp32 (eps 1.2e-7) errs ~1e-6 at these sizes.
  * bf16: atol = rtol = eps_bf16 = 2**-7. The output is rounded to bf16 (half an ulp =
    2**-9 relative) and the kernel may round the softmax probabilities to bf16 before P·V
    (another ~2**-9 relative of |v|, with |v| <= ~4 for randn inputs); eps = 2**-7 covers
    both with margin (observed worst ~1.2 eps over many seeds).
  * fp16: the same argument with eps_fp16 = 2**-10, doubled for margin.
  * fp64: 1e-12 (fp64 inputs must not be computed in fp32 anywhere).
  * LSE: always fp32 (the contract), computed from upcast inputs: 1e-6 for fp64 inputs (only
    the final fp32 rounding), 1e-5 for fp32 inputs, 1e-3 for half
    inputs (scores of half inputs may be scaled in half precision). 1e-3 is still ~15x tighter
    than a bf16 ulp at |lse| ~ 5, so an LSE kept in bf16 would fail.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.helpers import fake_kernels
from tests.helpers.reference import reference_attention
from usp_attn import AttentionBackendEnum as B
from usp_attn import LocalAttention
from usp_attn.platforms import Platform, override_platform
from usp_attn.masks import normalize_mask

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
OUT_TOL = {
    FP64: dict(atol=1e-12, rtol=1e-12),
    FP32: dict(atol=1e-5, rtol=1e-5),
    BF16: dict(atol=2**-7, rtol=2**-7),
    FP16: dict(atol=2 * 2**-10, rtol=2 * 2**-10),
}
LSE_TOL = {FP64: dict(atol=1e-6, rtol=1e-6), FP32: dict(atol=1e-5, rtol=1e-5),
           BF16: dict(atol=1e-3, rtol=1e-3), FP16: dict(atol=1e-3, rtol=1e-3)}

B_, S, H, D = 2, 37, 4, 32


def make_qkv(*, b=B_, s_q=S, s_k=S, h=H, h_kv=H, d=D, dtype=FP32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_q, h, d, generator=g, dtype=FP32).to(dtype)
    k = torch.randn(b, s_k, h_kv, d, generator=g, dtype=FP32).to(dtype)
    v = torch.randn(b, s_k, h_kv, d, generator=g, dtype=FP32).to(dtype)
    return q, k, v


def assert_matches(out, q, k, v, *, scale=None, causal=False, mask=None):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    ref = reference_attention(q, k, v, scale=scale, causal=causal, mask=mask)
    torch.testing.assert_close(out.double(), ref, **OUT_TOL[q.dtype])


# ---- plain, GQA, causal, scale -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16, FP64])
@pytest.mark.parametrize("h_kv", [1, 2, H])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(dtype, h_kv, causal):
    q, k, v = make_qkv(h_kv=h_kv, dtype=dtype)
    layer = LocalAttention(H, D, num_kv_heads=h_kv, causal=causal)
    assert_matches(layer(q, k, v), q, k, v, causal=causal)
    assert layer.backend is B.TORCH_SDPA


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("scale", [0.02, 0.5, 1.0])
def test_custom_scale(dtype, scale):
    q, k, v = make_qkv(h_kv=2, dtype=dtype)
    layer = LocalAttention(H, D, num_kv_heads=2, softmax_scale=scale)
    out = layer(q, k, v)
    assert_matches(out, q, k, v, scale=scale)
    # The scale really matters at these values: the default-scale result is far away.
    default = reference_attention(q, k, v)
    assert (out.double() - default).abs().max() > 10 * OUT_TOL[dtype]["atol"]


def test_default_scale_is_inverse_sqrt_head_size():
    assert LocalAttention(2, 64).softmax_scale == pytest.approx(0.125)
    assert LocalAttention(2, 64, softmax_scale=0.3).softmax_scale == pytest.approx(0.3)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_cross_attention_shapes(dtype):
    q, k, v = make_qkv(s_q=5, s_k=23, h_kv=1, dtype=dtype)
    assert_matches(LocalAttention(H, D, num_kv_heads=1)(q, k, v), q, k, v)


def test_single_token_and_batch_one():
    q, k, v = make_qkv(b=1, s_q=1, s_k=1)
    assert_matches(LocalAttention(H, D, causal=True)(q, k, v), q, k, v, causal=True)
    torch.testing.assert_close(LocalAttention(H, D)(q, k, v), v)  # one key: output is its value


def test_strided_inputs_from_a_fused_projection():
    """DiT blocks slice q/k/v out of one [B, S, 3, H, D] projection: non-contiguous views."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B_, S, 3, H, D, generator=g)
    q, k, v = qkv.unbind(dim=2)
    assert not q.is_contiguous()
    assert_matches(LocalAttention(H, D, causal=True)(q, k, v), q, k, v, causal=True)


# ---- masks ------------------------------------------------------------------------------------------
def bool_mask(shape, seed, p_keep=0.7):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < p_keep
    m[..., 0] = True  # keep at least key 0 so no row is empty here (empty rows are tested below)
    return m


def float_mask(shape, seed, dtype=FP32):
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(shape, generator=g)
    bias = bias.masked_fill(~bool_mask(shape, seed + 1), float("-inf"))
    return bias.to(dtype)


S_Q, S_K = 11, 13
MASKS = {
    "bool [B,S_k]": lambda: bool_mask((B_, S_K), 1),
    "bool [B,S_q,S_k]": lambda: bool_mask((B_, S_Q, S_K), 2),
    "bool [B,1,S_q,S_k]": lambda: bool_mask((B_, 1, S_Q, S_K), 3),
    "bool [B,H,S_q,S_k]": lambda: bool_mask((B_, H, S_Q, S_K), 4),
    "float [B,S_k]": lambda: float_mask((B_, S_K), 5),
    "float [B,S_q,S_k]": lambda: float_mask((B_, S_Q, S_K), 6),
    "float [B,1,S_q,S_k]": lambda: float_mask((B_, 1, S_Q, S_K), 7),
    "float [B,H,S_q,S_k]": lambda: float_mask((B_, H, S_Q, S_K), 8),
}


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("form", MASKS)
def test_each_mask_form(form, dtype):
    mask = MASKS[form]()
    q, k, v = make_qkv(s_q=S_Q, s_k=S_K, h_kv=2, dtype=dtype)
    layer = LocalAttention(H, D, num_kv_heads=2)
    out = layer(q, k, v, attn_mask=mask)
    assert_matches(out, q, k, v, mask=mask)
    # The mask really changes the result (so the comparison above is not vacuous).
    unmasked = reference_attention(q, k, v)
    assert (out.double() - unmasked).abs().max() > 0.05


@pytest.mark.parametrize("form", ["bool [B,S_k]", "bool [B,H,S_q,S_k]", "float [B,S_q,S_k]"])
def test_mask_with_causal(form):
    shape = {"bool [B,S_k]": (B_, S), "bool [B,H,S_q,S_k]": (B_, H, S, S), "float [B,S_q,S_k]": (B_, S, S)}[form]
    mask = bool_mask(shape, 9) if form.startswith("bool") else float_mask(shape, 9)
    q, k, v = make_qkv()
    assert_matches(LocalAttention(H, D, causal=True)(q, k, v, attn_mask=mask), q, k, v, causal=True, mask=mask)


def test_float_mask_in_another_dtype_is_converted():
    mask = float_mask((B_, S_Q, S_K), 10, dtype=FP32)
    q, k, v = make_qkv(s_q=S_Q, s_k=S_K, dtype=BF16)
    assert_matches(LocalAttention(H, D)(q, k, v, attn_mask=mask), q, k, v, mask=mask)


# ---- fully masked rows, LSE ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("kind", ["padding", "per-query", "per-head", "additive", "causal+padding"])
def test_fully_masked_rows_give_zero_and_minus_inf_lse(dtype, kind):
    q, k, v = make_qkv(s_q=S_Q if kind != "causal+padding" else S, s_k=S_K if kind != "causal+padding" else S,
                       dtype=dtype)
    s_q, s_k = q.shape[1], k.shape[1]
    causal = kind == "causal+padding"
    if kind == "padding":  # batch 1 has no key at all
        mask = torch.ones(B_, s_k, dtype=torch.bool)
        mask[1] = False
        empty = (1, slice(None), slice(None))  # (batch, query rows, heads)
    elif kind == "per-query":
        mask = bool_mask((B_, s_q, s_k), 11)
        mask[0, 3] = False
        empty = (0, 3, slice(None))
    elif kind == "per-head":
        mask = bool_mask((B_, H, s_q, s_k), 12)
        mask[1, 2, 5] = False
        empty = (1, 5, 2)
    elif kind == "additive":
        mask = float_mask((B_, s_q, s_k), 13)
        mask[1, 0] = float("-inf")
        empty = (1, 0, slice(None))
    else:  # causal: query 0 sees only key 0, which the padding hides
        mask = torch.ones(B_, s_k, dtype=torch.bool)
        mask[0, 0] = False
        empty = (0, 0, slice(None))
    layer = LocalAttention(H, D, causal=causal)

    out = layer(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()
    assert (out[empty] == 0).all()
    assert_matches(out, q, k, v, mask=mask, causal=causal)

    norm = normalize_mask(mask, batch=B_, num_heads=H, s_q=s_q, s_k=s_k, dtype=dtype, device=q.device)
    out2, lse = layer.attend(q, k, v, mask=norm, causal=causal, return_lse=True)
    torch.testing.assert_close(out2, out)
    ref_out, ref_lse = reference_attention(q, k, v, mask=mask, causal=causal, return_lse=True)
    b, rows, heads = empty
    assert torch.isneginf(lse[b, heads, rows]).all()
    assert torch.isneginf(lse).sum() == torch.isneginf(ref_lse).sum()  # no other row is -inf
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL[dtype])  # -inf positions must agree too


@pytest.mark.parametrize("dtype", [FP32, BF16, FP64])
@pytest.mark.parametrize("empty", ["rows", "keys"])
@pytest.mark.parametrize("masked", [False, True])
def test_no_query_rows_or_no_keys(dtype, empty, masked):
    """What a rank whose shard holds no token asks for: no rows give empty results (torch's CPU flash op dies of
    SIGFPE on them, so no kernel may be called); no keys give every row output 0 and LSE -inf; gradients exist
    (zero) so a training step's graph stays whole."""
    s_q, s_k = (0, S_K) if empty == "rows" else (S_Q, 0)
    q, k, v = make_qkv(s_q=s_q, s_k=s_k, h_kv=2, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_()
    mask = torch.ones(B_, H, s_q, s_k, dtype=torch.bool) if masked else None
    out, lse = LocalAttention(H, D, 2)(q, k, v, attn_mask=mask, return_lse=True)
    assert out.shape == (B_, s_q, H, D) and out.dtype == dtype
    assert lse.shape == (B_, H, s_q) and lse.dtype == (FP64 if dtype == FP64 else FP32)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.float().sum().backward()
    assert all(t.grad is not None and (t.grad == 0).all() for t in (q, k, v))


@pytest.mark.parametrize("nan_keys", ["one key", "every key"])
def test_nan_in_an_additive_mask_reaches_the_output(nan_keys):
    """A NaN bias is the caller's bug: the rows it touches come out NaN as torch's own attention gives them, never
    a plausible 0 (a row whose every bias is NaN is not a row with no key to attend)."""
    q, k, v = make_qkv(s_q=S_Q, s_k=S_K, dtype=FP32)
    mask = float_mask((B_, S_Q, S_K), 14)
    mask[mask == float("-inf")] = 0.0
    if nan_keys == "one key":
        mask[1, 2, 3] = float("nan")
    else:
        mask[1, 2] = float("nan")
    out, lse = LocalAttention(H, D)(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.isnan(out[1, 2]).all() and torch.isnan(lse[1, :, 2]).all()
    out[1, 2], lse[1, :, 2] = 0.0, 0.0
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()  # no other row touched


@pytest.mark.parametrize("dtype", [FP32, BF16, FP64])
@pytest.mark.parametrize("h_kv", [1, H])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_lse_matches_reference_logsumexp(dtype, h_kv, causal, masked):
    q, k, v = make_qkv(h_kv=h_kv, dtype=dtype)
    mask = bool_mask((B_, S), 14) if masked else None
    layer = LocalAttention(H, D, num_kv_heads=h_kv, causal=causal, softmax_scale=0.2)
    norm = None if mask is None else normalize_mask(mask, batch=B_, num_heads=H, s_q=S, s_k=S, dtype=dtype,
                                                     device=q.device)
    out, lse = layer.attend(q, k, v, mask=norm, causal=causal, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, scale=0.2, causal=causal, mask=mask, return_lse=True)
    assert lse.dtype == (FP64 if dtype == FP64 else FP32) and lse.shape == (B_, H, S)  # fp64 keeps fp64
    torch.testing.assert_close(out.double(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL[dtype])


# ---- routing masked calls -----------------------------------------------------------------------------
def test_masked_call_on_a_backend_without_masks_is_routed_and_logged_once(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="usp_attn")
    fa2 = fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn2())
    sm80 = Platform.make("cuda", capability=(8, 0), packages=["flash_attn"])
    q, k, v = make_qkv(dtype=BF16)
    mask = bool_mask((B_, S), 15)
    layer = LocalAttention(H, D)
    with override_platform(sm80):
        assert_matches(layer(q, k, v), q, k, v)
        assert layer.backend is B.FA and len(fa2.calls) == 1
        for _ in range(3):
            assert_matches(layer(q, k, v, attn_mask=mask), q, k, v, mask=mask)
            assert layer.backend is B.TORCH_SDPA
        assert len(fa2.calls) == 1  # fa never saw the mask
        layer(q, k, v)
        assert layer.backend is B.FA
    routed = [r for r in caplog.records if "masked attention calls run on 'torch_sdpa'" in r.getMessage()]
    assert len(routed) == 1


# ---- supported_attention_backends ------------------------------------------------------------------------
def test_supported_set_limits_the_choice(monkeypatch):
    fa2 = fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn2())
    sm80 = Platform.make("cuda", capability=(8, 0), packages=["flash_attn"])
    q, k, v = make_qkv(dtype=BF16)
    layer = LocalAttention(H, D, supported_attention_backends=["torch_sdpa"])
    with override_platform(sm80):
        assert_matches(layer(q, k, v), q, k, v)
    assert layer.backend is B.TORCH_SDPA and fa2.calls == []  # auto would have picked fa here


def test_supported_set_that_cannot_run_here_is_a_clear_error():
    from usp_attn import AttentionBackendUnavailableError

    layer = LocalAttention(H, D, supported_attention_backends=["fa", "sage_attn"])
    with pytest.raises(AttentionBackendUnavailableError) as info:
        layer(*make_qkv())
    assert "no attention backend can run" in str(info.value)
    assert "supported_attention_backends" in str(info.value)
