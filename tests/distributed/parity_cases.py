"""Cases for the peers' API (LSE, K/V-only replicated rows, SP mask forms, zigzag layout), run
inside spawned gloo groups by test_api_parity.py.

Each scenario builds the full inputs from a fixed seed on every rank, cuts this rank's rows,
and compares the layer's output AND log-sum-exp with an fp64 reference over the full sequence
(tests/helpers/reference_lse.py), then backpropagates a loss through both and compares
dq/dk/dv with fp64 autograd. Rank r's loss is

    sum(out_r * G) + sum(lse_r * G_lse)   over its rows, replicated rows weighted 1/W

so the ranks' losses add up to the one-process loss (the convention of collectives_grad):
sharded rows get exactly the reference gradient, replicated rows (q's and the K/V-only ones)
1/W of it on every rank.

Tolerances (fp32, as sp_cases/grad_cases argue): output 2e-5 absolute; LSE 2e-5 absolute
(|lse| < 10 here, so ~20 fp32 ulps of headroom over a few merges); gradients 2e-4 of the
largest reference gradient (measured <= 1e-6). fp64 (the kernels' math path and the ring merge
keep fp64, the LSE is fp64): 1e-10 for everything, relative for gradients (measured ~1e-15). bf16: inputs are rounded before the reference
sees them; output 2^-6 of the largest value (as sp_cases); LSE 2^-8 of the largest |lse| (the
kernel computes it in fp32 from the bf16 inputs, but rounds q.k products; measured 6e-5
absolute at |lse| ~ 4, i.e. ~2^-16 relative).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import usp_attn
from tests.distributed.sp_cases import ensure_layout
from tests.helpers.reference_lse import attention_lse_fp64, finite
from usp_attn.ring.plan import ring_front_lengths
from usp_attn.ulysses.heads import HeadPlan
from usp_attn.ring.plan import RingLayout, pairs_attended

ATOL, LSE_ATOL, GRAD_RTOL, FP64_TOL = 2e-5, 2e-5, 2e-4, 1e-10

SCENARIOS: dict[str, dict] = {
    "lse_gqa_uneven": dict(heads=4, kv_heads=2, length=29),
    "lse_replicated_bool_mask": dict(heads=4, kv_heads=2, length=26, prefix=3, suffix=2, mask="bool"),
    "kv_only_prefix_suffix": dict(heads=4, kv_heads=4, length=27, kv_prefix=4, kv_suffix=2),
    "kv_only_and_replicated_additive_4d": dict(heads=6, kv_heads=3, length=23, prefix=2, kv_prefix=3, kv_suffix=1,
                                               mask="additive4d"),
    "mask_bool_4d_mqa": dict(heads=4, kv_heads=1, length=25, mask="bool4d"),
    "mask_additive_bias": dict(heads=4, kv_heads=4, length=22, mask="additive"),
    "causal_contiguous": dict(heads=4, kv_heads=4, length=33, causal=True),
    "zigzag_causal": dict(heads=4, kv_heads=4, length=37, causal=True, balanced=True),
    "zigzag_causal_masked_padded_heads": dict(heads=6, kv_heads=2, length=35, causal=True, balanced=True, mask="bool"),
    "zigzag_replicated_kv_only": dict(heads=4, kv_heads=2, length=30, prefix=2, kv_suffix=3, balanced=True),
    "zigzag_causal_bf16": dict(heads=4, kv_heads=2, length=34, causal=True, balanced=True, dtype="bfloat16"),
    "zigzag_causal_fp64_masked": dict(heads=4, kv_heads=2, length=31, causal=True, balanced=True, mask="bool",
                                      dtype="float64"),
    "kv_only_fp64": dict(heads=4, kv_heads=4, length=21, prefix=1, kv_prefix=2, kv_suffix=3, dtype="float64"),
    # replicated_key_mask: text padding only (the sharded keys all attended), as joint attention has it
    "replicated_key_mask_bool": dict(heads=4, kv_heads=2, length=26, suffix=5, mask="replicated_bool"),
    "replicated_key_mask_additive_kv_only": dict(heads=6, kv_heads=3, length=23, prefix=2, kv_prefix=3, kv_suffix=2,
                                                 mask="replicated_additive"),
    "replicated_key_mask_fp64": dict(heads=4, kv_heads=4, length=21, prefix=3, kv_suffix=2,
                                     mask="replicated_bool", dtype="float64"),
}


def _inputs(p: dict, seed: int = 0):
    """Full fp64 q [B, n_q, H, D], k/v [B, n_k, H_kv, D], key mask over n_k, and loss weights."""
    gen = torch.Generator().manual_seed(seed)
    batch, dim = 2, 8
    pre, suf, kv_pre, kv_suf = (p.get(n, 0) for n in ("prefix", "suffix", "kv_prefix", "kv_suffix"))
    n_q, n_k = pre + p["length"] + suf, kv_pre + pre + p["length"] + suf + kv_suf
    q = torch.randn(batch, n_q, p["heads"], dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, n_k, p["kv_heads"], dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, n_k, p["kv_heads"], dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    dlse = torch.randn(batch, p["heads"], n_q, generator=gen, dtype=torch.float64)
    mask = None
    if p.get("mask"):
        keep = torch.rand(batch, n_k, generator=gen) > 0.35
        keep[-1] = False  # last batch row: one key near the end; earlier causal rows see none (lse -inf)
        keep[-1, n_k - 2] = True
        if p["mask"].startswith("replicated"):  # only the replicated keys masked
            keep[:, kv_pre + pre : kv_pre + pre + p["length"]] = True
        mask = keep
        if "additive" in p["mask"]:  # a general additive bias, -inf where masked
            bias = 0.5 * torch.randn(batch, n_k, generator=gen, dtype=torch.float64)
            if p["mask"].startswith("replicated"):  # the sharded keys: attended, no bias
                bias[:, kv_pre + pre : kv_pre + pre + p["length"]] = 0.0
            mask = torch.where(keep, bias, torch.full((), float("-inf"), dtype=torch.float64)).float()
        if p["mask"].endswith("4d"):
            mask = mask[:, None, None, :]
    dtype = getattr(torch, p.get("dtype", "float32"))
    # Rounded to the run's dtype first, so the reference sees exactly the layer's inputs.
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    return q, k, v, mask, dout, dlse, dtype


def _cut(x: torch.Tensor, before: int, length: int, dim: int, balanced: bool) -> torch.Tensor:
    """This rank's rows: the ``before`` replicated rows, its shard of the next ``length``, the rest."""
    mid = usp_attn.shard_sequence(x.narrow(dim, before, length), dim=dim, load_balance=balanced)
    rest = x.shape[dim] - before - length
    return torch.cat([x.narrow(dim, 0, before), mid, x.narrow(dim, before + length, rest)], dim=dim)


