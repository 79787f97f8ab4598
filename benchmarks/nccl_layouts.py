"""The sequence-parallel scenarios of ``tests/distributed/sp_cases.py`` on real devices, under torchrun.

    torchrun --standalone --nproc-per-node N benchmarks/nccl_layouts.py [--json FILE]

Each rank uses ``cuda:LOCAL_RANK`` and NCCL when CUDA is available, else the CPU and gloo
(the dry run). For every world size ``k`` dividing N (default: all of them) and every
layout ``U x R = k``, the N ranks are split into N/k contiguous sequence-parallel groups
(``init_sequence_parallel(U, R, ranks=...)``), each running the same case side by side.

Cases: every entry of ``sp_cases.SCENARIOS`` (inputs and fp64 reference built on the CPU
from a fixed seed, exactly as the gloo tests build them; q/k/v/mask then moved to the
device), plus cross-attention (``skip_sequence_parallel``) and a shard/gather round trip.
Each rank's output rows are compared with the same rows of the reference.

Tolerances: CPU as in sp_cases (fp32 2e-5 absolute; bf16 2^-6 of the largest reference
value). CUDA fp32: 1e-3 of the largest reference value, because CUDA attention kernels
may run fp32 inputs through TF32 matrix units (~3e-4 relative, tests/gpu/common.py);
any half-precision step would exceed it. bf16 as on the CPU.
Replicated (text) outputs must also be bit-identical on every rank of a group.

Rank 0 prints one line per layout and a pass/fail table; exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import usp_attn  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from tests.distributed import sp_cases  # noqa: E402
from tests.helpers.reference import reference_attention  # noqa: E402

CUDA_FP32_RTOL = 1e-3


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def tolerance(dtype: torch.dtype, device: torch.device, want: torch.Tensor) -> float:
    peak = want.abs().max().item()
    if dtype == torch.float32:
        return sp_cases.FP32_ATOL if device.type == "cpu" else CUDA_FP32_RTOL * peak
    return sp_cases.BF16_RTOL * peak


def run_scenario(name: str, device: torch.device) -> dict:
    """One entry of sp_cases.SCENARIOS on ``device`` under the current layout."""
    state = usp_attn.get_sequence_parallel_state()
    p = sp_cases.SCENARIOS[name]
    prefix, suffix, length = p.get("prefix", 0), p.get("suffix", 0), p["length"]
    q, k, v, mask = sp_cases._inputs(p)  # CPU, fixed seed: identical on every rank
    causal, scale = p.get("causal", False), p.get("scale")
    expected = reference_attention(q, k, v, scale=scale, causal=causal, mask=mask)
    q, k, v = (t.to(device) for t in (q, k, v))
    mask = None if mask is None else mask.to(device)
    layer = usp_attn.USPAttention(p["heads"], q.shape[-1], p["kv_heads"], softmax_scale=scale, causal=causal)
    state.set_sequence_length(None if p.get("pass_seq_len") else length)
    local = lambda x: sp_cases._local(x, prefix, length)  # noqa: E731
    out = layer(local(q), local(k), local(v), attn_mask=None if mask is None else local(mask),
                num_replicated_prefix=prefix, num_replicated_suffix=suffix,
                seq_len=length if p.get("pass_seq_len") else None)
    want = local(expected)
    if out.shape != want.shape or out.dtype != q.dtype:
        raise AssertionError(f"output {tuple(out.shape)} {out.dtype}, expected {tuple(want.shape)} {q.dtype}")
    out_cpu = out.detach().cpu()
    replicated = torch.cat([out_cpu[:, :prefix], out_cpu[:, out_cpu.shape[1] - suffix:]], dim=1)
    return {"error": (out_cpu.double() - want).abs().max().item(), "tol": tolerance(q.dtype, device, want),
            "finite": bool(torch.isfinite(out_cpu).all()), "backend": str(layer.backend),
            "replicated": hashlib.sha1(replicated.float().numpy().tobytes()).hexdigest() if prefix + suffix else ""}


def cross_attention(device: torch.device) -> dict:
    """skip_sequence_parallel: q is this rank's shard, k/v (text) full on every rank."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 50, 6, 16, generator=gen), torch.randn(1, 13, 2, 16, generator=gen), \
        torch.randn(1, 13, 2, 16, generator=gen)
    want = usp_attn.shard_sequence(reference_attention(q, k, v))
    layer = usp_attn.USPAttention(6, 16, 2, skip_sequence_parallel=True)
    out = layer(usp_attn.shard_sequence(q.to(device)), k.to(device), v.to(device)).cpu()
    return {"error": (out.double() - want).abs().max().item(), "tol": tolerance(torch.float32, device, want),
            "finite": bool(torch.isfinite(out).all()), "backend": str(layer.backend), "replicated": ""}


def gather_roundtrip(device: torch.device) -> dict:
    """shard_sequence then gather_sequence returns the tensor exactly (uneven 23 tokens), also
    when the global length must be exchanged first."""
    x = torch.arange(2 * 23 * 3, dtype=torch.float32, device=device).reshape(2, 23, 3)
    shard = usp_attn.shard_sequence(x)
    first = usp_attn.gather_sequence(shard)
    usp_attn.get_sequence_parallel_state().set_sequence_length(None)
    second = usp_attn.gather_sequence(shard)
    err = max((first - x).abs().max().item(), (second - x).abs().max().item())
    return {"error": err, "tol": 0.0, "finite": True, "backend": "-", "replicated": ""}


