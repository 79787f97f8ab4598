"""Cases run inside spawned gloo groups by test_sequence_parallel.py.

Every case builds the full inputs from a fixed seed on every rank (so all ranks agree),
shards the non-replicated part with ``shard_sequence``, runs the layer on the shard,
and compares this rank's output with the same rows of an fp64 single-process
reference over the full sequence. It returns its max error so the test module can
report it.

Tolerances. fp32: the layers run fp32 kernels and merge in fp32, so the error is a few
fp32 ulps of an O(1) output accumulated over <= 100 keys: 2e-5 absolute is ~100 ulps of
headroom at |out| ~ 1. bf16: inputs are rounded to bf16 *before* the reference sees
them, so only the kernel's own rounding is measured: the output is rounded to bf16
(half an ulp, 2^-9 relative) and flash-style CPU kernels round the softmax weights to
bf16 before P·V (another ~2^-8): we allow 2^-6 of the largest reference value.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

import usp_attn
import usp_attn.platforms
from tests.helpers.reference import reference_attention

FP32_ATOL = 2e-5
BF16_RTOL = 2.0**-6

# name -> parameters of one scenario (see run_scenario)
SCENARIOS: dict[str, dict] = {
    "mha_even": dict(heads=8, kv_heads=8, length=48),
    "uneven_length": dict(heads=8, kv_heads=8, length=45),
    "gqa_kv2": dict(heads=8, kv_heads=2, length=37),
    "mqa_kv1": dict(heads=8, kv_heads=1, length=40),
    "heads_not_divisible": dict(heads=6, kv_heads=3, length=33),
    "heads_5_mqa": dict(heads=5, kv_heads=1, length=31),
    "key_padding_mask": dict(heads=8, kv_heads=4, length=43, masked=True),
    "replicated_prefix_suffix": dict(heads=8, kv_heads=2, length=38, prefix=5, suffix=3),
    "replicated_prefix_masked": dict(heads=6, kv_heads=6, length=29, prefix=7, masked=True),
    "causal": dict(heads=8, kv_heads=8, length=41, causal=True),
    "causal_masked_gqa": dict(heads=8, kv_heads=2, length=36, causal=True, masked=True),
    "bf16": dict(heads=8, kv_heads=2, length=44, dtype="bfloat16"),
    "bf16_replicated_masked": dict(heads=6, kv_heads=2, length=35, prefix=4, suffix=2, masked=True, dtype="bfloat16"),
    "scale_and_seq_len_arg": dict(heads=4, kv_heads=4, length=27, scale=0.2, pass_seq_len=True),
}


def ensure_layout(ulysses: int, ring: int, **kwargs) -> usp_attn.SequenceParallelState:
    """Reuse the current state if it has this layout, else rebuild it (group creation is collective)."""
    state = usp_attn.get_sequence_parallel_state()
    if state is not None and (state.ulysses_degree, state.ring_degree) == (ulysses, ring) and not kwargs:
        return state
    usp_attn.destroy_sequence_parallel()
    return usp_attn.init_sequence_parallel(ulysses, ring, **kwargs)


def _inputs(p: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batch, dim = 2, 16
    total = p.get("prefix", 0) + p["length"] + p.get("suffix", 0)
    q = torch.randn(batch, total, p["heads"], dim, generator=gen)
    k = torch.randn(batch, total, p["kv_heads"], dim, generator=gen)
    v = torch.randn(batch, total, p["kv_heads"], dim, generator=gen)
    mask = None
    if p.get("masked"):
        mask = torch.rand(batch, total, generator=gen) > 0.35
        mask[1] = False  # batch row 1: a single attendable key, near the end
        mask[1, total - 2] = True
    dtype = getattr(torch, p.get("dtype", "float32"))
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def _local(x: torch.Tensor, prefix: int, length: int) -> torch.Tensor:
    """This rank's view: replicated prefix + its shard of the middle + replicated suffix."""
    shard = usp_attn.shard_sequence(x[:, prefix : prefix + length])
    return torch.cat([x[:, :prefix], shard, x[:, prefix + length :]], dim=1)


