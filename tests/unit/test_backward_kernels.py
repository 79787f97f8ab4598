"""Backward kernels per backend, and LocalAttention's gradients.

Each backend's ``backward(q, k, v, out, dout, lse)`` is checked the way the ring uses it:
keys split into blocks, every block given the output and LSE of the WHOLE row; the sum of
the blocks' dq and the blocks' dk/dv must equal fp64 autograd of full attention.
torch_sdpa runs its real CPU kernels; the CUDA aten ops and the optional packages run as
stand-ins with the real calling conventions (tests/helpers/fake_kernels.py, and a fake
``torch.ops.aten`` namespace below). Tolerances: fp32 kernels, O(1) values, <= 24 keys:
errors are a few fp32 ulps of the largest gradient (measured <= 5e-7 relative); we allow
2e-5 relative. fp64 inputs: the LSE contract is fp32, so probabilities carry ~1e-7
relative error: 1e-6 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import fake_kernels
from tests.helpers.reference_grad import reference_grads
from usp_attn import AttentionBackendEnum as B
from usp_attn import AttentionBackendUnavailableError, LocalAttention, global_force_attn_backend
from usp_attn.platforms import Platform, override_platform
from usp_attn.backends import make_backend, sdpa_backward
from usp_attn.masks import normalize_mask

CPU = Platform.make("cpu")


def inputs(b=2, s_q=9, s_k=13, h=4, h_kv=2, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, n, d, generator=g) for s, n in ((s_q, h), (s_k, h_kv), (s_k, h_kv)))
    dout = torch.randn(b, s_q, h, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def blockwise(impl, q, k, v, dout, *, scale=None, causal=False, mask=None, splits=(5,)):
    """The ring's use of a backend: forward merged over all keys, backward block by block."""
    out, lse = impl.forward(q, k, v, causal=causal, softmax_scale=scale, attn_mask=mask, return_lse=True)
    bounds = [0, *splits, k.shape[1]]
    dq = torch.zeros(q.shape, dtype=torch.float64)
    dks, dvs = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        block_mask = None if mask is None else mask[..., a:b]
        # causal across blocks: only the diagonal (S_q == S_k, one block) is meaningful here
        bdq, bdk, bdv = impl.backward(q, k[:, a:b], v[:, a:b], out, dout, lse, causal=causal, softmax_scale=scale,
                                      attn_mask=block_mask)
        dq += bdq.double()
        dks.append(bdk)
        dvs.append(bdv)
    return dq, torch.cat(dks, 1), torch.cat(dvs, 1)


def assert_grads(got, q, k, v, dout, tol, **ref_kwargs):
    _, rq, rk, rv = reference_grads(q, k, v, dout, **ref_kwargs)
    errors = [rel(g, r) for g, r in zip(got, (rq, rk, rv))]
    assert max(errors) <= tol, errors
    return errors


# ---- torch_sdpa, real CPU kernels ---------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-6)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_sdpa_cpu_blockwise_matches_fp64_autograd(dtype, tol, scale):
    q, k, v, dout = inputs(dtype=dtype)
    impl = make_backend(B.TORCH_SDPA, CPU)
    got = blockwise(impl, q, k, v, dout, scale=scale, splits=(4, 9))
    assert_grads(got, q, k, v, dout, tol, scale=scale)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-6)])
