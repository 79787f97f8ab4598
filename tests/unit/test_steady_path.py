"""The steady-call path of LocalAttention: a call that repeats the last signature skips the checks and the
kernel lookup, and anything that could change their verdict makes it look again."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.reference import reference_attention
from usp_attn import LocalAttention, USPAttention, global_force_attn_backend_context_manager


def qkv(seed=0, s=12, h=4, d=16, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, s, h, d, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _counting(layer, monkeypatch):
    calls = []
    original = layer.kernel_for

    def kernel_for(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, "kernel_for", kernel_for)
    return calls


def test_repeated_calls_look_the_kernel_up_once(monkeypatch):
    layer = LocalAttention(4, 16)
    calls = _counting(layer, monkeypatch)
    for seed in range(5):
        out = layer(*qkv(seed))
    assert len(calls) == 1
    torch.testing.assert_close(out.double(), reference_attention(*qkv(4)), atol=1e-5, rtol=1e-5)
    layer(*qkv(0, s=13))  # a new shape: looked up (and checked) again
    layer(*qkv(0), return_lse=True)  # the LSE changes the kernel's contract
    assert len(calls) == 3


def test_a_settings_change_reaches_the_steady_call(monkeypatch):
    layer = LocalAttention(4, 16)
    calls = _counting(layer, monkeypatch)
    layer(*qkv())
    with global_force_attn_backend_context_manager("torch_sdpa"):
        layer(*qkv())
    assert len(calls) == 2


@pytest.mark.parametrize("bad, error", [
    (lambda q, k, v: (q[..., :8], k, v), ValueError),  # head size
    (lambda q, k, v: (q, k.double(), v), TypeError),  # dtypes differ
    (lambda q, k, v: (q.numpy(), k, v), TypeError),  # not a tensor
])
def test_bad_inputs_after_steady_calls_still_raise(bad, error):
    layer = LocalAttention(4, 16)
    q, k, v = qkv()
    layer(q, k, v)
    layer(q, k, v)
    with pytest.raises(error):
        layer(*bad(q, k, v))
    with pytest.raises(ValueError):
        layer(q, k, v, return_lse=1)  # True == 1: the flag is still checked exactly


def test_gradients_after_inference_calls():
    layer = USPAttention(4, 16)
    with torch.no_grad():
        layer(*qkv())
    q, k, v = qkv(requires_grad=True)
    layer(q, k, v).sum().backward()  # the gradient flag is part of the signature: the autograd path runs
    assert q.grad is not None and k.grad is not None and torch.isfinite(q.grad).all()
