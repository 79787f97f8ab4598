"""``return_lse=True`` on one process: LocalAttention's (out, lse) against the fp64 reference,
exact gradients through the LSE (block_backward's second call), and USPAttention without a
sequence-parallel group (K/V-only replicated rows, mask forms, argument errors).

Tolerances: fp32 output and LSE 2e-5 absolute (CPU flash kernel, fp32 accumulation over <= 40
keys); fp32 gradients 2e-4 of the largest reference gradient (measured ~1e-6); fp64 1e-10.
"""

from __future__ import annotations

import pytest
import torch

import usp_attn
from tests.helpers.reference import reference_attention
from tests.helpers.reference_lse import attention_lse_fp64, finite
from usp_attn.backends.sdpa import TorchSDPABackend
from usp_attn.kernels import block_backward
from usp_attn.platforms import current_platform

GEN = torch.Generator().manual_seed(11)


def _qkv(s_q=13, s_k=17, heads=4, kv_heads=2, dim=8, dtype=torch.float32, batch=2):
    q = torch.randn(batch, s_q, heads, dim, generator=GEN, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, s_k, kv_heads, dim, generator=GEN, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, s_k, kv_heads, dim, generator=GEN, dtype=torch.float64).to(dtype)
    return q, k, v


def _padding(batch, s_k):
    keep = torch.rand(batch, s_k, generator=GEN) > 0.3
    keep[-1] = False  # a batch row with no key at all: out 0, lse -inf
    return keep


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("dtype,out_tol,lse_dtype", [
    (torch.float32, 2e-5, torch.float32), (torch.float64, 1e-10, torch.float64), (torch.bfloat16, None, torch.float32),
])
@pytest.mark.parametrize("form", ["none", "bool_padding", "additive_4d", "bool_per_head_4d", "causal"])
def test_local_attention_returns_the_lse(dtype, out_tol, lse_dtype, form):
    causal = form == "causal"
    q, k, v = _qkv(s_k=13 if causal else 17, dtype=dtype)
    mask = None
    if form == "bool_padding":
        mask = _padding(2, k.shape[1])
    elif form == "additive_4d":  # [B, 1, 1, S_k]: broadcast over heads and queries, as SDPA takes it
        mask = torch.where(_padding(2, k.shape[1]), 0.3, float("-inf"))[:, None, None, :].to(dtype)
    elif form == "bool_per_head_4d":  # [B, H, 1, S_k]
        mask = torch.rand(2, 4, 1, k.shape[1], generator=GEN) > 0.4
    layer = usp_attn.LocalAttention(4, 8, 2, causal=causal)
    out, lse = layer(q, k, v, attn_mask=mask, return_lse=True)
    want_out, want_lse = reference_attention(q, k, v, causal=causal, mask=mask, return_lse=True)
    assert lse.shape == (2, 4, q.shape[1]) and lse.dtype == lse_dtype
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite_rows = ~torch.isneginf(want_lse)
    out_tol = out_tol if out_tol is not None else 2.0**-6 * want_out.abs().max().item()
    assert (out.double() - want_out).abs().max() <= out_tol
    assert (lse.double() - want_lse)[finite_rows].abs().max() <= max(out_tol, 2e-5)
    # The plain call may run another kernel (no LSE asked for): the same output within the tolerance.
    assert (layer(q, k, v, attn_mask=mask).double() - out.double()).abs().max() <= out_tol