def run_scenario(ulysses: int, ring: int, name: str) -> dict:
    """Run one scenario under layout U x R; returns errors and the replicated-token output bytes."""
    state = ensure_layout(ulysses, ring)
    p = SCENARIOS[name]
    prefix, suffix, length = p.get("prefix", 0), p.get("suffix", 0), p["length"]
    q, k, v, mask = _inputs(p)
    scale = p.get("scale")
    expected = reference_attention(q, k, v, scale=scale, causal=p.get("causal", False), mask=mask)
    layer = usp_attn.USPAttention(p["heads"], q.shape[-1], p["kv_heads"], softmax_scale=scale,
                                  causal=p.get("causal", False))
    state.set_sequence_length(None if p.get("pass_seq_len") else length)
    out = layer(
        _local(q, prefix, length), _local(k, prefix, length), _local(v, prefix, length),
        attn_mask=None if mask is None else _local(mask, prefix, length),
        num_replicated_prefix=prefix, num_replicated_suffix=suffix,
        seq_len=length if p.get("pass_seq_len") else None,
    )
    want = _local(expected, prefix, length)
    assert out.shape == want.shape and out.dtype == q.dtype, (out.shape, want.shape, out.dtype)
    err = (out.double() - want).abs().max().item()
    tol = FP32_ATOL if q.dtype == torch.float32 else BF16_RTOL * want.abs().max().item()
    assert err <= tol, f"{name} U={ulysses} R={ring}: max error {err:.3e} > {tol:.3e}"
    assert torch.isfinite(out).all()
    replicated = torch.cat([out[:, :prefix], out[:, out.shape[1] - suffix :]], dim=1)
    return {"error": err, "tol": tol, "replicated": replicated.float().numpy().tobytes(),
            "backend": str(layer.backend)}


def cross_attention(ulysses: int, ring: int) -> float:
    """skip_sequence_parallel: q is the shard, k/v (text) full everywhere, no communication."""
    ensure_layout(ulysses, ring)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 50, 6, 16, generator=gen)
    k = torch.randn(1, 13, 2, 16, generator=gen)
    v = torch.randn(1, 13, 2, 16, generator=gen)
    layer = usp_attn.USPAttention(6, 16, 2, skip_sequence_parallel=True)
    out = layer(usp_attn.shard_sequence(q), k, v)
    want = usp_attn.shard_sequence(reference_attention(q, k, v))
    err = (out.double() - want).abs().max().item()
    assert err <= FP32_ATOL, err
    return err


def gather_roundtrip(ulysses: int, ring: int) -> None:
    ensure_layout(ulysses, ring)
    x = torch.arange(2 * 23 * 3, dtype=torch.float32).reshape(2, 23, 3)
    shard = usp_attn.shard_sequence(x)
    assert torch.equal(usp_attn.gather_sequence(shard), x)
    usp_attn.get_sequence_parallel_state().set_sequence_length(None)  # forces a length exchange
    assert torch.equal(usp_attn.gather_sequence(shard), x)


def layer_flavours(ulysses: int, ring: int) -> None:
    """UlyssesAttention needs R == 1, RingAttention U == 1; otherwise a clear error at call time."""
    ensure_layout(ulysses, ring)
    q = usp_attn.shard_sequence(torch.randn(1, 24, 4, 8))
    for cls, ok in ((usp_attn.UlyssesAttention, ring == 1), (usp_attn.RingAttention, ulysses == 1)):
        layer = cls(4, 8)
        if ok:
            layer(q, q, q)
        else:
            try:
                layer(q, q, q)
            except ValueError as exc:
                assert "use USPAttention" in str(exc), exc
            else:
                raise AssertionError(f"{cls.__name__} accepted U={ulysses}, R={ring}")


