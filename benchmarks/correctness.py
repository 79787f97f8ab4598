"""Part "correctness": every candidate and layer against an fp64 reference, on this device.

Relative error = ||out - ref|| / ||ref|| against an fp64 reference computed from the same (bf16)
inputs, so it measures only the kernel's own rounding. Bounds (bf16): 1e-2 for exact kernels
(REFERENCE §5 measured 2.2e-3: bf16 output rounding alone is ~2e-3) and 3e-2 for SageAttention,
which quantises Q and K to INT8 (measured 1.3e-2). LSE: max absolute error 1e-2 (accumulated in
fp32 from exact bf16 inputs). Without a GPU the CUDA code paths are also called on meta tensors
(aten's meta kernels check argument order and types), so a typo cannot waste a GPU call.
"""

from __future__ import annotations

import torch

import usp_attn
from usp_attn import LocalAttention, USPAttention

from benchmarks.kernels import CANDIDATES
from benchmarks.local_ring import run_local_ring, split_blocks
from benchmarks.suite import Context, short_error, skipped
from benchmarks.timing import random_qkv
from tests.helpers.reference import reference_attention

__all__ = ["correctness_part", "key_mask", "EXACT_TOL", "SAGE_TOL", "LSE_TOL"]

EXACT_TOL, SAGE_TOL, LSE_TOL = 1e-2, 3e-2, 1e-2
GPU = dict(shape=(1, 8, 2048, 128), dtype=torch.bfloat16, rings=(2, 4, 8))
CPU = dict(shape=(1, 2, 128, 64), dtype=torch.bfloat16, rings=(2, 4))


def key_mask(b: int, s: int, device) -> torch.Tensor:
    mask = torch.rand(b, s, generator=torch.Generator().manual_seed(5)) > 0.25
    mask[:, 0] = True  # every row keeps a key
    return mask.to(device)


def _check(what, fn, ref, ref_lse=None, tol=EXACT_TOL, note="") -> dict:
    try:
        res = fn()
        out, lse = res if isinstance(res, tuple) else (res, None)
        err = float((out.double() - ref).norm() / ref.norm())
        lse_err = None if lse is None or ref_lse is None else float((lse.double() - ref_lse).abs().max())
        ok = bool(torch.isfinite(out).all()) and err < tol and (lse_err is None or lse_err < LSE_TOL)
        return {"what": what, "rel_err": err, "lse_err": lse_err, "bound": tol, "result": "PASS" if ok else "FAIL",
                "note": note}
    except Exception as exc:
        return {"what": what, "bound": tol, "result": "ERROR", "note": short_error(exc)}


def correctness_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    b, h, s, d = cfg["shape"]
    dtype, scale = cfg["dtype"], d**-0.5
    q, k, v = random_qkv(cfg["shape"], dtype, ctx.device, seed=4)[0]
    ref, ref_lse = reference_attention(q, k, v, return_lse=True)
    ref_c, ref_c_lse = reference_attention(q, k, v, causal=True, return_lse=True)
    mask = key_mask(b, s, ctx.device)
    rows = []
    k_before = k.clone()
    for cand in CANDIDATES:
        reason = cand.reason(ctx.device)
        if reason:
            rows.append(skipped(cand.name, reason))
            continue
        tol = SAGE_TOL if "sage" in cand.name else EXACT_TOL
        kk = k.clone() if cand.mutates_k else k
        rows.append(_check(cand.name, lambda c=cand, kk=kk: c.call(q, kk, v, scale=scale), ref, ref_lse, tol))
        if cand.mutates_k:
            rows.append({"what": f"raw {cand.name} writes the caller's K", "result": "fact",
                         "note": f"mutated = {not torch.equal(kk, k)} (why the backend smooths out of place)"})
        elif not torch.equal(k, k_before):
            rows[-1].update(result="FAIL", note="wrote the caller's K")
            k.copy_(k_before)
        if cand.returns_lse:
            rows.append(_check(f"{cand.name}, causal", lambda c=cand: c.call(q, k, v, scale=scale, causal=True),
                               ref_c, ref_c_lse))
    layer = LocalAttention(h, d)
    rows.append(_check("LocalAttention auto, attend(return_lse=True)", lambda: layer.attend(q, k, v, return_lse=True),
                       ref, ref_lse, note="the per-hop ring call"))
    rows.append(_check("LocalAttention auto, causal", lambda: LocalAttention(h, d, causal=True)(q, k, v), ref_c))
    rows.append(_check("LocalAttention auto, key-padding mask", lambda: layer(q, k, v, attn_mask=mask),
                       reference_attention(q, k, v, mask=mask), note="masked calls route to a kernel with masks"))
    usp_attn.init_sequence_parallel(1, 1)
    try:
        rows.append(_check("USPAttention (world 1)", lambda: USPAttention(h, d)(q, k, v), ref))
    finally:
        usp_attn.destroy_sequence_parallel()
    causal_attend = LocalAttention(h, d, causal=True).attend
    for ring in cfg["rings"]:
        blocks, lengths = split_blocks(k, v, ring)
        rows.append(_check(f"ring_attention R={ring} (in-memory exchange)",
                           lambda: run_local_ring(layer.attend, q, blocks, lengths), ref))
        start = sum(lengths[:-1])
        rows.append(_check(f"ring_attention R={ring}, causal, last rank", lambda: run_local_ring(
            causal_attend, q[:, start:], blocks, lengths, ring_rank=ring - 1, causal=True), ref_c[:, start:]))
    if not ctx.cuda:
        rows += _meta_calls(cfg["shape"], dtype)
    return rows


def _meta_calls(shape, dtype) -> list[dict]:
    """The CUDA calls on meta tensors: output (and LSE) shapes as the real ones would have."""
    from usp_attn.backends.sdpa import TorchSDPABackend
    from usp_attn.platforms import Platform

    b, h, s, d = shape
    q, k, v = (torch.empty(b, s, h, d, dtype=dtype, device="meta") for _ in range(3))
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool, device="meta")
    calls = [(f"{c.name} on meta tensors", c.returns_lse, lambda c=c: c.call(q, k, v, scale=d**-0.5))
             for c in CANDIDATES if c.meta_checkable]
    for label, cap, m, x in (("cudnn", (9, 0), None, q), ("flash", (8, 0), None, q), ("efficient", (9, 0), mask, q),
                             ("efficient fp32", (9, 0), None, q.float())):
        impl = TorchSDPABackend(Platform.make("cuda", capability=cap))
        for lse in (False, True):
            calls.append((f"torch_sdpa CUDA path ({label}, return_lse={lse}) on meta tensors", lse,
                          lambda impl=impl, x=x, m=m, lse=lse: impl._cuda(x, k.to(x.dtype), v.to(x.dtype), False,
                                                                          d**-0.5, m, lse)))
    rows = []
    for what, want_lse, call in calls:
        try:
            res = call()
            out, lse = res if isinstance(res, tuple) else (res, None)
            ok = tuple(out.shape) == (b, s, h, d) and (not want_lse or tuple(lse.shape) == (b, h, s))
            rows.append({"what": what, "result": "PASS" if ok else "FAIL", "note": f"out {tuple(out.shape)}"
                         + (f", lse {tuple(lse.shape)}" if lse is not None else "")})
        except Exception as exc:
            rows.append({"what": what, "result": "ERROR", "note": short_error(exc)})
    return rows