@pytest.mark.parametrize("loss", ["out_and_lse", "lse_only"])
@pytest.mark.parametrize("form", ["none", "bool_padding", "causal"])
def test_gradients_through_the_lse(loss, form):
    causal = form == "causal"
    q, k, v = _qkv(s_k=13 if causal else 17)
    mask = _padding(2, k.shape[1]) if form == "bool_padding" else None
    dout = torch.randn(q.shape, generator=GEN, dtype=torch.float64)
    dlse = torch.randn(2, 4, q.shape[1], generator=GEN, dtype=torch.float64)

    def objective(out, lse):
        value = (finite(lse) * dlse.to(lse.dtype)).sum()
        return value + (out * dout.to(out.dtype)).sum() if loss == "out_and_lse" else value

    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    objective(*usp_attn.LocalAttention(4, 8, 2, causal=causal)(*ours, attn_mask=mask, return_lse=True)).backward()
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    objective(*attention_lse_fp64(*ref, causal=causal, mask=mask)).backward()
    if loss == "lse_only":  # the LSE does not depend on v
        assert ref[2].grad is None and ours[2].grad.abs().max() == 0
        ours, ref = ours[:2], ref[:2]
    for got, want in zip(ours, ref):
        assert _rel(got.grad, want.grad) <= 2e-4


def test_gradcheck_out_and_lse_fp64():
    q, k, v = (t.requires_grad_() for t in _qkv(s_q=5, s_k=6, heads=2, kv_heads=1, dim=4, dtype=torch.float64,
                                                batch=1))
    mask = torch.tensor([[True, True, False, True, True, False]])
    layer = usp_attn.LocalAttention(2, 4, 1)
    assert torch.autograd.gradcheck(lambda *t: layer(*t, attn_mask=mask, return_lse=True), (q, k, v))


def test_block_backward_with_dlse_over_two_key_blocks():
    """The CPU flash backward kernel, two key blocks, the full row's out and LSE: dq summed over the
    blocks and each block's dk/dv equal fp64 autograd of a loss through out AND lse."""
    q, k, v = _qkv(s_q=11, s_k=20)
    dout = torch.randn(q.shape, generator=GEN)
    dlse = torch.randn(2, 4, 11, generator=GEN)
    impl = TorchSDPABackend(current_platform())
    out, lse = impl.forward(q, k, v, return_lse=True)
    dq = torch.zeros_like(q)
    block_grads = []
    for keys in (slice(0, 8), slice(8, 20)):
        bdq, bdk, bdv = block_backward(impl.backward, q, k[:, keys], v[:, keys], out, dout, lse, dlse)
        dq += bdq
        block_grads.append((bdk, bdv))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_lse_fp64(*ref)
    ((ref_out * dout.double()).sum() + (ref_lse * dlse.double()).sum()).backward()
    assert _rel(dq, ref[0].grad) <= 2e-4
    assert _rel(torch.cat([g[0] for g in block_grads], 1), ref[1].grad) <= 2e-4
    assert _rel(torch.cat([g[1] for g in block_grads], 1), ref[2].grad) <= 2e-4


def test_sp_layer_without_group_kv_only_rows_and_mask_forms():
    """No sequence-parallel state: the layer is LocalAttention, with the same argument contract."""
    q, k, v = _qkv(s_q=9, s_k=9 + 3 + 2)
    mask = torch.where(_padding(2, k.shape[1]), 0.0, float("-inf"))[:, None, None, :]
    layer = usp_attn.USPAttention(4, 8, 2)
    out, lse = layer(q, k, v, attn_mask=mask, num_replicated_kv_prefix=3, num_replicated_kv_suffix=2,
                     return_lse=True)
    want_out, want_lse = reference_attention(q, k, v, mask=mask, return_lse=True)
    assert (out.double() - want_out).abs().max() <= 2e-5
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    with pytest.raises(ValueError, match="num_replicated_kv_prefix=2 and num_replicated_kv_suffix=2 make 13"):
        layer(q, k, v, num_replicated_kv_prefix=2, num_replicated_kv_suffix=2)
    with pytest.raises(ValueError, match="causal=True cannot be combined with replicated tokens"):
        usp_attn.USPAttention(4, 8, 2, causal=True)(q, k, v, num_replicated_kv_prefix=5)
    with pytest.raises(ValueError, match="return_lse must be True or False"):
        usp_attn.LocalAttention(4, 8, 2)(q, k, v, return_lse="yes")
    with pytest.raises(ValueError, match="load_balance must be True, False or None"):
        layer(q, k, v, load_balance="zigzag")