class _Rows:
    """Cuts the full tensors of a scenario into this rank's q rows and k rows."""

    def __init__(self, p: dict) -> None:
        self.p, self.length, self.balanced = p, p["length"], p.get("balanced", False)
        self.pre, self.suf = p.get("prefix", 0), p.get("suffix", 0)
        self.k_pre = p.get("kv_prefix", 0) + self.pre
        self.k_suf = self.suf + p.get("kv_suffix", 0)

    def q(self, x, dim=1):
        return _cut(x, self.pre, self.length, dim, self.balanced)

    def k(self, x, dim=1):
        return _cut(x, self.k_pre, self.length, dim, self.balanced)

    def lse(self, lse):  # [B, H, n_q] -> this rank's rows
        return self.q(lse, dim=2)

    def mask(self, mask):
        return None if mask is None else self.k(mask, dim=mask.dim() - 1)

    def replicated(self, local_mask):  # this rank's key mask -> its replicated keys' part
        n = local_mask.shape[-1]
        return torch.cat([local_mask[..., : self.k_pre], local_mask[..., n - self.k_suf :]], dim=-1)


def _lse_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |difference| over finite entries; -inf (no key to attend) must match exactly."""
    got, want = got.double(), want.double()
    empty = torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), empty), "rows with no attendable key differ (lse -inf)"
    return (got - want).abs()[~empty].max().item()


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _count_work(layer, work: list) -> None:
    """Record every kernel call's (query, key) pairs x heads x batch (a causal call: its triangle)."""
    attend = layer.local.attend

    def counting(q, k, v, *, causal=False, **kwargs):
        rows, keys = q.shape[1], k.shape[1]
        work.append(q.shape[0] * q.shape[2] * (rows * (rows + 1) // 2 if causal else rows * keys))
        return attend(q, k, v, causal=causal, **kwargs)

    layer.local.attend = counting


def _expected_work(state, p: dict, rows: _Rows) -> int:
    """What the ring plan (usp_attn.ring.plan) says this rank computes."""
    u, r = state.ulysses_degree, state.ring_degree
    sizes = state.sizes(p["length"], rows.balanced)
    blocks = tuple(sum(sizes[g * u : (g + 1) * u]) for g in range(r))
    q_rows = rows.pre + blocks[state.ring_rank] + rows.suf
    text_keys = rows.k_pre + rows.suf + p.get("kv_suffix", 0)
    heads = 2 * HeadPlan.make(p["heads"], p["kv_heads"], u).local_heads  # batch 2
    if r == 1:
        keys = text_keys + blocks[0]
        return heads * (q_rows * (q_rows + 1) // 2 if p.get("causal") else q_rows * keys)
    fronts = ring_front_lengths(p["length"], u, r) if rows.balanced and p.get("causal") else None
    ring = RingLayout(blocks, p.get("causal", False), fronts)
    return heads * (pairs_attended(ring, state.ring_rank, q_rows) + q_rows * text_keys)


def run_parity(ulysses: int, ring: int, name: str) -> dict:
    """One scenario in layout U x R: output, LSE, gradients and kernel work vs the references."""
    state = ensure_layout(ulysses, ring)
    p = SCENARIOS[name]
    rows, causal, world = _Rows(p), p.get("causal", False), state.world_size
    q, k, v, mask, dout, dlse, dtype = _inputs(p)
    layer = usp_attn.USPAttention(p["heads"], q.shape[-1], p["kv_heads"], causal=causal)
    kwargs = dict(attn_mask=rows.mask(mask), num_replicated_prefix=rows.pre, num_replicated_suffix=rows.suf,
                  num_replicated_kv_prefix=p.get("kv_prefix", 0), num_replicated_kv_suffix=p.get("kv_suffix", 0),
                  return_lse=True)
    if p.get("mask", "").startswith("replicated"):  # the same mask, given over the replicated keys only
        kwargs["replicated_key_mask"] = rows.replicated(kwargs.pop("attn_mask"))
    ql, kl, vl = rows.q(q).to(dtype), rows.k(k).to(dtype), rows.k(v).to(dtype)
    assert state.load_balance == rows.balanced  # recorded by shard_sequence

    work: list[int] = []
    _count_work(layer, work)
    with torch.no_grad():
        out, lse = layer(ql, kl, vl, **kwargs)
    del layer.local.attend
    ref_out, ref_lse = attention_lse_fp64(q, k, v, causal=causal, mask=mask)
    want_out, want_lse = rows.q(ref_out), rows.lse(ref_lse)
    assert out.shape == want_out.shape and out.dtype == dtype, (out.shape, want_out.shape, out.dtype)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the ring merge keeps fp64
    assert lse.shape == want_lse.shape and lse.dtype == lse_dtype, (lse.shape, want_lse.shape, lse.dtype)
    errors = {"out": (out.double() - want_out).abs().max().item(), "lse": _lse_error(lse, want_lse)}
    if dtype == torch.float64:
        tols = {"out": FP64_TOL, "lse": FP64_TOL}
    elif dtype == torch.float32:
        tols = {"out": ATOL, "lse": LSE_ATOL}
    else:
        tols = {"out": 2.0**-6 * want_out.abs().max().item(), "lse": 2.0**-8 * finite(want_lse).abs().max().item()}
    result = {"errors": errors, "work": sum(work), "expected_work": _expected_work(state, p, rows),
              "replicated_lse": torch.cat([lse[:, :, : rows.pre], lse[:, :, lse.shape[2] - rows.suf :]], 2).numpy()}
    if dtype != torch.bfloat16:
        errors.update(_gradient_errors(layer, p, rows, kwargs, (q, k, v, mask, dout, dlse), world, dtype))
        tols.update({key: GRAD_RTOL if dtype == torch.float32 else FP64_TOL for key in errors if key.startswith("d")})
    for key, err in errors.items():
        assert err <= tols[key], f"{name} U={ulysses} R={ring}: {key} error {err:.3e} > {tols[key]:.3e}"
    return result


def _gradient_errors(layer, p, rows: _Rows, kwargs, full, world, dtype) -> dict:
    q, k, v, mask, dout, dlse = full
    causal = p.get("causal", False)
    lq, lk, lv = (rows.q(q).to(dtype), rows.k(k).to(dtype), rows.k(v).to(dtype))
    lq, lk, lv = (t.requires_grad_() for t in (lq, lk, lv))
    out, lse = layer(lq, lk, lv, **kwargs)
    weight = torch.ones(out.shape[1], dtype=torch.float64)
    weight[: rows.pre] = weight[out.shape[1] - rows.suf :] = 1.0 / world  # replicated rows: once overall
    loss = (out * rows.q(dout) * weight[None, :, None, None]).sum() + (finite(lse) * rows.lse(dlse) * weight).sum()
    loss.backward()

    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_lse_fp64(q64, k64, v64, causal=causal, mask=mask)
    ((ref_out * dout).sum() + (finite(ref_lse) * dlse).sum()).backward()
    errors = {}
    n_q, n_k = lq.shape[1], lk.shape[1]
    k_suf = rows.suf + p.get("kv_suffix", 0)
    for label, got, ref, cut, before, after, n in (
        ("dq", lq.grad, q64.grad, rows.q, rows.pre, rows.suf, n_q),
        ("dk", lk.grad, k64.grad, rows.k, rows.k_pre, k_suf, n_k),
        ("dv", lv.grad, v64.grad, rows.k, rows.k_pre, k_suf, n_k),
    ):
        want = cut(ref)
        errors[label] = _rel(got[:, before : n - after], want[:, before : n - after])
        if before or after:
            replicated = torch.cat([got[:, :before], got[:, n - after :]], dim=1) * world
            errors[label + "_replicated"] = _rel(replicated, torch.cat([want[:, :before], want[:, n - after :]], 1))
    return errors


def lse_only_loss(ulysses: int, ring: int) -> float:
    """A loss through the LSE alone (the output unused: its gradient is None inside): exact
    gradients, on the zigzag-causal ring and the plain layouts alike."""
    state = ensure_layout(ulysses, ring)
    p = dict(heads=4, kv_heads=2, length=26, causal=True, balanced=True)
    rows = _Rows(p)
    q, k, v, _, _, dlse, _ = _inputs(p, seed=7)
    layer = usp_attn.USPAttention(4, 8, 2, causal=True)
    lq, lk, lv = (t.float().requires_grad_() for t in (rows.q(q), rows.k(k), rows.k(v)))
    _, lse = layer(lq, lk, lv, return_lse=True)
    (lse * rows.lse(dlse)).sum().backward()
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    (attention_lse_fp64(q64, k64, v64, causal=True)[1] * dlse).sum().backward()
    err = max(_rel(lq.grad, rows.q(q64.grad)), _rel(lk.grad, rows.k(k64.grad)))
    assert err <= GRAD_RTOL and lv.grad.abs().max() == 0, (err, state.sp_rank)  # v does not enter the LSE
    return err


def zigzag_roundtrip(ulysses: int, ring: int) -> None:
    """shard_sequence/gather_sequence with load_balance: chunks r and 2W-1-r of 2W, uneven
    lengths (some chunks empty), recorded or explicit lengths, and gather's backward."""
    state = ensure_layout(ulysses, ring)
    world, rank = state.world_size, state.sp_rank
    for length in (23, 5, 2 * world):
        x = torch.arange(2 * length * 3, dtype=torch.float32).reshape(2, length, 3)
        bounds = [0]
        for i in range(2 * world):  # chunk i has length // 2W tokens, one more for the first length % 2W
            bounds.append(bounds[-1] + length // (2 * world) + (i < length % (2 * world)))
        mine = list(range(bounds[rank], bounds[rank + 1])) + list(range(bounds[2 * world - 1 - rank],
                                                                       bounds[2 * world - rank]))
        shard = usp_attn.shard_sequence(x, load_balance=True)
        assert state.load_balance and state.sequence_length == length
        assert torch.equal(shard, x[:, mine]), (length, rank, mine)
        assert torch.equal(usp_attn.gather_sequence(shard), x)
        assert torch.equal(usp_attn.gather_sequence(shard.transpose(0, 1), dim=0, total_length=length),
                           x.transpose(0, 1))
        state.set_sequence_length(None)  # lengths exchanged instead
        assert torch.equal(usp_attn.gather_sequence(shard), x)
        # Backward of the gather: the reduce-scatter of the zigzag rows (every rank: the same loss).
        grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(length))
        xg = x.clone().requires_grad_()
        (usp_attn.gather_sequence(usp_attn.shard_sequence(xg, load_balance=True)) * grad_out).sum().backward()
        want = torch.zeros_like(x)
        want[:, mine] = world * grad_out[:, mine]
        assert torch.allclose(xg.grad, want), (length, rank)
    # Back to contiguous: recorded explicitly, followed by default.
    usp_attn.shard_sequence(torch.zeros(1, 8), load_balance=False)
    assert not state.load_balance


def _refused(layer, *args, **kwargs) -> str:
    try:
        layer(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"accepted on rank {dist.get_rank()}: {kwargs}")


def refusals(ulysses: int, ring: int) -> dict:
    """Combinations that are refused, each with one clear error, the same on every rank."""
    state = ensure_layout(ulysses, ring)
    world = state.world_size
    x = usp_attn.shard_sequence(torch.randn(1, 24, 4, 8), load_balance=False)
    s = x.shape[1]
    text = torch.randn(1, 3, 4, 8)
    kv = torch.cat([text, x], dim=1)
    new = usp_attn.USPAttention
    messages = {
        "per_query_mask": _refused(new(4, 8), x, x, x, attn_mask=torch.ones(1, s, s, dtype=torch.bool)),
        "per_head_mask": _refused(new(4, 8), x, x, x, attn_mask=torch.zeros(1, 4, s, s)),
        "integer_mask": _refused(new(4, 8), x, x, x, attn_mask=torch.ones(1, s, dtype=torch.int64)),
        "causal_kv_only": _refused(new(4, 8, causal=True), x, kv, kv, num_replicated_kv_prefix=3),
        "kv_rows_mismatch": _refused(new(4, 8), x, kv, kv, num_replicated_kv_prefix=2),
        "kv_rows_without_counts": _refused(new(4, 8), x, kv, kv),
        "return_lse_not_bool": _refused(new(4, 8), x, x, x, return_lse=1),
        "load_balance_not_bool": _refused(new(4, 8), x, x, x, load_balance="zigzag"),
        "replicated_key_mask_without_replicated_keys": _refused(new(4, 8), x, x, x,
                                                               replicated_key_mask=torch.ones(1, 3, dtype=torch.bool)),
        "replicated_key_mask_and_attn_mask": _refused(new(4, 8), x, kv, kv, num_replicated_kv_prefix=3,
                                                      attn_mask=torch.ones(1, s + 3, dtype=torch.bool),
                                                      replicated_key_mask=torch.ones(1, 3, dtype=torch.bool)),
        "replicated_key_mask_shape": _refused(new(4, 8), x, kv, kv, num_replicated_kv_prefix=3,
                                              replicated_key_mask=torch.ones(1, s + 3, dtype=torch.bool)),
    }
    odd = usp_attn.shard_sequence(torch.randn(1, 7, 4, 8), load_balance=False)  # contiguous sizes differ from zigzag
    messages["zigzag_with_contiguous_shards"] = _refused(new(4, 8, causal=True), odd, odd, odd, load_balance=True)
    assert world in (2, 4)
    return messages
