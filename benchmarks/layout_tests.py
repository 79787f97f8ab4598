"""Part "layout-tests": the sequence-parallel test scenarios on the devices (NCCL on GPUs).

For every group size k dividing the world and every layout U x R = k (groups side by side): every
scenario of ``tests/distributed/sp_cases.py`` (inputs and fp64 reference built on the CPU exactly as
the gloo tests build them, then moved to the device), cross-attention and a shard/gather round trip.
Each rank compares its output rows with the reference's; replicated (text) outputs must be identical
within a group, and a group's ranks must use one backend. Tolerances as in sp_cases, except CUDA fp32:
1e-3 of the largest reference value (CUDA kernels may run fp32 through TF32, ~3e-4 relative).
"""

from __future__ import annotations

import hashlib
import traceback

import torch
import torch.distributed as dist

import usp_attn
from benchmarks.suite import Context, group_sizes, layouts_of, sequence_parallel, short_error
from tests.distributed import sp_cases
from tests.helpers.reference import reference_attention

__all__ = ["layout_tests_part", "judge", "CASES"]

CUDA_FP32_RTOL = 1e-3
CASES = [*sp_cases.SCENARIOS, "cross_attention", "gather_roundtrip"]


def _tolerance(dtype: torch.dtype, device: torch.device, want: torch.Tensor) -> float:
    peak = want.abs().max().item()
    if dtype == torch.float32:
        return sp_cases.FP32_ATOL if device.type == "cpu" else CUDA_FP32_RTOL * peak
    return sp_cases.BF16_RTOL * peak


def _result(out: torch.Tensor, want: torch.Tensor, tol: float, backend: str, replicated=None) -> dict:
    out = out.detach().cpu()
    digest = "" if replicated is None else hashlib.sha1(replicated.float().cpu().numpy().tobytes()).hexdigest()
    return {"error": (out.double() - want).abs().max().item(), "tol": tol, "finite": bool(torch.isfinite(out).all()),
            "backend": backend, "replicated": digest, "exception": ""}


def _scenario(name: str, device: torch.device) -> dict:
    p = sp_cases.SCENARIOS[name]
    prefix, suffix, length = p.get("prefix", 0), p.get("suffix", 0), p["length"]
    q, k, v, mask = sp_cases._inputs(p)  # CPU, fixed seed: identical on every rank
    causal, scale = p.get("causal", False), p.get("scale")
    want = sp_cases._local(reference_attention(q, k, v, scale=scale, causal=causal, mask=mask), prefix, length)
    q, k, v = (t.to(device) for t in (q, k, v))
    layer = usp_attn.USPAttention(p["heads"], q.shape[-1], p["kv_heads"], softmax_scale=scale, causal=causal)
    usp_attn.get_sequence_parallel_state().set_sequence_length(None if p.get("pass_seq_len") else length)
    local = lambda x: sp_cases._local(x, prefix, length)  # noqa: E731
    out = layer(local(q), local(k), local(v), attn_mask=None if mask is None else local(mask.to(device)),
                num_replicated_prefix=prefix, num_replicated_suffix=suffix,
                seq_len=length if p.get("pass_seq_len") else None)
    if out.shape != want.shape or out.dtype != q.dtype:
        raise AssertionError(f"output {tuple(out.shape)} {out.dtype}, expected {tuple(want.shape)} {q.dtype}")
    replicated = torch.cat([out[:, :prefix], out[:, out.shape[1] - suffix:]], dim=1) if prefix + suffix else None
    return _result(out, want, _tolerance(q.dtype, device, want), str(layer.backend), replicated)


def _cross_attention(device: torch.device) -> dict:
    """skip_sequence_parallel: q is this rank's shard, k/v (text) full on every rank."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, h, 16, generator=gen) for n, h in ((50, 6), (13, 2), (13, 2)))
    want = usp_attn.shard_sequence(reference_attention(q, k, v))
    layer = usp_attn.USPAttention(6, 16, 2, skip_sequence_parallel=True)
    out = layer(usp_attn.shard_sequence(q.to(device)), k.to(device), v.to(device))
    return _result(out, want, _tolerance(torch.float32, device, want), str(layer.backend))


def _gather_roundtrip(device: torch.device) -> dict:
    """shard then gather returns the tensor exactly (uneven 23 tokens), also when the global length
    must be exchanged first."""
    x = torch.arange(2 * 23 * 3, dtype=torch.float32, device=device).reshape(2, 23, 3)
    shard = usp_attn.shard_sequence(x)
    first = usp_attn.gather_sequence(shard)
    usp_attn.get_sequence_parallel_state().set_sequence_length(None)
    second = usp_attn.gather_sequence(shard)
    return _result(torch.maximum((first - x).abs(), (second - x).abs()), torch.zeros(()), 0.0, "-")


def _run_case(name: str, device: torch.device) -> dict:
    try:
        if name == "cross_attention":
            return _cross_attention(device)
        return _gather_roundtrip(device) if name == "gather_roundtrip" else _scenario(name, device)
    except Exception as exc:  # reported in the table; the peers may then time out in their collective
        traceback.print_exc()
        return {"error": float("inf"), "tol": 0.0, "finite": False, "backend": "-", "replicated": "",
                "exception": short_error(exc, 300)}


def judge(groups: list[list[int]], per_rank: list[dict]) -> dict:
    """Every rank's result of one case -> one verdict: ``{"error", "tol", "backend", "problems", "passed"}``."""
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


def layout_tests_part(ctx: Context) -> list[dict]:
    rows = []
    for k in group_sizes(ctx.world):
        groups = [list(range(g, g + k)) for g in range(0, ctx.world, k)]
        for u, r in layouts_of(k):
            verdicts = []
            with sequence_parallel(ctx, u, r):
                for name in CASES:
                    everyone = [None] * ctx.world
                    dist.all_gather_object(everyone, _run_case(name, ctx.device))
                    verdicts.append((name, judge(groups, everyone)))
            worst_name, worst = max(verdicts, key=lambda nv: nv[1]["error"] / nv[1]["tol"] if nv[1]["tol"] else 0.0)
            failed = [f"{n} ({'; '.join(v['problems'][:2])})" for n, v in verdicts if not v["passed"]]
            rows.append({"what": f"{len(CASES)} scenarios", "layout": f"{u}x{r}", "gpus": k,
                         "backend": worst["backend"], "passed": f"{len(verdicts) - len(failed)}/{len(verdicts)}",
                         "worst_error/tol": worst["error"] / worst["tol"] if worst["tol"] else 0.0,
                         "worst_case": worst_name, "result": "PASS" if not failed else "FAIL",
                         "note": "; ".join(failed)})
    return rows
