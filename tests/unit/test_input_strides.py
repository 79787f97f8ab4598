"""Inputs of any memory layout reach every kernel in a layout it reads correctly.

The kernels read raw pointers and strides: aten's CPU flash kernels read the head dim as
unit-stride whatever its stride is (a ``[..., ::2]`` slice gave LSE errors up to 1e31 and
NaN gradients), aten's CUDA ops raise, FlashAttention 2/4 assume it, FA4 also assumes
16-byte aligned pointers and strides. :class:`AttentionBackend` copies what a kernel cannot
read (and nothing else) before every ``forward`` and ``backward``; these tests check the
results against the fp64 reference for each kind of layout a caller can hand over, on the
real CPU kernels of ``torch_sdpa`` and on the stand-ins of the optional packages, which
assert the layout the real ones need (tests/helpers/fake_kernels.py).

Tolerances as in test_local_attention.py (outputs, LSE) and test_backward_kernels.py
(gradients: 2e-5 of the largest gradient for fp32).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import fake_kernels
from tests.helpers.reference import reference_attention
from tests.helpers.reference_grad import reference_grads
from tests.helpers.reference_lse import attention_lse_fp64
from usp_attn import AttentionBackendEnum as B
from usp_attn import LocalAttention, global_force_attn_backend
from usp_attn.platforms import Platform, override_platform
from usp_attn.backends import AttentionBackend, make_backend

FP32, BF16 = torch.float32, torch.bfloat16
OUT_TOL = {FP32: dict(atol=1e-5, rtol=1e-5), BF16: dict(atol=2**-7, rtol=2**-7)}
LSE_TOL = {FP32: dict(atol=1e-5, rtol=1e-5), BF16: dict(atol=1e-3, rtol=1e-3)}
GRAD_TOL = 2e-5
CPU = Platform.make("cpu")
B_, S, H, H_KV, D = 2, 11, 4, 2, 16

#: how a caller's tensor can sit in memory; True where the head dim is not unit-stride
LAYOUTS = {
    "contiguous": False,
    "every_other": True,  # x[..., ::2]
    "head_dim_outside": True,  # [B, D, S, H] storage, permuted to [B, S, H, D]
    "channels_last": True,  # .contiguous(memory_format=torch.channels_last): S innermost
    "bhsd": False,  # [B, H, S, D] storage, transposed
    "broadcast": False,  # stride 0 batch and heads (expand)
    "broadcast_head_dim": True,  # stride 0 head dim
    "misaligned": False,  # storage offset of one element: pointer not 16-byte aligned
}


def laid_out(layout, shape, g, dtype=FP32, requires_grad=False):
    """A random ``[B, S, H, D]`` tensor of ``shape`` in ``layout``; with ``requires_grad``
    a view of a leaf, as the projections of a model give."""
    b, s, h, d = shape

    def rnd(*size):
        return torch.randn(*size, generator=g).to(dtype).requires_grad_(requires_grad)

    if layout == "contiguous":
        x = rnd(b, s, h, d)
    elif layout == "every_other":
        x = rnd(b, s, h, 2 * d)[..., ::2]
    elif layout == "head_dim_outside":
        x = rnd(b, d, s, h).permute(0, 2, 3, 1)
    elif layout == "channels_last":
        x = rnd(b, s, h, d).contiguous(memory_format=torch.channels_last)
    elif layout == "bhsd":
        x = rnd(b, h, s, d).transpose(1, 2)
    elif layout == "broadcast":
        x = rnd(1, s, 1, d).expand(b, s, h, d)
    elif layout == "broadcast_head_dim":
        x = rnd(b, s, h, 1).expand(b, s, h, d)
    else:
        x = rnd(b * s * h * d + 1)[1:].view(b, s, h, d)
    assert x.shape == shape and (x.stride(-1) != 1) == LAYOUTS[layout]
    return x


def qkv(layout, *, s_q=S, s_k=S, h_kv=H_KV, dtype=FP32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(laid_out(layout, shape, g, dtype, requires_grad)
                 for shape in ((B_, s_q, H, D), (B_, s_k, h_kv, D), (B_, s_k, h_kv, D)))


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- torch_sdpa on CPU: the real aten kernels -------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_out_and_lse(layout, causal):
    q, k, v = qkv(layout)
    out, lse = LocalAttention(H, D, num_kv_heads=H_KV, causal=causal)(q, k, v, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(out.double(), ref_out, **OUT_TOL[FP32])
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL[FP32])


@pytest.mark.parametrize("layout", ["every_other", "channels_last", "broadcast_head_dim"])
def test_local_attention_bf16(layout):
    q, k, v = qkv(layout, dtype=BF16)
    out, lse = LocalAttention(H, D, num_kv_heads=H_KV)(q, k, v, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out.double(), ref_out, **OUT_TOL[BF16])
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL[BF16])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss", ["sum", "strided dout", "out and lse"])
def test_local_attention_gradients(layout, loss):
    """``sum`` makes autograd hand the backward a stride-0 ``dout``; ``strided dout`` one whose
    head dim is ``[..., ::2]``; ``out and lse`` adds the LSE's gradient (a second block backward)."""
    q, k, v = qkv(layout, requires_grad=True)
    causal = loss == "out and lse"
    out, lse = LocalAttention(H, D, num_kv_heads=H_KV, causal=causal)(q, k, v, return_lse=True)
    g = torch.Generator().manual_seed(1)
    if loss == "sum":
        dout, dlse = torch.ones(out.shape, dtype=torch.float64), None
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    elif loss == "strided dout":
        dout, dlse = torch.randn(B_, S, H, 2 * D, generator=g)[..., ::2], None
        grads = torch.autograd.grad(out, (q, k, v), grad_outputs=dout)
    else:
        dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
        grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_lse_fp64(q64, k64, v64, causal=causal)
    ref_loss = (ref_out * dout.double()).sum() + (0 if dlse is None else (ref_lse * dlse.double()).sum())
    ref = torch.autograd.grad(ref_loss, (q64, k64, v64))
    errors = [rel(got, want) for got, want in zip(grads, ref)]
    assert max(errors) <= GRAD_TOL, errors


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdpa_backward_with_strided_out_and_dout(layout):
    """The backward kernel reads q, k, v, out and dout: each in the caller's layout."""
    impl = make_backend(B.TORCH_SDPA, CPU)
    q, k, v = qkv(layout)
    out, lse = impl.forward(q, k, v, return_lse=True)
    g = torch.Generator().manual_seed(2)
    out = laid_out(layout, out.shape, g).copy_(out) if layout not in ("broadcast", "broadcast_head_dim") else out
    dout = laid_out(layout, out.shape, g)
    got = impl.backward(q, k, v, out, dout, lse)
    _, rq, rk, rv = reference_grads(q, k, v, dout)
    errors = [rel(a, b) for a, b in zip(got, (rq, rk, rv))]
    assert max(errors) <= GRAD_TOL, errors


