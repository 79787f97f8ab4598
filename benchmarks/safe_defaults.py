#!/usr/bin/env python
"""What the default cross-rank argument checks cost on GPUs (NCCL), and that they behave there.

    torchrun --nproc-per-node 2 benchmarks/safe_defaults.py --out out/safe_defaults
    torchrun --nproc-per-node 2 benchmarks/safe_defaults.py --dry-run --out /tmp/safe_defaults  # CPU, gloo

For each layout of the 2 ranks (Ulysses 2, ring 2), at the Wan 1.3B 480p attention shape
(B=1, H=12, S=32760, D=128, bf16):

1. ``USPAttention`` call time for ``validate`` = None (default: the first call is checked),
   True (every call) and False: the first call and the median of steady-state calls. The
   default's steady state must cost what ``validate=False`` costs.
2. Host syncs in the default steady state: the calls run under
   ``torch.cuda.set_sync_debug_mode("error")`` (any device-to-host sync raises).
3. fp64 through the ring (R=2, small shape): max error against an fp64 reference.
4. A disagreement at the first call (rank 0 passes a key mask, rank 1 none): the error on
   every rank and the seconds it took (no NCCL collective is entered).
5. CPU tensors under an NCCL group: the named error.

Rank 0 writes ``results.json`` into ``--out`` and prints a summary. About 1 minute on 2 H200.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import usp_attn  # noqa: E402
from benchmarks.process_group import init_benchmark_group  # noqa: E402

FULL = dict(batch=1, heads=12, seq=32760, dim=128, dtype=torch.bfloat16, reps=20)
DRY = dict(batch=1, heads=4, seq=256, dim=16, dtype=torch.float32, reps=3)
LAYOUTS = {"ulysses2": (2, 1), "ring2": (1, 2)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def qkv(shape: dict, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    size = (shape["batch"], shape["seq"], shape["heads"], shape["dim"])
    full = [torch.randn(size, generator=gen, device=device, dtype=shape["dtype"]) for _ in range(3)]
    return [usp_attn.shard_sequence(t) for t in full]


def call_costs(layout, shape, device) -> dict:
    """First and steady-state call times per validate mode (fresh state and layer each)."""
    rows = {}
    for mode in ("warm-up", None, True, False):
        usp_attn.init_sequence_parallel(*layout, validate=False if mode == "warm-up" else mode, timeout=120)
        q, k, v = qkv(shape, device)
        layer = usp_attn.USPAttention(shape["heads"], shape["dim"])
        first = timed(lambda: layer(q, k, v), device)
        steady = [timed(lambda: layer(q, k, v), device) for _ in range(shape["reps"])]
        if mode is None and device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):
                    layer(q, k, v)
                rows["steady_state_syncs"] = "none"
            except RuntimeError as exc:
                rows["steady_state_syncs"] = str(exc).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        state = usp_attn.get_sequence_parallel_state()
        rows[str(mode)] = {"first_ms": first * 1e3, "steady_median_ms": statistics.median(steady) * 1e3,
                           "checks": state._checks}
        usp_attn.destroy_sequence_parallel()
    return rows


def fp64_ring(device) -> float:
    usp_attn.init_sequence_parallel(1, 2, timeout=120)
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(2, 300, 4, 64, generator=gen, device=device, dtype=torch.float64) for _ in range(3))
    scores = torch.einsum("bshd,bthd->bhst", q, k) * 64**-0.5
    expected = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)
    out = usp_attn.USPAttention(4, 64)(*(usp_attn.shard_sequence(t) for t in (q, k, v)))
    error = (out - usp_attn.shard_sequence(expected)).abs().max().item()
    usp_attn.destroy_sequence_parallel()
    return error


def first_call_error(device, make) -> dict:
    """Run a first call that must fail on every rank; return the error and its time."""
    usp_attn.init_sequence_parallel(2, 1, timeout=120)
    q, k, v, kwargs = make(device)
    start = time.perf_counter()
    try:
        usp_attn.USPAttention(4, 16)(q, k, v, **kwargs)
        result = {"type": None, "message": ""}
    except Exception as exc:  # noqa: BLE001 - reported
        result = {"type": type(exc).__name__, "message": str(exc)}
    result["seconds"] = time.perf_counter() - start
    usp_attn.destroy_sequence_parallel()
    return result


def mask_on_rank0(device):
    q = usp_attn.shard_sequence(torch.randn(1, 64, 4, 16, device=device))
    mask = torch.ones(1, q.shape[1], dtype=torch.bool, device=device) if dist.get_rank() == 0 else None
    return q, q, q, {"attn_mask": mask}


def cpu_tensors(device):
    q = usp_attn.shard_sequence(torch.randn(1, 64, 4, 16))
    return q, q, q, {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU + gloo, tiny shapes (checks the script)")
    parser.add_argument("--out", default="out/safe_defaults")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = init_benchmark_group(cuda, datetime.timedelta(seconds=300))
    if dist.get_world_size() != 2:
        raise SystemExit(f"run with torchrun --nproc-per-node 2 (got {dist.get_world_size()} ranks)")
    shape = FULL if cuda else DRY
    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
               "shape": {k: str(v) for k, v in shape.items()}}
    results["call_costs"] = {name: call_costs(layout, shape, device) for name, layout in LAYOUTS.items()}
    results["fp64_ring_max_error"] = fp64_ring(device)
    results["disagreement_first_call"] = first_call_error(device, mask_on_rank0)
    if cuda:
        results["cpu_tensors_under_nccl"] = first_call_error(device, cpu_tensors)
    gathered = [None, None]
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(gathered, indent=2))
        for rank, res in enumerate(gathered):
            print(f"rank {rank}: {res['device']}, torch {res['torch']}")
            for name, rows in res["call_costs"].items():
                for mode in ("None", "True", "False"):
                    row = rows[mode]
                    print(f"  {name:9s} validate={mode:5s} first {row['first_ms']:8.2f} ms  steady median "
                          f"{row['steady_median_ms']:8.2f} ms  checks {row['checks']}")
                if "steady_state_syncs" in rows:
                    print(f"  {name:9s} host syncs in the default steady state: {rows['steady_state_syncs']}")
            print(f"  fp64 ring max error: {res['fp64_ring_max_error']:.2e}")
            for key in ("disagreement_first_call", "cpu_tensors_under_nccl"):
                if key in res:
                    err = res[key]
                    lines = err["message"].splitlines() or [""]
                    detail = lines[1].strip() if len(lines) > 1 else lines[0]
                    print(f"  {key}: {err['type']} after {err['seconds'] * 1e3:.1f} ms: {detail[:120]}")
        print(f"wrote {out / 'results.json'}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