CASES = [*sp_cases.SCENARIOS, "cross_attention", "gather_roundtrip"]


def run_case(name: str, device: torch.device) -> dict:
    try:
        if name == "cross_attention":
            res = cross_attention(device)
        elif name == "gather_roundtrip":
            res = gather_roundtrip(device)
        else:
            res = run_scenario(name, device)
        res["exception"] = ""
    except Exception as exc:  # reported in the table; peers may then time out in their collective
        res = {"error": float("inf"), "tol": 0.0, "finite": False, "backend": "-", "replicated": "",
               "exception": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        traceback.print_exc()
    return res


def judge(world: int, groups: list[list[int]], per_rank: list[dict]) -> dict:
    """Combine every rank's result of one case into one verdict."""
    worst = max(per_rank, key=lambda r: r["error"] / r["tol"] if r["tol"] else (0.0 if r["error"] == 0 else 1e30))
    problems = [f"rank {i}: {r['exception']}" for i, r in enumerate(per_rank) if r["exception"]]
    problems += [f"rank {i}: error {r['error']:.3e} > tol {r['tol']:.3e}" for i, r in enumerate(per_rank)
                 if not r["exception"] and r["error"] > r["tol"]]
    problems += [f"rank {i}: non-finite output" for i, r in enumerate(per_rank)
                 if not r["finite"] and not r["exception"]]
    for g in groups:
        if len({per_rank[i]["replicated"] for i in g}) > 1:
            problems.append(f"group {g}: replicated outputs differ between ranks")
        if len({per_rank[i]["backend"] for i in g}) > 1:
            problems.append(f"group {g}: ranks used different backends")
    return {"error": worst["error"], "tol": worst["tol"], "backend": worst["backend"], "problems": problems,
            "passed": not problems}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", help="comma-separated SP group sizes (default: every divisor of the world)")
    parser.add_argument("--json", metavar="FILE", help="write every result as JSON (rank 0)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="bound on every collective")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    timeout = datetime.timedelta(seconds=args.timeout_s)
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    rank, n = dist.get_rank(), dist.get_world_size()
    worlds = divisors(n) if not args.worlds else [int(w) for w in args.worlds.split(",")]
    bad = [w for w in worlds if w < 1 or n % w]
    if bad:
        parser.error(f"--worlds {bad}: every size must divide the world size {n}")
    t0 = time.perf_counter()
    results, failed = [], 0
    if rank == 0:
        print(f"nccl_layouts: {n} ranks, {dist.get_backend()} on {device.type}, torch {torch.__version__}", flush=True)
    for world in worlds:
        groups = [list(range(g, g + world)) for g in range(0, n, world)]
        for u in divisors(world):
            r = world // u
            usp_attn.init_sequence_parallel(u, r, ranks=groups, timeout=timeout)
            layout_results = []
            for name in CASES:
                mine = run_case(name, device)
                everyone = [None] * n
                dist.all_gather_object(everyone, mine)
                verdict = judge(world, groups, everyone)
                layout_results.append({"world": world, "layout": f"{u}x{r}", "case": name, **verdict})
            usp_attn.destroy_sequence_parallel()
            bad_cases = [res for res in layout_results if not res["passed"]]
            failed += len(bad_cases)
            results += layout_results
            if rank == 0:
                worst = max(layout_results, key=lambda x: x["error"] / x["tol"] if x["tol"] else 0.0)
                ratio = worst["error"] / worst["tol"] if worst["tol"] else 0.0
                print(f"  SP group size {world} ({len(groups)} group(s)), U{u} x R{r}: "
                      f"{len(layout_results) - len(bad_cases)}/{len(layout_results)} passed, worst error/tol "
                      f"{ratio:.3f} ({worst['case']}), backend {worst['backend']} [{time.perf_counter() - t0:.1f} s]",
                      flush=True)
                for res in bad_cases:
                    print(f"    FAIL {res['case']}: " + "; ".join(res["problems"][:4]), flush=True)
    if rank == 0:
        emit(results, n, device, args.json, time.perf_counter() - t0)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


def emit(results: list[dict], n: int, device, json_path, seconds: float) -> None:
    rows = {}
    for res in results:
        key = (res["world"], res["layout"])
        row = rows.setdefault(key, {"passed": 0, "total": 0, "worst": 0.0, "worst_case": "-", "failures": []})
        row["total"] += 1
        row["passed"] += res["passed"]
        ratio = res["error"] / res["tol"] if res["tol"] else (0.0 if res["error"] == 0 else float("inf"))
        if ratio >= row["worst"]:
            row["worst"], row["worst_case"] = ratio, res["case"]
        if not res["passed"]:
            row["failures"].append(res["case"])
    table = markdown_table(
        ["SP group size", "layout UxR", "cases passed", "worst error / tol", "worst case", "status"],
        [[w, lay, f"{r['passed']}/{r['total']}", r["worst"], r["worst_case"],
          "PASS" if not r["failures"] else "FAIL: " + ", ".join(r["failures"])] for (w, lay), r in rows.items()])
    total = len(results)
    passed = sum(res["passed"] for res in results)
    backend = "NCCL on CUDA" if device.type == "cuda" else "gloo on CPU"
    print(f"\n## NCCL layout tests: {n} ranks, {backend}\n\n{table}\n\n"
          f"{passed}/{total} cases passed in {seconds:.1f} s", flush=True)
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(
            {"ranks": n, "device": device.type, "backend": backend, "passed": passed, "total": total,
             "seconds": seconds, "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
