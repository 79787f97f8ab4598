"""Gradient cases run inside spawned gloo groups by test_gradients.py.

Convention under test (usp_attn.distributed.collectives_grad): each rank's gradients are
its share of the gradient of the SUM of the ranks' losses. Rank r's loss here is

    sum(out_r * G_r)  over its own sequence rows     +   sum(out_text * G_text) / W

(the replicated rows' loss counted once in total), so the objective is exactly the
single-process loss sum(out * G), and:
  * sharded q/k/v rows get exactly the fp64 reference gradient of their rows;
  * replicated (prefix/suffix) rows get 1/W of the reference on every rank, bit-identical.

Tolerance: fp32 kernels and fp32 accumulation over <= 100 keys and a few blocks give
errors of a few fp32 ulps of the largest gradient (measured <= 1e-6 relative); the
requirement is 2e-4 of the largest reference gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import usp_attn
import usp_attn.platforms
from tests.distributed.sp_cases import ensure_layout
from tests.helpers.reference_grad import attention_fp64, reference_grads

GRAD_RTOL = 2e-4

SCENARIOS: dict[str, dict] = {
    "mha_uneven": dict(heads=4, kv_heads=4, length=29),
    "gqa_kv2": dict(heads=4, kv_heads=2, length=26),
    "mqa_heads_6": dict(heads=6, kv_heads=1, length=23),  # U=4: padded heads; U=2: kv repeated
    "key_padding_mask": dict(heads=4, kv_heads=2, length=27, masked=True),
    "causal": dict(heads=4, kv_heads=4, length=25, causal=True),
    "causal_masked_gqa": dict(heads=4, kv_heads=2, length=22, causal=True, masked=True),
    "replicated_prefix_suffix": dict(heads=4, kv_heads=2, length=24, prefix=3, suffix=2, scale=0.3),
    "replicated_masked_padded": dict(heads=6, kv_heads=3, length=21, prefix=4, masked=True),
}


def _inputs(p: dict, seed: int = 0, dtype=torch.float32, batch: int = 2, dim: int = 8):
    """Full q, k, v, key mask and output gradient G, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    total = p.get("prefix", 0) + p["length"] + p.get("suffix", 0)
    q = torch.randn(batch, total, p["heads"], dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, total, p["kv_heads"], dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, total, p["kv_heads"], dim, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, total, p["heads"], dim, generator=gen, dtype=torch.float64)
    mask = None
    if p.get("masked"):
        mask = torch.rand(batch, total, generator=gen) > 0.35
        mask[-1] = False  # last batch row: one attendable key near the end; causal rows before it see none
        mask[-1, total - 2] = True
    return q.to(dtype), k.to(dtype), v.to(dtype), mask, grad.to(dtype)