def test_copies_only_what_the_kernel_cannot_read():
    """torch_sdpa's CPU kernels take any strides but the head dim's: a fused-projection view,
    a transposed or broadcast tensor and a misaligned one go through as they are."""
    impl = make_backend(B.TORCH_SDPA, CPU)
    g = torch.Generator().manual_seed(3)
    for layout, copied in LAYOUTS.items():
        t = laid_out(layout, (B_, S, H, D), g)
        got = impl.kernel_layout(t)
        assert (got is not t) == copied, layout
        assert got.stride(-1) == 1 and torch.equal(got, t)
    fused = torch.randn(B_, S, 3, H, D, generator=g).unbind(2)[1]
    assert impl.kernel_layout(fused) is fused


# ---- the optional packages' kernels, as stand-ins that assert their layout needs --------------
FA2 = Platform.make("cuda", capability=(8, 0), packages=["flash_attn"])
FA3 = Platform.make("cuda", capability=(9, 0), packages=["flash_attn_interface"])
FA4 = Platform.make("cuda", capability=(10, 0), packages=["flash_attn.cute"])
PACKAGES = {
    "fa2": (lambda: make_backend(B.FA, FA2),
            lambda: [fake_kernels.fake_flash_attn2(), fake_kernels.fake_flash_attn2_backward("2.8")]),
    "fa3": (lambda: make_backend(B.FA, FA3),
            lambda: [fake_kernels.add_flash_attn3_backward(fake_kernels.fake_flash_attn3(), "2026")]),
    "fa4": (lambda: make_backend(B.FA, FA4),
            lambda: [fake_kernels.fake_flash_attn4(), fake_kernels.fake_flash_attn4_backward()]),
    "aiter": (lambda: make_backend(B.AITER, Platform.make("rocm", packages=["aiter"])),
              lambda: [fake_kernels.fake_aiter(), fake_kernels.fake_aiter_backward()]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("package", PACKAGES)
def test_package_kernels_forward_and_backward(monkeypatch, package, layout):
    make_impl, make_fakes = PACKAGES[package]
    fakes = [fake_kernels.install(monkeypatch, mod) for mod in make_fakes()]
    impl = make_impl()
    q, k, v = qkv(layout)
    out, lse = impl.forward(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(out.double(), ref_out, **OUT_TOL[FP32])
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL[FP32])
    g = torch.Generator().manual_seed(4)
    dout = laid_out(layout, out.shape, g)
    strided_out = laid_out("every_other", out.shape, g).copy_(out)
    got = impl.backward(q, k, v, strided_out, dout, lse, causal=True)
    _, rq, rk, rv = reference_grads(q, k, v, dout, causal=True)
    assert max(rel(a, b) for a, b in zip(got, (rq, rk, rv))) <= GRAD_TOL
    assert sum(1 for mod in fakes for c in mod.calls if c.get("backward")) == 1


@pytest.mark.parametrize("layout", ["every_other", "misaligned", "broadcast_head_dim"])
def test_sage_kernels(monkeypatch, layout):
    fake_kernels.install(monkeypatch, fake_kernels.fake_sageattention(2))
    q, k, v = qkv(layout, h_kv=H)
    sage2 = Platform.make("cuda", capability=(9, 0), packages={"sageattention": "2.1"})
    out, lse = make_backend(B.SAGE_ATTN, sage2).forward(q, k, v, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out.double(), ref_out, **OUT_TOL[FP32])
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL[FP32])
    fake_kernels.install(monkeypatch, fake_kernels.fake_sageattn3())
    sage3 = Platform.make("cuda", capability=(10, 0), packages=["sageattn3"])
    out = make_backend(B.SAGE_ATTN_3, sage3).forward(q, k, v)
    torch.testing.assert_close(out.double(), ref_out, **OUT_TOL[FP32])


def test_flash_through_the_layer_and_the_compiled_op(monkeypatch):
    """The layer's call, and the custom op that torch.compile graphs call, reach FA4 with a
    layout it reads."""
    from usp_attn.backends.flash import _compiled_op

    fake = fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    q, k, v = qkv("every_other", dtype=BF16)
    ref_out, ref_lse = reference_attention(q, k, v, return_lse=True)
    global_force_attn_backend("fa")
    with override_platform(FA4):
        out = LocalAttention(H, D, num_kv_heads=H_KV)(q, k, v)
        op_out, op_lse = _compiled_op()(q, k, v, "fa4", D**-0.5, False, True)
    torch.testing.assert_close(out.double(), ref_out, **OUT_TOL[BF16])
    torch.testing.assert_close(op_out.double(), ref_out, **OUT_TOL[BF16])
    torch.testing.assert_close(op_lse.double(), ref_lse, **LSE_TOL[BF16])
    assert len(fake.calls) == 2


def test_a_new_backend_gets_the_same_layout():
    """The layout is applied by the base class to every subclass's forward and backward, so a
    backend added later cannot forget it; the methods keep their identity for introspection."""

    class Recording(AttentionBackend):
        name = B.TORCH_SDPA
        platform_kinds = frozenset({"cpu"})

        def forward(self, q, k, v, **kwargs):
            """Recording.forward"""
            self.seen = [t.stride(-1) for t in (q, k, v)]
            return q

        def backward(self, q, k, v, out, dout, lse, **kwargs):
            self.seen = [t.stride(-1) for t in (q, k, v, out, dout)]
            return q, k, v

        def forward_block_sparse(self, q, k, v, plan, *, softmax_scale=None):
            self.seen = [t.stride(-1) for t in (q, k, v)]
            return q, None

    impl = Recording(CPU)
    q, k, v = qkv("channels_last", h_kv=H)
    impl.forward(q, k, v, causal=False)
    assert impl.seen == [1, 1, 1]
    impl.backward(q, k, v, q, torch.ones(()).expand(q.shape), torch.zeros(B_, H, S))
    assert impl.seen == [1] * 5
    impl.forward_block_sparse(q, k, v, None)
    assert impl.seen == [1, 1, 1]
    assert Recording.forward.__doc__ == "Recording.forward" and Recording.backward is not AttentionBackend.backward
