"""Every attention candidate the benchmark suite times (benchmarks/kernels.py: raw kernels and
``LocalAttention`` with each backend forced), the automatic layer and one rank's ring (the in-memory
exchange of benchmarks/local_ring.py, which the ring-hops part times) against an fp64 reference.

So a number in the suite's report is the speed of a call that computes attention. Relative error
against the fp64 reference of the same bf16 inputs (the kernel's own rounding only). Bounds, as the
suite's correctness part had them: 1e-2 for exact kernels (2.2e-3 measured on an H100: bf16 output
rounding alone is ~2e-3), 3e-2 for SageAttention (INT8 Q and K; measured 1.3e-2); LSE max absolute
error 1e-2. The LSE bound is looser than tests/gpu/common.py's because this sequence is twice as long
and the candidates include raw kernels whose LSE comes back in their own format (trimmed to
``[B, H, S]`` by the candidate).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.kernels import CANDIDATES
from benchmarks.local_ring import run_local_ring, split_blocks
from tests.gpu.common import GPU, key_padding_mask, make_qkv, rel_err
from tests.helpers.reference import reference_attention
from usp_attn import LocalAttention

pytestmark = GPU

EXACT_TOL, SAGE_TOL, LSE_TOL = 1e-2, 3e-2, 1e-2
B, H, S, D = 1, 8, 2048, 128
RINGS = (2, 4, 8)


@pytest.fixture(scope="module")
def inputs():
    q, k, v = make_qkv(B, S, H, D, torch.bfloat16, seed=4)
    ref, ref_lse = reference_attention(q, k, v, return_lse=True)
    ref_c, ref_c_lse = reference_attention(q, k, v, causal=True, return_lse=True)
    return {"qkv": (q, k, v), "ref": (ref, ref_lse), "causal": (ref_c, ref_c_lse)}


def _check(res, ref, ref_lse=None, tol=EXACT_TOL) -> None:
    out, lse = res if isinstance(res, tuple) else (res, None)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < tol, f"rel err {err:.2e} >= {tol:.0e}"
    if lse is not None and ref_lse is not None:
        lse_err = float((lse.double() - ref_lse).abs().max())
        assert lse_err < LSE_TOL, f"LSE max abs err {lse_err:.2e}"


def _call(cand, q, k, v, *, causal=False):
    return cand.bind(q.shape[2], q.shape[3], scale=q.shape[3] ** -0.5, causal=causal)(q, k, v)


@pytest.mark.parametrize("cand", CANDIDATES, ids=lambda c: c.name)
def test_candidate_matches_fp64(inputs, cand):
    reason = cand.reason("cuda")
    if reason:
        pytest.skip(reason)
    q, k, v = inputs["qkv"]
    before = k.clone()
    kk = k.clone() if cand.mutates_k else k  # one that writes its k (Sage 1's smooth_k) gets a k of its own
    _check(_call(cand, q, kk, v), *inputs["ref"], tol=SAGE_TOL if "sage" in cand.name else EXACT_TOL)
    assert torch.equal(k, before), f"{cand.name} wrote the caller's K"
    if cand.returns_lse:
        _check(_call(cand, q, k, v, causal=True), *inputs["causal"])


def test_auto_layer_matches_fp64(inputs):
    q, k, v = inputs["qkv"]
    layer = LocalAttention(H, D)
    _check(layer.attend(q, k, v, return_lse=True), *inputs["ref"])  # the per-hop ring call
    _check(LocalAttention(H, D, causal=True)(q, k, v), inputs["causal"][0])
    mask = key_padding_mask(B, S, seed=5, drop=0.25)  # masked calls route to a kernel that takes masks
    _check(layer(q, k, v, attn_mask=mask), reference_attention(q, k, v, mask=mask))


@pytest.mark.parametrize("ring", RINGS)
def test_one_ring_rank_matches_fp64(inputs, ring):
    """ring_attention over R contiguous blocks, fed from memory: every query; causal: the last rank's."""
    q, k, v = inputs["qkv"]
    blocks, lengths = split_blocks(k, v, ring)
    _check(run_local_ring(LocalAttention(H, D).attend, q, blocks, lengths), inputs["ref"][0])
    start = sum(lengths[:-1])
    causal = run_local_ring(LocalAttention(H, D, causal=True).attend, q[:, start:], blocks, lengths,
                            ring_rank=ring - 1, causal=True)
    _check(causal, inputs["causal"][0][:, start:])