def test_sdpa_cpu_key_mask_with_empty_rows(dtype, tol):
    """Key padding per block; batch row 1 has no attendable key: its gradients are exactly 0."""
    q, k, v, dout = inputs(dtype=dtype)
    keep = torch.rand(2, 13, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[1] = False
    mask = normalize_mask(keep, batch=2, num_heads=4, s_q=9, s_k=13, dtype=dtype, device=q.device)
    impl = make_backend(B.TORCH_SDPA, CPU)
    dq, dk, dv = blockwise(impl, q, k, v, dout, mask=mask, splits=(6,))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert dq[1].abs().max() == 0 and dk[1].abs().max() == 0 and dv[1].abs().max() == 0
    assert_grads((dq, dk, dv), q, k, v, dout, tol, mask=keep)


def test_sdpa_cpu_causal_and_per_query_mask():
    q, k, v, dout = inputs(s_q=11, s_k=11)
    impl = make_backend(B.TORCH_SDPA, CPU)
    got = blockwise(impl, q, k, v, dout, causal=True, splits=())
    assert_grads(got, q, k, v, dout, 2e-5, causal=True)
    per_query = torch.rand(2, 11, 11, generator=torch.Generator().manual_seed(2)) > 0.4  # -> the math path
    per_query[:, :, 0] = True
    mask = normalize_mask(per_query, batch=2, num_heads=4, s_q=11, s_k=11, dtype=q.dtype, device=q.device)
    got = blockwise(impl, q, k, v, dout, mask=mask, splits=(3,))
    assert_grads(got, q, k, v, dout, 2e-5, mask=per_query)


class _FakeAten:
    """The three CUDA aten backward ops, with their schemas' argument order and layouts
    ([B, H, S, D], kv heads already expanded), computing the block backward in fp64."""

    def __init__(self, lse_4d: bool):
        self.lse_4d, self.calls = lse_4d, []

    def _grads(self, gt, qt, kt, vt, ot, lse, causal, scale):
        assert qt.shape[1] == kt.shape[1] == vt.shape[1], "kv heads must be expanded for the aten ops"
        tr = lambda t: t.transpose(1, 2)  # noqa: E731
        return tuple(tr(g) for g in fake_kernels._block_backward(tr(qt), tr(kt), tr(vt), tr(ot), tr(gt), lse,
                                                                 scale, causal))

    def _scaled_dot_product_cudnn_attention_backward(self, gt, qt, kt, vt, ot, lse, seed, offset, bias, cq, ck,
                                                      max_q, max_k, dropout_p, causal, *, scale):
        assert (max_q, max_k, dropout_p, bias, cq) == (qt.shape[2], kt.shape[2], 0.0, None, None)
        assert lse.dim() == (4 if self.lse_4d else 3)
        self.calls.append("cudnn")
        return self._grads(gt, qt, kt, vt, ot, lse[..., 0] if self.lse_4d else lse, causal, scale)

    def _scaled_dot_product_flash_attention_backward(self, gt, qt, kt, vt, ot, lse, cq, ck, max_q, max_k,
                                                      dropout_p, causal, seed, offset, *, scale):
        assert (max_q, max_k, dropout_p) == (qt.shape[2], kt.shape[2], 0.0)
        self.calls.append("flash")
        return self._grads(gt, qt, kt, vt, ot, lse, causal, scale)

    def _scaled_dot_product_efficient_attention_backward(self, gt, qt, kt, vt, bias, ot, lse, seed, offset,
                                                          dropout_p, grad_input_mask, causal, *, scale):
        s_q = qt.shape[2]
        assert lse.shape[-1] == math.ceil(s_q / 32) * 32 and list(grad_input_mask) == [True, True, True, False]
        assert bias is None  # these checks run unmasked; the masked path differs only in the bias
        self.calls.append("efficient")
        return self._grads(gt, qt, kt, vt, ot, lse[..., :s_q].contiguous(), causal, scale) + (None,)


@pytest.mark.parametrize("kernel,lse_4d", [("cudnn", False), ("cudnn", True), ("flash", False), ("efficient", False)])
def test_sdpa_cuda_backward_ops_plumbing(monkeypatch, kernel, lse_4d):
    """Layouts, GQA expansion/summing, LSE shapes and argument order of the CUDA aten calls
    (cuDNN: the LSE rank of this torch's forward, older releases return [B, H, S, 1])."""
    fake = _FakeAten(lse_4d)
    monkeypatch.setattr(sdpa_backward, "_aten", fake)
    monkeypatch.setattr(sdpa_backward, "_cudnn_lse_is_4d", lambda index: lse_4d)
    q, k, v, dout = inputs()
    ref_out, rq, rk, rv = reference_grads(q, k, v, dout, scale=0.2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, dim=2)) * 0.2
    got = sdpa_backward.cuda_fused_backward(kernel, q, k, v, ref_out.float(), dout, torch.logsumexp(scores, -1).float(),
                                            causal=False, scale=0.2)
    assert fake.calls == [kernel]
    assert max(rel(g, r) for g, r in zip(got, (rq, rk, rv))) <= 2e-5


# ---- optional packages (stand-ins with the real conventions) ------------------------------------
def _fa(generation, capability, package):
    return make_backend(B.FA, Platform.make("cuda", capability=capability, packages=[package]))


FA_BACKWARD = {
    "fa2-2.6": (lambda: _fa("fa2", (8, 0), "flash_attn"), lambda: [fake_kernels.fake_flash_attn2_backward("2.6")]),
    "fa2-2.8": (lambda: _fa("fa2", (8, 0), "flash_attn"), lambda: [fake_kernels.fake_flash_attn2_backward("2.8")]),
    "fa3-2024": (lambda: _fa("fa3", (9, 0), "flash_attn_interface"),
                 lambda: [fake_kernels.add_flash_attn3_backward(fake_kernels.fake_flash_attn3(), "2024")]),
    "fa3-2025": (lambda: _fa("fa3", (9, 0), "flash_attn_interface"),
                 lambda: [fake_kernels.add_flash_attn3_backward(fake_kernels.fake_flash_attn3(), "2025")]),
    "fa3-2026": (lambda: _fa("fa3", (9, 0), "flash_attn_interface"),
                 lambda: [fake_kernels.add_flash_attn3_backward(fake_kernels.fake_flash_attn3(), "2026")]),
    "fa4": (lambda: _fa("fa4", (10, 0), "flash_attn.cute"),
            lambda: [fake_kernels.fake_flash_attn4(), fake_kernels.fake_flash_attn4_backward()]),
    "aiter": (lambda: make_backend(B.AITER, Platform.make("rocm", packages=["aiter"])),
              lambda: [fake_kernels.fake_aiter(), fake_kernels.fake_aiter_backward()]),
}


