"""Cases of test_multigpu.py, run on every rank of a spawned group (tests/gpu/multigpu.py).

Layouts: for every group size k dividing the world and every layout U x R = k (groups of k side by
side), every scenario of ``tests/distributed/sp_cases.py`` (inputs and fp64 reference built on the CPU
exactly as the gloo tests build them, then moved to the device), cross-attention and a shard/gather
round trip. Each rank returns its result per scenario; :func:`judge` makes one verdict of all ranks':
errors within tolerance, replicated (text) outputs identical within a group, one backend per group.
Tolerances as in sp_cases, except CUDA fp32: 1e-3 of the largest reference value (CUDA kernels may run
fp32 through TF32, ~3e-4 relative).

Safe defaults on the devices (groups of 2 side by side): no host sync in the default (first-call
checked) steady state, fp64 through the ring, and first-call errors that every rank raises.
"""

from __future__ import annotations

import hashlib
import time
import traceback

import torch
import torch.distributed as dist

import usp_attn
from tests.distributed import sp_cases
from tests.gpu.multigpu import device
from tests.helpers.reference import reference_attention

__all__ = ["SCENARIOS", "CUDA_FP32_RTOL", "group_sizes", "layouts_of", "layout", "judge", "steady_state_syncs",
           "fp64_through_the_ring", "first_call_error", "MASK_ON_RANK0", "CPU_TENSORS"]

CUDA_FP32_RTOL = 1e-3
SCENARIOS = [*sp_cases.SCENARIOS, "cross_attention", "gather_roundtrip"]
TIMEOUT_S = 60  # usp_attn's collectives: a rank that failed alone turns its peers' wait into an error


def group_sizes(world: int) -> list[int]:
    """1, 2, 4, 8 and ``world``, dividing it."""
    return sorted({k for k in (1, 2, 4, 8, world) if world % k == 0})


