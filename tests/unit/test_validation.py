"""Bad arguments to LocalAttention fail early with ValueError/TypeError whose message names the
argument, the value received and what would be valid."""

from __future__ import annotations

import pytest
import torch

from usp_attn import LocalAttention

H, D, H_KV = 4, 16, 2


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


def good(b=2, s_q=5, s_k=5):
    return t(b, s_q, H, D), t(b, s_k, H_KV, D), t(b, s_k, H_KV, D)


LAYER = dict(num_heads=H, head_size=D, num_kv_heads=H_KV)


# ---- constructor --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(num_heads=0, head_size=D), ["num_heads", "positive int", "0"]),
        (dict(num_heads=-2, head_size=D), ["num_heads", "-2"]),
        (dict(num_heads=4.0, head_size=D), ["num_heads", "4.0"]),
        (dict(num_heads="4", head_size=D), ["num_heads", "'4'"]),
        (dict(num_heads=True, head_size=D), ["num_heads", "True"]),
        (dict(num_heads=4, head_size=0), ["head_size", "0"]),
        (dict(num_heads=4, head_size=None), ["head_size", "None"]),
        (dict(num_heads=4, head_size=D, num_kv_heads=0), ["num_kv_heads", "0"]),
        (dict(num_heads=4, head_size=D, num_kv_heads=3), ["num_heads (4)", "multiple of num_kv_heads (3)"]),
        (dict(num_heads=4, head_size=D, num_kv_heads=8), ["num_heads (4)", "num_kv_heads (8)"]),
        (dict(num_heads=4, head_size=D, softmax_scale=0.0), ["softmax_scale", "0.0"]),
        (dict(num_heads=4, head_size=D, softmax_scale=-1), ["softmax_scale", "-1"]),
        (dict(num_heads=4, head_size=D, softmax_scale="0.1"), ["softmax_scale", "'0.1'"]),
        (dict(num_heads=4, head_size=D, softmax_scale=float("nan")), ["softmax_scale", "nan"]),
    ],
)
def test_constructor_rejects(kwargs, words):
    with pytest.raises(ValueError) as info:
        LocalAttention(**kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


# ---- forward: q, k, v --------------------------------------------------------------------------------
def bad_inputs():
    q, k, v = good()
    return {
        "q 3-D": ((q[0], k, v), ValueError, ["q must be 4-D", "[5, 4, 16]"]),
        "k 5-D": ((q, k[None], v), ValueError, ["k must be 4-D", "[1, 2, 5, 2, 16]"]),
        "v 2-D": ((q, k, v[0, 0]), ValueError, ["v must be 4-D"]),
        "q not a tensor": ((q.tolist(), k, v), TypeError, ["q must be a torch.Tensor", "list"]),
        "k int dtype": ((q, k.long(), v), TypeError, ["k must be a floating tensor", "torch.int64"]),
        "q head size": ((t(2, 5, H, 8), k, v), ValueError, ["q has shape [2, 5, 4, 8]", "head_size=16"]),
        "q num heads": ((t(2, 5, 3, D), k, v), ValueError, ["q has shape [2, 5, 3, 16]", "num_heads=4"]),
        "k kv heads": ((q, t(2, 5, H, D), v), ValueError, ["k has shape [2, 5, 4, 16]", "num_kv_heads=2"]),
        "v head size": ((q, k, t(2, 5, H_KV, 8)), ValueError, ["v has shape [2, 5, 2, 8]", "head_size=16"]),
        "dtype mismatch": ((q, k.bfloat16(), v), TypeError, ["one dtype", "k=torch.bfloat16", "q=torch.float32"]),
        "v dtype": ((q, k, v.double()), TypeError, ["v=torch.float64"]),
        "device mismatch": ((q, k, v.to("meta")), ValueError, ["one device", "v=meta"]),
        "batch mismatch": ((q, t(3, 5, H_KV, D), t(3, 5, H_KV, D)), ValueError, ["k has batch size 3", "q has 2"]),
        "k/v length": ((q, t(2, 5, H_KV, D), t(2, 6, H_KV, D)), ValueError, ["same sequence length", "5 and 6"]),
    }


@pytest.mark.parametrize("name", list(bad_inputs()))
def test_forward_rejects_bad_qkv(name):
    args, exc, words = bad_inputs()[name]
    with pytest.raises(exc) as info:
        LocalAttention(**LAYER)(*args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_causal_needs_equal_lengths():
    with pytest.raises(ValueError) as info:
        LocalAttention(**LAYER, causal=True)(*good(s_q=4, s_k=6))
    assert "causal=True needs S_q == S_k" in str(info.value) and "S_q=4, S_k=6" in str(info.value)
    LocalAttention(**LAYER, causal=False)(*good(s_q=4, s_k=6))  # fine without causal


# ---- forward: masks -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mask,exc,words",
    [
        ([[True] * 6] * 2, TypeError, ["attn_mask must be a torch.Tensor or None", "list"]),
        (t(2, 6, dtype=torch.int64), TypeError, ["attn_mask must be bool", "torch.int64"]),
        (t(2, 6, dtype=torch.uint8), TypeError, ["attn_mask", "torch.uint8"]),
        (t(2, 5, dtype=torch.bool), ValueError, ["attn_mask has shape [2, 5]", "B=2, H=4, S_q=4, S_k=6"]),
        (t(3, 6, dtype=torch.bool), ValueError, ["attn_mask has shape [3, 6]"]),
        (t(2, 6, 4, dtype=torch.bool), ValueError, ["attn_mask has shape [2, 6, 4]", "[B, S_q, S_k]"]),
        (t(2, 2, 4, 6, dtype=torch.bool), ValueError, ["attn_mask has shape [2, 2, 4, 6]", "1|H"]),
        (t(2, 1, 2, 6, dtype=torch.bool), ValueError, ["attn_mask has shape [2, 1, 2, 6]", "1|S_q"]),
        (t(6, dtype=torch.bool), ValueError, ["attn_mask has shape [6]"]),
        (t(2, 6, device="meta", dtype=torch.bool), ValueError, ["attn_mask is on meta", "q is on cpu"]),
    ],
)
def test_forward_rejects_bad_masks(mask, exc, words):
    with pytest.raises(exc) as info:
        LocalAttention(**LAYER)(*good(s_q=4, s_k=6), attn_mask=mask)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


# ---- supported_attention_backends -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "value,exc,words",
    [
        (["flash"], ValueError, ["unknown attention backend 'flash'", "torch_sdpa"]),
        (["fa", 3], TypeError, ["int"]),
        ("fa", TypeError, ["supported_attention_backends", "iterable", "'fa'"]),
        (["auto"], ValueError, ["supported_attention_backends", "'auto'"]),
        ([], ValueError, ["must not be empty"]),
    ],
)
def test_supported_backends_are_checked_when_the_layer_is_built(value, exc, words):
    with pytest.raises(exc) as info:
        LocalAttention(**LAYER, supported_attention_backends=value)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_supported_backend_names_are_normalised():
    from usp_attn import AttentionBackendEnum as B

    layer = LocalAttention(**LAYER, supported_attention_backends=["FA3", B.TORCH_SDPA, " sage_attn "])
    assert layer.supported_attention_backends == (B.FA, B.TORCH_SDPA, B.SAGE_ATTN)
    assert LocalAttention(**LAYER).supported_attention_backends is None
