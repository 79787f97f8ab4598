"""What the default cross-rank argument checks cost on the devices, and that they behave there.

    torchrun --nproc-per-node 2 benchmarks/run.py --parts safe-defaults --json out/safe_defaults.json

On 2 ranks, for each layout (Ulysses 2, ring 2), at the Wan 1.3B 480p attention shape
(B=1, H=12, S=32760, D=128, bf16):

1. ``USPAttention`` call time for ``validate`` = None (default: the first call is checked),
   True (every call) and False: the first call and the median of steady-state calls. The
   default's steady state must cost what ``validate=False`` costs.
2. Host syncs in the default steady state: calls under ``torch.cuda.set_sync_debug_mode("error")``.
3. fp64 through the ring (R=2, small shape): max error against an fp64 reference.
4. A disagreement at the first call (rank 0 passes a key mask, rank 1 none): the error on
   every rank and how long it took (no collective is entered).
5. CPU tensors under an NCCL group: the error, named.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

import usp_attn
from benchmarks.suite import Context, skipped

GPU = dict(batch=1, heads=12, seq=32760, dim=128, dtype=torch.bfloat16, reps=20)
CPU = dict(batch=1, heads=4, seq=256, dim=16, dtype=torch.float32, reps=3)
LAYOUTS = {"ulysses2": (2, 1), "ring2": (1, 2)}


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _qkv(shape: dict, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    size = (shape["batch"], shape["seq"], shape["heads"], shape["dim"])
    return [usp_attn.shard_sequence(torch.randn(size, generator=gen, device=device, dtype=shape["dtype"]))
            for _ in range(3)]


def _call_costs(ctx: Context, name: str, layout, shape) -> list[dict]:
    """First and steady-state call times per validate mode (a fresh state and layer each)."""
    rows = []
    for mode in ("warm-up", None, True, False):
        usp_attn.init_sequence_parallel(*layout, validate=False if mode == "warm-up" else mode, timeout=120)
        q, k, v = _qkv(shape, ctx.device)
        layer = usp_attn.USPAttention(shape["heads"], shape["dim"])
        first = _timed(lambda: layer(q, k, v), ctx.device)
        steady = statistics.median(_timed(lambda: layer(q, k, v), ctx.device) for _ in range(shape["reps"]))
        syncs = "-"
        if mode is None and ctx.cuda:
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):
                    layer(q, k, v)
                syncs = "none"
            except RuntimeError as exc:
                syncs = str(exc).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        checks = usp_attn.get_sequence_parallel_state()._checks
        usp_attn.destroy_sequence_parallel()
        if mode != "warm-up":
            rows.append({"what": f"USPAttention validate={mode}", "layout": name, "first_ms": first * 1e3,
                         "ms": ctx.max_over_ranks(steady * 1e3), "checks": checks, "host_syncs": syncs})
    return rows


def _fp64_ring(ctx: Context) -> dict:
    usp_attn.init_sequence_parallel(1, 2, timeout=120)
    gen = torch.Generator(device=ctx.device).manual_seed(1)
    q, k, v = (torch.randn(2, 300, 4, 64, generator=gen, device=ctx.device, dtype=torch.float64) for _ in range(3))
    scores = torch.einsum("bshd,bthd->bhst", q, k) * 64**-0.5
    expected = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)
    out = usp_attn.USPAttention(4, 64)(*(usp_attn.shard_sequence(t) for t in (q, k, v)))
    error = (out - usp_attn.shard_sequence(expected)).abs().max().item()
    usp_attn.destroy_sequence_parallel()
    return {"what": "fp64 through the ring (max abs error)", "layout": "ring2", "shape": "2,4,300,64",
            "max_err": ctx.max_over_ranks(error)}


def _first_call_error(ctx: Context, what: str, make) -> dict:
    """A first call that must fail on every rank: the error and its time (slowest rank)."""
    usp_attn.init_sequence_parallel(2, 1, timeout=120)
    q, k, v, kwargs = make(ctx.device)
    start = time.perf_counter()
    try:
        usp_attn.USPAttention(4, 16)(q, k, v, **kwargs)
        error = "no error"
    except Exception as exc:  # noqa: BLE001 - the row reports it
        lines = str(exc).splitlines() or [""]
        error = f"{type(exc).__name__}: {(lines[1] if len(lines) > 1 else lines[0]).strip()[:120]}"
    seconds = ctx.max_over_ranks(time.perf_counter() - start)
    usp_attn.destroy_sequence_parallel()
    return {"what": what, "layout": "ulysses2", "ms": seconds * 1e3, "note": error}


def _mask_on_rank0(device):
    q = usp_attn.shard_sequence(torch.randn(1, 64, 4, 16, device=device))
    mask = torch.ones(1, q.shape[1], dtype=torch.bool, device=device) if dist.get_rank() == 0 else None
    return q, q, q, {"attn_mask": mask}


def _cpu_tensors(device):
    q = usp_attn.shard_sequence(torch.randn(1, 64, 4, 16))
    return q, q, q, {}


def safe_defaults_part(ctx: Context) -> list[dict]:
    if ctx.world != 2:
        return [skipped("safe defaults", f"needs 2 ranks (torchrun --nproc-per-node 2), got {ctx.world}")]
    shape = ctx.sizes(GPU, CPU)
    rows = [row for name, layout in LAYOUTS.items() for row in _call_costs(ctx, name, layout, shape)]
    rows.append(_fp64_ring(ctx))
    rows.append(_first_call_error(ctx, "key mask on rank 0 only: first-call error", _mask_on_rank0))
    if ctx.cuda:
        rows.append(_first_call_error(ctx, "CPU tensors under NCCL: first-call error", _cpu_tensors))
    return rows