def _local(x: torch.Tensor, prefix: int, length: int) -> torch.Tensor:
    shard = usp_attn.shard_sequence(x[:, prefix : prefix + length])
    return torch.cat([x[:, :prefix], shard, x[:, prefix + length :]], dim=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run_grad_scenario(ulysses: int, ring: int, name: str) -> dict:
    """One scenario in layout U x R; returns relative errors and the replicated grads' bytes."""
    state = ensure_layout(ulysses, ring)
    p = SCENARIOS[name]
    pre, suf, length = p.get("prefix", 0), p.get("suffix", 0), p["length"]
    q, k, v, mask, grad = _inputs(p)
    scale, causal = p.get("scale"), p.get("causal", False)
    _, ref_q, ref_k, ref_v = reference_grads(q, k, v, grad, scale=scale, causal=causal, mask=mask)

    layer = usp_attn.USPAttention(p["heads"], q.shape[-1], p["kv_heads"], softmax_scale=scale, causal=causal)
    state.set_sequence_length(length)
    lq, lk, lv = (_local(t, pre, length).requires_grad_() for t in (q, k, v))
    out = layer(lq, lk, lv, attn_mask=None if mask is None else _local(mask, pre, length),
                num_replicated_prefix=pre, num_replicated_suffix=suf)
    weight = torch.ones(out.shape[1], dtype=out.dtype)
    weight[:pre] = weight[out.shape[1] - suf :] = 1.0 / state.world_size  # replicated rows: counted once overall
    (out * _local(grad, pre, length) * weight[None, :, None, None]).sum().backward()

    errors, world = {}, state.world_size
    mine = slice(pre, lq.shape[1] - suf)
    for label, got, ref in (("dq", lq.grad, ref_q), ("dk", lk.grad, ref_k), ("dv", lv.grad, ref_v)):
        want = _local(ref, pre, length)
        errors[label] = _rel(got[:, mine], want[:, mine])
        if pre or suf:
            text = torch.cat([got[:, :pre], got[:, got.shape[1] - suf :]], dim=1)
            text_ref = torch.cat([want[:, :pre], want[:, want.shape[1] - suf :]], dim=1)
            errors[label + "_replicated"] = _rel(text * world, text_ref)
    for label, err in errors.items():
        assert err <= GRAD_RTOL, f"{name} U={ulysses} R={ring}: {label} relative error {err:.2e} > {GRAD_RTOL:.0e}"
    replicated = torch.cat([t.grad[:, :pre].flatten() for t in (lq, lk, lv)] +
                           [t.grad[:, t.shape[1] - suf :].flatten() for t in (lq, lk, lv)])
    return {"errors": errors, "replicated": replicated.numpy().tobytes(), "backend": str(layer.backend)}


def full_loss_on_every_rank(ulysses: int, ring: int) -> dict:
    """Every rank computes the SAME full loss L from the gathered outputs: each rank's copy of
    the replicated tokens gets exactly dL/dx; the sharded rows get W * dL/dx (the gradient
    of the sum of W identical losses; averaging parameter gradients over the group undoes it)."""
    state = ensure_layout(ulysses, ring)
    p = SCENARIOS["replicated_prefix_suffix"]
    pre, suf, length = p["prefix"], p["suffix"], p["length"]
    q, k, v, _, grad = _inputs(p, seed=1)
    _, ref_q, ref_k, ref_v = reference_grads(q, k, v, grad, scale=p["scale"])
    layer = usp_attn.USPAttention(p["heads"], q.shape[-1], p["kv_heads"], softmax_scale=p["scale"])
    state.set_sequence_length(length)
    lq, lk, lv = (_local(t, pre, length).requires_grad_() for t in (q, k, v))
    out = layer(lq, lk, lv, num_replicated_prefix=pre, num_replicated_suffix=suf)
    n = out.shape[1]
    full = torch.cat([out[:, :pre], usp_attn.gather_sequence(out[:, pre : n - suf]), out[:, n - suf :]], dim=1)
    (full * grad).sum().backward()
    errors = {}
    for label, got, ref in (("dq", lq.grad, ref_q), ("dk", lk.grad, ref_k), ("dv", lv.grad, ref_v)):
        want = _local(ref, pre, length)
        errors[label + "_replicated"] = _rel(torch.cat([got[:, :pre], got[:, n - suf :]], 1),
                                             torch.cat([want[:, :pre], want[:, n - suf :]], 1))
        errors[label + "_sharded_over_W"] = _rel(got[:, pre : n - suf] / state.world_size, want[:, pre : n - suf])
    assert max(errors.values()) <= GRAD_RTOL, errors
    return errors


def cross_attention_grads(ulysses: int, ring: int) -> dict:
    """skip_sequence_parallel: dq exact for the shard; the full K/V's gradient is shared:
    the sum over ranks is the reference (no communication in forward or backward)."""
    state = ensure_layout(ulysses, ring)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 30, 6, 8, generator=gen)
    k, v = torch.randn(1, 11, 2, 8, generator=gen), torch.randn(1, 11, 2, 8, generator=gen)
    grad = torch.randn(1, 30, 6, 8, generator=gen)
    _, ref_q, ref_k, ref_v = reference_grads(q, k, v, grad)
    layer = usp_attn.USPAttention(6, 8, 2, skip_sequence_parallel=True)
    lq = usp_attn.shard_sequence(q).clone().requires_grad_()
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    (layer(lq, kk, vv) * usp_attn.shard_sequence(grad)).sum().backward()
    dk, dv = kk.grad.clone(), vv.grad.clone()
    dist.all_reduce(dk, group=state.sp_group)
    dist.all_reduce(dv, group=state.sp_group)
    errors = {"dq": _rel(lq.grad, usp_attn.shard_sequence(ref_q)), "dk_sum": _rel(dk, ref_k), "dv_sum": _rel(dv, ref_v)}
    assert max(errors.values()) <= GRAD_RTOL, errors
    return errors


class _MeanOverGroup(torch.autograd.Function):
    """Identity whose backward averages the gradient over the group: turns the per-rank shares
    of a full (replicated) input into its gradient, so gradcheck sees one function."""

    @staticmethod
    def forward(ctx, group, world, x):
        ctx.args = (group, world)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        group, world = ctx.args
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return None, None, grad / world


