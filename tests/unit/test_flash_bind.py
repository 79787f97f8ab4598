"""FA4's launch bound once per call signature (usp_attn/backends/flash_bind.py), against a stand-in of
flash-attn-4 that gets to its kernel the way the real package does (tests/helpers/fake_kernels.py,
``fake_flash_attn4(launch_path=...)``): the bound call gives what the public function gives, skips the
public function's Python after the first call of a signature, records again for a new signature, and
stays on the public function whenever the recording is not exactly one launch of q, k, v, out, lse
and plain values."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import fake_kernels
from tests.helpers.reference import reference_attention
from usp_attn import AttentionBackendEnum as B
from usp_attn.backends import flash_bind, make_backend
from usp_attn.platforms import Platform

HOPPER = Platform.make("cuda", capability=(9, 0), packages=["flash_attn.cute"])


def _fa4(monkeypatch, path="sm90"):
    mod = fake_kernels.fake_flash_attn4(launch_path=path)
    fake_kernels.install(monkeypatch, mod)
    fake_kernels.install(monkeypatch, mod.interface)
    fa = make_backend(B.FA, HOPPER)
    assert fa.generation == "fa4"
    return mod, fa


def _every_call_is_public(mod, fa, calls=3):
    q, k, v = _qkv()
    for _ in range(calls):
        fa.forward(q, k, v)
    assert len(mod.calls) == calls and flash_bind.bound_signatures() == (0, 1)


def _qkv(s=6, h=4, h_kv=2, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, s, h, d, generator=g), torch.randn(2, s, h_kv, d, generator=g),
            torch.randn(2, s, h_kv, d, generator=g))


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_bound_calls_skip_the_public_function_and_equal_it(monkeypatch, causal, return_lse):
    mod, fa = _fa4(monkeypatch)
    for seed in range(4):
        q, k, v = _qkv(seed=seed)
        got = fa.forward(q, k, v, causal=causal, softmax_scale=0.1, return_lse=return_lse)
        out, lse = got if return_lse else (got, None)
        ref_out, ref_lse = reference_attention(q, k, v, scale=0.1, causal=causal, return_lse=True)
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
        if return_lse:
            assert lse.dtype == torch.float32 and lse.shape == (2, 4, 6)
            torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert len(mod.calls) == 1  # the public function ran once: the recording
    assert mod.interface.launches == 4 and flash_bind.bound_signatures() == (1, 0)


def test_each_signature_is_recorded_once(monkeypatch):
    mod, fa = _fa4(monkeypatch)
    shapes = [dict(s=6), dict(s=9), dict(s=6, h=2, h_kv=2), dict(s=6)]
    for kw in shapes * 2:
        q, k, v = _qkv(**kw)
        fa.forward(q, k, v)
        fa.forward(q, k, v, return_lse=True)
        fa.forward(q, k, v, causal=True)
        fa.forward(q[..., ::2].contiguous(), k[..., ::2].contiguous(), v[..., ::2].contiguous())  # D = 32
    # signatures: 3 shapes x (plain, lse, causal, D=32); the fourth shape repeats the first
    assert len(mod.calls) == 12 and flash_bind.bound_signatures() == (12, 0)
    assert mod.interface.launches == 32


def test_strides_are_part_of_the_signature(monkeypatch):
    """The kernel reads strides from its arguments, but FA4 chose it for the first call's; a tensor laid out
    otherwise (here heads-major) is recorded anew rather than launched with another call's choice."""
    mod, fa = _fa4(monkeypatch)
    q, k, v = _qkv()
    fa.forward(q, k, v)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    out = fa.forward(*strided)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert len(mod.calls) == 2 and flash_bind.bound_signatures() == (2, 0)


@pytest.mark.parametrize("path", ["split", "semaphore"])
def test_a_launch_that_is_not_exactly_the_call_is_never_bound(monkeypatch, path):
    """Split-KV partials combined after the launch, or a per-call scheduler tensor among its arguments:
    replaying the launch alone would be wrong, so every call takes the public function."""
    mod, fa = _fa4(monkeypatch, path)
    for seed in range(3):
        q, k, v = _qkv(seed=seed)
        out = fa.forward(q, k, v)
        torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert len(mod.calls) == 3 and flash_bind.bound_signatures() == (0, 1)


def test_without_the_known_internals_the_public_function_runs(monkeypatch):
    mod = fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())  # no interface module
    _every_call_is_public(mod, make_backend(B.FA, HOPPER))


def test_tensors_that_require_gradients_take_the_public_function(monkeypatch):
    mod, fa = _fa4(monkeypatch)
    q, k, v = (t.requires_grad_() for t in _qkv())
    with torch.no_grad():
        for _ in range(2):
            fa.forward(q, k, v)
    assert len(mod.calls) == 2 and flash_bind.bound_signatures() == (0, 0)


def test_the_compile_cache_is_restored_after_a_failing_recording(monkeypatch):
    mod, fa = _fa4(monkeypatch)
    cache = mod.interface._flash_attn_fwd.compile_cache
    q, k, v = _qkv()
    with pytest.raises(AssertionError):  # the stand-in refuses a last dimension that is not contiguous
        flash_bind.launch(mod.flash_attn_func, q[..., ::2], k[..., ::2], v[..., ::2], softmax_scale=None,
                          causal=False, return_lse=False)
    assert mod.interface._flash_attn_fwd.compile_cache is cache
    fa.forward(q, k, v)
    fa.forward(q, k, v)
    # the failed call and the recording went through the public function; nothing was remembered of the failure
    assert len(mod.calls) == 2 and mod.interface.launches == 3 and flash_bind.bound_signatures() == (1, 0)


def test_the_environment_can_keep_the_public_function(monkeypatch):
    mod, fa = _fa4(monkeypatch)
    monkeypatch.setenv(flash_bind.LAUNCH_ENV, "public")
    _every_call_is_public(mod, fa)


def test_a_misspelt_environment_value_is_an_error_naming_it(monkeypatch):
    _, fa = _fa4(monkeypatch)
    monkeypatch.setenv(flash_bind.LAUNCH_ENV, "off")
    with pytest.raises(ValueError, match="USP_ATTN_FA4_LAUNCH='off'"):
        fa.forward(*_qkv())