def layouts_of(k: int) -> list[tuple[int, int]]:
    """Every (U, R) with U x R = k: Ulysses-k first, ring-k last."""
    return [(k // r, r) for r in range(1, k + 1) if k % r == 0]


def _groups(k: int) -> list[list[int]]:
    world = dist.get_world_size()
    return [list(range(g, g + k)) for g in range(0, world, k)]


# ---- layouts ----------------------------------------------------------------------------------------
def _tolerance(dtype: torch.dtype, dev: torch.device, want: torch.Tensor) -> float:
    peak = want.abs().max().item()
    if dtype == torch.float32:
        return sp_cases.FP32_ATOL if dev.type == "cpu" else CUDA_FP32_RTOL * peak
    return sp_cases.BF16_RTOL * peak


def _result(out: torch.Tensor, want: torch.Tensor, tol: float, backend: str, replicated=None) -> dict:
    out = out.detach().cpu()
    digest = "" if replicated is None else hashlib.sha1(replicated.float().cpu().numpy().tobytes()).hexdigest()
    return {"error": (out.double() - want).abs().max().item(), "tol": tol, "finite": bool(torch.isfinite(out).all()),
            "backend": backend, "replicated": digest, "exception": ""}


def _scenario(name: str, dev: torch.device) -> dict:
    p = sp_cases.SCENARIOS[name]
    prefix, suffix, length = p.get("prefix", 0), p.get("suffix", 0), p["length"]
    q, k, v, mask = sp_cases._inputs(p)  # CPU, fixed seed: identical on every rank
    causal, scale = p.get("causal", False), p.get("scale")
    want = sp_cases._local(reference_attention(q, k, v, scale=scale, causal=causal, mask=mask), prefix, length)
    q, k, v = (t.to(dev) for t in (q, k, v))
    layer = usp_attn.USPAttention(p["heads"], q.shape[-1], p["kv_heads"], softmax_scale=scale, causal=causal)
    usp_attn.get_sequence_parallel_state().set_sequence_length(None if p.get("pass_seq_len") else length)
    local = lambda x: sp_cases._local(x, prefix, length)  # noqa: E731
    out = layer(local(q), local(k), local(v), attn_mask=None if mask is None else local(mask.to(dev)),
                num_replicated_prefix=prefix, num_replicated_suffix=suffix,
                seq_len=length if p.get("pass_seq_len") else None)
    if out.shape != want.shape or out.dtype != q.dtype:
        raise AssertionError(f"output {tuple(out.shape)} {out.dtype}, expected {tuple(want.shape)} {q.dtype}")
    replicated = torch.cat([out[:, :prefix], out[:, out.shape[1] - suffix:]], dim=1) if prefix + suffix else None
    return _result(out, want, _tolerance(q.dtype, dev, want), str(layer.backend), replicated)


def _cross_attention(dev: torch.device) -> dict:
    """skip_sequence_parallel: q is this rank's shard, k/v (text) full on every rank."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, h, 16, generator=gen) for n, h in ((50, 6), (13, 2), (13, 2)))
    want = usp_attn.shard_sequence(reference_attention(q, k, v))
    layer = usp_attn.USPAttention(6, 16, 2, skip_sequence_parallel=True)
    out = layer(usp_attn.shard_sequence(q.to(dev)), k.to(dev), v.to(dev))
    return _result(out, want, _tolerance(torch.float32, dev, want), str(layer.backend))


def _gather_roundtrip(dev: torch.device) -> dict:
    """shard then gather returns the tensor exactly (uneven 23 tokens), also when the global length
    must be exchanged first."""
    x = torch.arange(2 * 23 * 3, dtype=torch.float32, device=dev).reshape(2, 23, 3)
    shard = usp_attn.shard_sequence(x)
    first = usp_attn.gather_sequence(shard)
    usp_attn.get_sequence_parallel_state().set_sequence_length(None)
    second = usp_attn.gather_sequence(shard)
    return _result(torch.maximum((first - x).abs(), (second - x).abs()), torch.zeros(()), 0.0, "-")


def _run_scenario(name: str, dev: torch.device) -> dict:
    try:
        if name == "cross_attention":
            return _cross_attention(dev)
        return _gather_roundtrip(dev) if name == "gather_roundtrip" else _scenario(name, dev)
    except Exception as exc:  # in the verdict; the peers may then time out in their collective
        traceback.print_exc()
        return {"error": float("inf"), "tol": 0.0, "finite": False, "backend": "-", "replicated": "",
                "exception": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}


def layout(k: int, u: int, r: int) -> dict[str, dict]:
    """This rank's result of every scenario in layout U x R, the world cut into groups of k."""
    usp_attn.init_sequence_parallel(u, r, ranks=_groups(k), timeout=TIMEOUT_S)
    try:
        return {name: _run_scenario(name, device()) for name in SCENARIOS}
    finally:
        usp_attn.destroy_sequence_parallel()
        dist.barrier()


def judge(groups: list[list[int]], per_rank: list[dict]) -> dict:
    """Every rank's result of one scenario -> one verdict: ``{"error", "tol", "backend", "problems", "passed"}``."""
    worst = max(per_rank, key=lambda r: r["error"] / r["tol"] if r["tol"] else (0.0 if r["error"] == 0 else 1e30))
    problems = [f"rank {i}: {r['exception']}" for i, r in enumerate(per_rank) if r["exception"]]
    problems += [f"rank {i}: error {r['error']:.3e} > tol {r['tol']:.3e}" for i, r in enumerate(per_rank)
                 if not r["exception"] and r["error"] > r["tol"]]
    problems += [f"rank {i}: non-finite output" for i, r in enumerate(per_rank) if not r["finite"] and not r["exception"]]
    for g in groups:
        if len({per_rank[i]["replicated"] for i in g}) > 1:
            problems.append(f"group {g}: replicated outputs differ between ranks")
        if len({per_rank[i]["backend"] for i in g}) > 1:
            problems.append(f"group {g}: ranks used different backends")
    return {"error": worst["error"], "tol": worst["tol"], "backend": worst["backend"], "problems": problems,
            "passed": not problems}


# ---- safe defaults on the devices ------------------------------------------------------------------
def steady_state_syncs(u: int, r: int) -> str:
    """Default validation (the first call checked): later calls under ``set_sync_debug_mode("error")``;
    "none", or the first line of the error (CUDA only: "no CUDA" elsewhere)."""
    dev = device()
    usp_attn.init_sequence_parallel(u, r, ranks=_groups(2), timeout=TIMEOUT_S)
    try:
        gen = torch.Generator(device=dev).manual_seed(0)
        s, h, d, dtype = (4096, 12, 128, torch.bfloat16) if dev.type == "cuda" else (256, 4, 16, torch.float32)
        q, k, v = (usp_attn.shard_sequence(torch.randn(1, s, h, d, generator=gen, device=dev, dtype=dtype))
                   for _ in range(3))
        layer = usp_attn.USPAttention(h, d)
        layer(q, k, v)  # the checked first call
        layer(q, k, v)
        if dev.type != "cuda":
            return "no CUDA"
        torch.cuda.synchronize(dev)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                layer(q, k, v)
            return "none"
        except RuntimeError as exc:
            return str(exc).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        usp_attn.destroy_sequence_parallel()


def fp64_through_the_ring() -> float:
    """Max abs error of fp64 q, k, v through a ring of 2 against an fp64 einsum reference."""
    dev = device()
    usp_attn.init_sequence_parallel(1, 2, ranks=_groups(2), timeout=TIMEOUT_S)
    try:
        gen = torch.Generator(device=dev).manual_seed(1)
        q, k, v = (torch.randn(2, 300, 4, 64, generator=gen, device=dev, dtype=torch.float64) for _ in range(3))
        scores = torch.einsum("bshd,bthd->bhst", q, k) * 64**-0.5
        expected = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)
        out = usp_attn.USPAttention(4, 64)(*(usp_attn.shard_sequence(t) for t in (q, k, v)))
        assert out.dtype == torch.float64, out.dtype
        return (out - usp_attn.shard_sequence(expected)).abs().max().item()
    finally:
        usp_attn.destroy_sequence_parallel()


MASK_ON_RANK0, CPU_TENSORS = "key mask on rank 0 only", "CPU tensors under NCCL"


def first_call_error(what: str) -> dict:
    """A first call that must fail on every rank of a Ulysses-2 group, without entering a collective
    the other rank never joins: ``{"error": "ExcType: the message's second line", "message", "seconds"}``."""
    dev = device()
    usp_attn.init_sequence_parallel(2, 1, ranks=_groups(2), timeout=TIMEOUT_S)
    try:
        if what == MASK_ON_RANK0:
            q = usp_attn.shard_sequence(torch.randn(1, 64, 4, 16, device=dev))
            first = usp_attn.get_sequence_parallel_state().sp_rank == 0
            kwargs = {"attn_mask": torch.ones(1, q.shape[1], dtype=torch.bool, device=dev) if first else None}
        else:
            q, kwargs = usp_attn.shard_sequence(torch.randn(1, 64, 4, 16)), {}
        start = time.perf_counter()
        try:
            usp_attn.USPAttention(4, 16)(q, q, q, **kwargs)
            error, message = "no error", ""
        except Exception as exc:  # noqa: BLE001 - the test names what it must be
            message = str(exc)
            lines = message.splitlines() or [""]
            error = f"{type(exc).__name__}: {(lines[1] if len(lines) > 1 else lines[0]).strip()}"
        return {"error": error, "message": message, "seconds": time.perf_counter() - start}
    finally:
        usp_attn.destroy_sequence_parallel()