def gradcheck_layout(ulysses: int, ring: int, name: str) -> bool:
    """torch.autograd.gradcheck in fp64 of full inputs -> shard -> USPAttention -> gather.

    Every rank evaluates the same function of the same full inputs (the perturbations are
    identical everywhere). Fast mode (a random projection v^T J u, checked against finite
    differences along u) keeps it to a few collective calls per rank; the single-process
    unit tests run the full Jacobian check of the kernels. eps/atol: the ring merges
    partial results in fp32 (fp64 through the ring is only fp32-accurate until the merge
    keeps fp64), so a forward value carries ~1e-7 relative noise; with eps = 1e-3 that is
    <= 1e-4 in a difference quotient, and central differences are off by O(eps^2) ~ 1e-6.
    atol 1e-3 is ten times that; a wrong gradient term is O(0.1 - 1) here.
    """
    state = ensure_layout(ulysses, ring)
    p = dict(GRADCHECK_CASES[name])
    pre, suf, length = p.get("prefix", 0), p.get("suffix", 0), p["length"]
    q, k, v, mask, _ = _inputs(p, seed=2, dtype=torch.float64, batch=1, dim=4)
    layer = usp_attn.USPAttention(p["heads"], q.shape[-1], p["kv_heads"], causal=p.get("causal", False))
    state.set_sequence_length(length)

    def fn(q, k, v):
        q, k, v = (_MeanOverGroup.apply(state.sp_group, state.world_size, t) for t in (q, k, v))
        out = layer(_local(q, pre, length), _local(k, pre, length), _local(v, pre, length),
                    attn_mask=None if mask is None else _local(mask, pre, length),
                    num_replicated_prefix=pre, num_replicated_suffix=suf)
        n = out.shape[1]
        return torch.cat([out[:, :pre], usp_attn.gather_sequence(out[:, pre : n - suf], total_length=length),
                          out[:, n - suf :]], dim=1)

    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    return torch.autograd.gradcheck(fn, inputs, eps=1e-3, atol=1e-3, rtol=1e-3, fast_mode=True)


GRADCHECK_CASES: dict[str, dict] = {
    "gqa_replicated_masked": dict(heads=2, kv_heads=1, length=7, prefix=1, suffix=1, masked=True),
    "causal": dict(heads=2, kv_heads=2, length=6, causal=True),
}


def grads_without_autograd_unchanged(ulysses: int, ring: int) -> float:
    """Inputs without requires_grad, or torch.no_grad(): no graph, and the values agree with
    the recorded forward (which runs the kernels with the LSE)."""
    state = ensure_layout(ulysses, ring)
    p = SCENARIOS["replicated_masked_padded"]
    pre, length = p["prefix"], p["length"]
    q, k, v, mask, _ = _inputs(p, seed=4)
    layer = usp_attn.USPAttention(p["heads"], q.shape[-1], p["kv_heads"])
    state.set_sequence_length(length)
    args = [_local(t, pre, length) for t in (q, k, v)]
    kwargs = dict(attn_mask=_local(mask, pre, length), num_replicated_prefix=pre)
    plain = layer(*args, **kwargs)
    with torch.no_grad():
        no_grad = layer(*(t.clone().requires_grad_() for t in args), **kwargs)
    recorded = layer(*(t.clone().requires_grad_() for t in args), **kwargs)
    assert plain.grad_fn is None and not plain.requires_grad
    assert no_grad.grad_fn is None and not no_grad.requires_grad
    assert torch.equal(plain, no_grad)
    assert recorded.grad_fn is not None
    return _rel(recorded.detach(), plain)


