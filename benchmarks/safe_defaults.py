"""What the default cross-rank argument checks cost on the devices.

    torchrun --nproc-per-node 2 benchmarks/run.py --parts safe-defaults --json out/safe_defaults.json

On 2 ranks, for each layout (Ulysses 2, ring 2), at the Wan 1.3B 480p attention shape
(B=1, H=12, S=32760, D=128, bf16): ``USPAttention`` call time for ``validate`` = None (default: the
first call is checked), True (every call) and False: the first call, the median of steady-state
calls and the number of argument checks made. The default's steady state should cost what
``validate=False`` costs. How the defaults behave on the devices (no host sync in the steady state,
fp64 through the ring, first-call errors on every rank) is checked by tests/gpu/test_multigpu.py.
"""

from __future__ import annotations

import statistics
import time

import torch

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
        checks = usp_attn.get_sequence_parallel_state().guard.checks
        usp_attn.destroy_sequence_parallel()
        if mode != "warm-up":
            rows.append({"what": f"USPAttention validate={mode}", "layout": name, "first_ms": first * 1e3,
                         "ms": ctx.max_over_ranks(steady * 1e3), "checks": checks})
    return rows


def safe_defaults_part(ctx: Context) -> list[dict]:
    if ctx.world != 2:
        return [skipped("safe defaults", f"needs 2 ranks (torchrun --nproc-per-node 2), got {ctx.world}")]
    shape = ctx.sizes(GPU, CPU)
    return [row for name, layout in LAYOUTS.items() for row in _call_costs(ctx, name, layout, shape)]