def agreement_rank0_wins() -> tuple[str, str]:
    """Ranks ask for different backends; every rank ends on rank 0's choice."""
    usp_attn.destroy_sequence_parallel()
    request = "torch_sdpa" if dist.get_rank() == 0 else "sage_attn"
    state = usp_attn.init_sequence_parallel(dist.get_world_size(), 1, attention_backend=request)
    layer = usp_attn.USPAttention(4, 8)
    layer(*(usp_attn.shard_sequence(torch.randn(1, 16, 4, 8)),) * 3)
    return str(state.agreement.requested), str(layer.backend)


def bad_degrees() -> str:
    usp_attn.destroy_sequence_parallel()
    world = dist.get_world_size()
    try:
        usp_attn.init_sequence_parallel(world + 1, 1)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("init_sequence_parallel accepted a layout that does not match the world size")


def validation_catches_mismatch(kind: str) -> str:
    """With validate=True, ranks that disagree (or one bad rank) all raise the same error."""
    ensure_layout(dist.get_world_size(), 1, validate=True)
    rank = dist.get_rank()
    x = usp_attn.shard_sequence(torch.randn(1, 20, 4, 8))
    layer = usp_attn.USPAttention(4, 8)
    kwargs = {}
    if kind == "mask" and rank == 0:
        kwargs["attn_mask"] = torch.ones(1, x.shape[1], dtype=torch.bool)
    if kind == "prefix" and rank == 1:
        kwargs["num_replicated_prefix"] = 2
    q = x
    if kind == "shape" and rank == 1:
        q = torch.randn(1, x.shape[1], 3, 8)  # wrong head count on one rank only
    try:
        layer(q, x, x, **kwargs)
    except ValueError as exc:
        usp_attn.destroy_sequence_parallel()
        return str(exc)
    raise AssertionError(f"validation did not catch a {kind} mismatch")


def dead_rank_times_out() -> str:
    """Rank 1 never joins the forward: rank 0 must fail with an error after the timeout, not hang."""
    ensure_layout(dist.get_world_size(), 1, timeout=datetime.timedelta(seconds=2))
    if dist.get_rank() == 0:
        x = usp_attn.shard_sequence(torch.randn(1, 16, 4, 8))
        try:
            usp_attn.USPAttention(4, 8)(x, x, x)
        except RuntimeError as exc:
            return "error: " + str(exc).splitlines()[0][:200]
        raise AssertionError("forward returned although rank 1 never took part")
    return "skipped forward"


def world_one_is_local() -> None:
    """U = R = 1: identical to LocalAttention (same kernel, no communication)."""
    ensure_layout(1, 1)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 19, 4, 8, generator=gen) for _ in range(3))
    assert torch.equal(usp_attn.USPAttention(4, 8)(q, k, v), usp_attn.LocalAttention(4, 8)(q, k, v))


def layouts(world: int) -> list[tuple[int, int]]:
    return [(u, world // u) for u in range(1, world + 1) if world % u == 0]



def explicit_backend_without_lse_under_ring() -> str:
    """An explicit backend that cannot return the LSE (Sage 1) under ring: a clear error, not a fallback."""
    usp_attn.destroy_sequence_parallel()
    hopper_with_sage1 = usp_attn.platforms.Platform.make("cuda", capability=(9, 0), packages={"sageattention": "1.0.6"})
    with usp_attn.platforms.override_platform(hopper_with_sage1):
        usp_attn.init_sequence_parallel(1, dist.get_world_size(), attention_backend="sage_attn")
        x = usp_attn.shard_sequence(torch.randn(1, 16, 4, 128))
        try:
            usp_attn.USPAttention(4, 128)(x, x, x)
        except usp_attn.AttentionBackendUnavailableError as exc:
            return str(exc)
        finally:
            usp_attn.destroy_sequence_parallel()
    raise AssertionError("ring attention accepted sage_attn (v1), which has no log-sum-exp")