def saved_activations_are_local(ulysses: int, ring: int) -> dict:
    """What autograd keeps is this rank's own activations: never the other ring ranks' K/V.

    Counts every tensor saved for backward (storage elements, each storage once). Expected:
    q, k, v of this rank after the all-to-all (Ulysses: the segment of h/U heads), the
    output and the LSE, plus the rows of replicated tokens; a ring that kept every block
    it received would add (R - 1) more K/V blocks.
    """
    state = ensure_layout(ulysses, ring)
    heads, kv_heads, dim, batch, length = 4, 4, 8, 1, 64
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(batch, length, heads, dim, generator=gen) for _ in range(3))
    layer = usp_attn.USPAttention(heads, dim, kv_heads)
    state.set_sequence_length(length)
    lq, lk, lv = (usp_attn.shard_sequence(t).clone().requires_grad_() for t in (q, k, v))
    seen, total = set(), [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(lq, lk, lv)
    out.sum().backward()
    local_qkv = 3 * lq.numel()
    expected = local_qkv + lq.numel() + batch * heads * lq.shape[1]  # q, k, v + out + lse (fp32, same size)
    assert total[0] <= expected * 1.05, (total[0], expected)
    return {"saved": total[0], "expected": expected, "full_kv": 2 * k.numel()}


def empty_shard_and_empty_batch_backward(ulysses: int, ring: int) -> dict:
    """Fewer tokens than ranks (some shards empty) and batch 0: backward runs on every rank and the
    gradient of the non-empty case equals fp64 autograd of full attention."""
    state = ensure_layout(ulysses, ring)
    torch.manual_seed(0)
    errors = {}
    for batch, length in ((1, state.world_size - 1), (0, 2 * state.world_size)):
        full = [torch.randn(batch, length, 2, 8, dtype=torch.float64) for _ in range(3)]
        q, k, v = (usp_attn.shard_sequence(t).clone().requires_grad_() for t in full)
        out = usp_attn.USPAttention(2, 8)(q, k, v)
        (out * usp_attn.shard_sequence(torch.ones_like(full[0]))).sum().backward()
        _, *grads = reference_grads(*full, torch.ones_like(full[0]))
        errors[f"B{batch} S{length}"] = max(
            float((got.grad - usp_attn.shard_sequence(want)).abs().max()) if got.numel() else 0.0
            for got, want in zip((q, k, v), grads))
    assert max(errors.values()) <= 1e-12, errors  # fp64 throughout
    return errors


def double_backward_is_an_error(ulysses: int, ring: int) -> str:
    """Second-order gradients (a gradient penalty) are not supported: every layout raises instead
    of returning wrong values (the kernels' backward and the collectives have no derivative)."""
    ensure_layout(ulysses, ring)
    torch.manual_seed(0)
    q, k, v = (usp_attn.shard_sequence(torch.randn(1, 16, 2, 4, dtype=torch.float64)).requires_grad_() for _ in range(3))
    layer = usp_attn.USPAttention(2, 4)
    dq, = torch.autograd.grad(layer(q, k, v).square().sum(), q, create_graph=True)
    try:
        dq.square().sum().backward()
    except RuntimeError as exc:
        assert "once_differentiable" in str(exc), exc
        return str(exc)
    raise AssertionError("a double backward through USPAttention ran; it must raise")


def sage_without_backward_is_an_error(ulysses: int, ring: int) -> str:
    """An explicit backend without a backward: a clear error on every rank, before any collective."""
    usp_attn.destroy_sequence_parallel()
    hopper = usp_attn.platforms.Platform.make("cuda", capability=(9, 0), packages={"sageattention": "2.1.0"})
    with usp_attn.platforms.override_platform(hopper):
        usp_attn.init_sequence_parallel(ulysses, ring, attention_backend="sage_attn")
        try:
            x = usp_attn.shard_sequence(torch.randn(1, 16, 4, 128, dtype=torch.bfloat16)).requires_grad_()
            usp_attn.USPAttention(4, 128)(x, x, x)
        except usp_attn.AttentionBackendUnavailableError as exc:
            return str(exc)
        finally:
            usp_attn.destroy_sequence_parallel()
    raise AssertionError("gradients through sage_attn were accepted")


def dit_training_step(ulysses: int, ring: int) -> dict:
    """One training step of the built-in DiT: the parameter gradients, averaged over the
    sequence-parallel ranks (each computed the full loss), equal the one-process gradients."""
    from launch import tiny_dit

    state = ensure_layout(ulysses, ring)
    cfg = tiny_dit.TinyDiTConfig(hidden_size=48, num_heads=6, ffn_size=96, text_dim=16, text_length=5, freq_dim=32)
    gen = torch.Generator().manual_seed(6)
    latents = torch.randn(1, cfg.in_channels, 3, 6, 6, generator=gen)  # 27 tokens: uneven shards
    timestep, text = torch.tensor([321.0]), torch.randn(1, cfg.text_length, cfg.text_dim, generator=gen)
    target = torch.randn(latents.shape, generator=gen)

    grads = {}
    for parallel in (False, True):
        model = tiny_dit.TinyWanDiT(cfg, sequence_parallel=parallel).init_weights(7)
        loss = torch.nn.functional.mse_loss(model(latents, timestep, text), target)
        loss.backward()
        grads[parallel] = {name: p.grad.clone() for name, p in model.named_parameters()}
    errors = {}
    for name, g in grads[True].items():
        dist.all_reduce(g, group=state.sp_group)
        g /= state.world_size
        errors[name] = _rel(g, grads[False][name])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL, (worst, errors[worst])
    return {"worst": worst, "error": errors[worst], "params": len(errors)}



def training_benchmark_dry_run() -> list:
    """The suite's training-step rows on CPU (tiny DiT): they run and their SP rows' gradients
    match the one-process step."""
    from benchmarks import training
    from launch import tiny_dit

    cfg = tiny_dit.TinyDiTConfig(hidden_size=48, num_heads=6, num_layers=1, ffn_size=96, text_dim=16,
                                 text_length=5, freq_dim=32)
    rows = training.training_step_rows(cfg, (1, 16, 3, 4, 6), torch.device("cpu"), torch.float32, warmup=0, reps=1)
    assert [row["what"] for row in rows] == ["1 GPU", f"Ulysses-{dist.get_world_size()}", f"ring-{dist.get_world_size()}"]
    assert all(row["max_param_grad_rel_err"] <= GRAD_RTOL and row["ms"] > 0 for row in rows), rows
    return rows