@pytest.mark.parametrize("name", FA_BACKWARD)
@pytest.mark.parametrize("causal,scale", [(False, None), (True, 0.07)])
def test_package_backward_blockwise(monkeypatch, name, causal, scale):
    make_impl, make_fakes = FA_BACKWARD[name]
    fakes = [fake_kernels.install(monkeypatch, mod) for mod in make_fakes()]
    if name.startswith("fa2"):
        fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn2())
    impl = make_impl()
    assert impl.supports_backward(impl.platform)
    q, k, v, dout = inputs(s_q=13, s_k=13)
    got = blockwise(impl, q, k, v, dout, scale=scale, causal=causal, splits=() if causal else (5,))
    assert_grads(got, q, k, v, dout, 2e-5, scale=scale, causal=causal)
    backward_calls = [c for mod in fakes for c in mod.calls if c.get("backward")]
    expected_scale = 16**-0.5 if scale is None else scale  # the default scale is passed explicitly
    assert len(backward_calls) == (1 if causal else 2)
    assert all(c["causal"] == causal and c["softmax_scale"] == pytest.approx(expected_scale) for c in backward_calls)


def test_backward_declarations():
    sm100 = Platform.make("cuda", capability=(10, 0), packages=["flash_attn.cute"])
    assert make_backend(B.FA, sm100).supports_backward(sm100)
    bare = Platform.make("cuda", capability=(9, 0))
    assert not make_backend(B.FA, bare).supports_backward(bare)  # no FlashAttention installed
    assert make_backend(B.TORCH_SDPA, CPU).supports_backward(CPU)


# ---- LocalAttention ---------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,masked", [(False, False), (False, True), (True, False), (True, True)])
def test_local_attention_gradcheck_fp64(causal, masked):
    """Full Jacobian check of the recorded kernel call (torch_sdpa on CPU: the math path in fp64)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 5, h, 4, generator=g, dtype=torch.float64, requires_grad=True) for h in (2, 1, 1))
    mask = None
    if masked:
        mask = torch.tensor([[True, False, True, True, False]])
    attn = LocalAttention(2, 4, 1, softmax_scale=0.7, causal=causal)
    assert torch.autograd.gradcheck(lambda q, k, v: attn(q, k, v, attn_mask=mask), (q, k, v))


def test_local_attention_fp32_gradients_and_no_grad_path():
    q, k, v, dout = inputs(s_q=12, s_k=12)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 7:] = False
    attn = LocalAttention(4, 16, 2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attn(*leaves, attn_mask=keep)
    (out * dout).sum().backward()
    assert_grads([t.grad for t in leaves], q, k, v, dout, 2e-5, mask=keep)
    with torch.no_grad():
        assert attn(*leaves, attn_mask=keep).grad_fn is None
    plain = attn(q, k, v, attn_mask=keep)
    assert plain.grad_fn is None
    assert rel(out.detach(), plain) < 1e-6


def test_mask_that_requires_grad_is_refused():
    q, k, v, _ = inputs(s_q=4, s_k=4)
    bias = torch.zeros(2, 1, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask requires grad"):
        LocalAttention(4, 16, 2)(q.requires_grad_(), k, v, attn_mask=bias)


@pytest.mark.parametrize("backend,platform", [
    ("sage_attn", Platform.make("cuda", capability=(9, 0), packages={"sageattention": "2.1.1"})),
    ("sage_attn_3", Platform.make("cuda", capability=(10, 0), packages={"sageattn3": "1.0.0"})),
])
def test_backend_without_backward_is_a_clear_error(backend, platform):
    """Gradients required through an explicit Sage backend: an error before any kernel runs,
    naming the backends that have a backward; without gradients the same call is allowed."""
    q = torch.randn(1, 8, 4, 64, dtype=torch.bfloat16)
    with override_platform(platform):
        global_force_attn_backend(backend)
        attn = LocalAttention(4, 64)
        assert attn.selection(torch.bfloat16).backend == B(backend)
        with pytest.raises(AttentionBackendUnavailableError) as err:
            attn(q.clone().requires_grad_(), q, q)
    message = str(err.value)
    assert f"'{backend}' has no backward kernel" in message
    assert "fa, torch_sdpa, aiter" in message and "torch.no_grad()" in message
    assert not make_backend(B(backend), platform).supports_backward(platform)
