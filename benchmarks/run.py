#!/usr/bin/env python
"""The benchmark suite's one entry point: named parts, one row format, one report.

    python benchmarks/run.py --parts one-gpu --out DIR     # DIR/report.md, results.json, report.png
    torchrun --nproc-per-node N benchmarks/run.py --parts scaling,peers --json FILE
    python benchmarks/run.py --dry-run --parts kernels      # CPU, toy sizes: every code path
    python benchmarks/run.py --help                         # every part
    python -m benchmarks.run ...                            # the same, from the repository root

A part is ``fn(ctx) -> list[dict]`` (benchmarks/suite.py). "one" parts run in a single process,
"any" parts also under torchrun (every rank takes part). Without a GPU, or with --dry-run, parts
run on the CPU at toy sizes (gloo between ranks). An error in a part is reported and the next part
runs; rank 0 prints each part as it finishes and rewrites the JSON after each, so a run cut off
still reports. Exit status 1 if a part failed.

Parts measure; whether the code is right is the tests' business (GPU checks: ``pytest -m gpu tests/gpu``
and ``pytest -m multigpu tests/gpu``; launch/single_gpu_check.sh and launch/multigpu_check.sh run both).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import inspect
import logging
import os
import pathlib
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (not -m): the packages benchmarks, launch and usp_attn of this checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.environment import environment  # noqa: E402
from benchmarks.suite import Context, short_error  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Part:
    function: str  # "module:function", imported when the part runs
    ranks: str  # "one": a single process; "any": also every rank of a torchrun
    about: str
    inference: bool = True  # run under torch.inference_mode()


PARTS: dict[str, Part] = {
    "env": Part("benchmarks.environment:env_part", "any", "device, versions, usp_attn's automatic picks"),
    "ceilings": Part("benchmarks.environment:ceilings_part", "one", "bf16 matmul and device copy, measured here"),
    "compile": Part("benchmarks.compile_speed:compile_part", "one",
                    "torch.compile(fullgraph=True): compile time, eager vs compiled call", inference=False),
    "kernels": Part("benchmarks.kernel_speed:kernels_part", "one", "every kernel's speed; P1 layer / fastest kernel"),
    "crossover": Part("benchmarks.kernel_speed:crossover_part", "one",
                      "FA4 vs cuDNN over keys per call: the static rule's threshold"),
    "layer-overhead": Part("benchmarks.layer_overhead:layer_overhead_part", "one", "P2: layer vs raw kernel time"),
    "ring-hops": Part("benchmarks.ring_hops:ring_hops_part", "one", "P3: ring per-rank work vs one call"),
    "scaling": Part("benchmarks.scaling:scaling_part", "any", "P4: attention layer on 1..N GPUs, every layout"),
    "peers": Part("benchmarks.peers:peers_part", "any", "P5: yunchang, diffusers CP attention vs ours"),
    "model-step": Part("benchmarks.model_step:model_step_part", "any", "built-in DiT and diffusers Wan forwards"),
    "communication": Part("benchmarks.communication:communication_part", "any", "transfers vs link bandwidth"),
    # Parts kept in modules of their own: function(ctx) -> list of row dicts, or function(dry_run=...) for a
    # module also run on its own (the process group is up either way). A module not in this checkout makes
    # its part say so instead of failing the run.
    "ring-backward": Part("benchmarks.training:ring_backward_part", "one",
                          "ring forward + backward per rank vs one kernel call", inference=False),
    "training-step": Part("benchmarks.training:training_step_part", "any",
                          "built-in DiT training step: 1 GPU, Ulysses, ring", inference=False),
    "diffusers-families": Part("benchmarks.diffusers_families:rows", "any",
                               "diffusers model families: usp_attn vs diffusers context parallel"),
    "safe-defaults": Part("benchmarks.safe_defaults:safe_defaults_part", "any",
                          "cost of the default cross-rank argument checks (2 ranks)"),
    "text-padding": Part("benchmarks.text_padding:text_padding_part", "any",
                         "joint attention with padded text: attn_mask vs replicated_key_mask"),
    "sparse-quality": Part("benchmarks.sparse_quality:sparse_quality_part", "one",
                           "sparse patterns' density and error: synthetic video-like and the built-in model"),
    "sparse": Part("benchmarks.sparse_attention:sparse_part", "one", "sliding-tile sparse vs dense; per-rank work"),
    "sparse-sp": Part("benchmarks.sparse_attention:sparse_sp_part", "any",
                      "USPAttention sparse vs dense in every layout of the ranks (S2 measured)"),
    "causal-balance": Part("benchmarks.causal_balance:causal_balance_part", "one", "causal ring work per rank: contiguous vs zigzag"),
    "layout": Part("benchmarks.layout_model:layout_part", "one",
                   "layout cost model: kernel terms measured here, predicted (cfg, U, R) times on 2/4/8 and 2x8 GPUs"),
    "layout-check": Part("benchmarks.layout_model:layout_check_part", "any",
                         "every (cfg, U, R) of the world: predicted vs measured guided step; is the pick the fastest"),
    "host-cost": Part("benchmarks.host_cost:host_cost_part", "one",
                      "eager vs CUDA-graph-captured LocalAttention / raw kernel (call-and-wait); DiT block eager, "
                      "compiled, captured", inference=False),
    "ulysses-overlap": Part("benchmarks.host_cost:ulysses_overlap_part", "any",
                            "Ulysses-2 at Wan 14B 720p: efficiency with and without the head-group pipeline"),
}
#: the one-GPU set, the short parts first
ONE_GPU = ["env", "ceilings", "layer-overhead", "kernels", "ring-hops", "compile", "ring-backward", "causal-balance",
           "crossover", "sparse", "sparse-quality", "layout"]
#: the multi-GPU set (under torchrun)
MULTI_GPU = ["env", "ulysses-overlap", "layout-check", "sparse-sp", "scaling", "peers", "model-step", "communication",
             "safe-defaults", "training-step", "diffusers-families", "text-padding"]
GROUPS = {"one-gpu": ONE_GPU, "multi-gpu": MULTI_GPU}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be four positive integers B,H,S,D, got {text!r}")
    return values  # type: ignore[return-value]


def parse_parts(text: str) -> list[str]:
    names = [n for item in text.split(",") if item.strip() for n in GROUPS.get(item.strip(), [item.strip()])]
    bad = [n for n in names if n not in PARTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown part(s) {bad}; valid: {', '.join([*PARTS, *GROUPS])}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(f"  {n:<19} [{part.ranks}] {part.about}" for n, part in PARTS.items()))
    p.add_argument("--parts", type=parse_parts, default=None, metavar="A,B,...",
                   help="parts or sets (one-gpu, multi-gpu) to run; default: one-gpu, or multi-gpu under torchrun")
    p.add_argument("--dry-run", action="store_true", help="CPU and toy sizes even where a GPU is present")
    p.add_argument("--shape", type=parse_shape, action="append", metavar="B,H,S,D",
                   help="attention shape for kernels, ring-hops, scaling, peers (repeatable)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="instead of each part's default")
    p.add_argument("--reps", type=int, help="timed calls per row instead of planning ~--target-s of calls")
    p.add_argument("--target-s", type=float, default=1.0, help="seconds of calls per timed row on a GPU")
    p.add_argument("--budget-s", type=float, default=300.0, help="start nothing new once this many seconds are spent")
    p.add_argument("--out", metavar="DIR", help="write DIR/report.md, DIR/results.json, DIR/report.png (rank 0)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (rank 0)")
    return p


def _init_group(cuda: bool) -> torch.device:
    """Join torchrun's group, or make a 1-rank one: NCCL on ``cuda:LOCAL_RANK``, else gloo."""
    alone = {} if "WORLD_SIZE" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    timeout = datetime.timedelta(minutes=5)
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device, **alone)
        return device
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group("gloo", timeout=timeout, **alone)
    return torch.device("cpu")


def run_part(name: str, ctx: Context) -> dict:
    part = PARTS[name]
    module, _, function = part.function.partition(":")
    t0 = time.monotonic()
    try:
        fn = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return {"rows": [], "error": f"not in this checkout: {module} is missing", "seconds": 0.0}
    try:
        with torch.inference_mode(part.inference):
            entry = {"rows": fn(ctx) if "ctx" in inspect.signature(fn).parameters else fn(dry_run=ctx.dry_run)}
    except Exception as exc:
        entry = {"rows": [], "error": short_error(exc, 1000), "traceback": traceback.format_exc()}
        print(f"[rank {ctx.rank}] ERROR in part {name}:\n{entry['traceback']}", file=sys.stderr, flush=True)
    ctx.free()
    entry["seconds"] = time.monotonic() - t0
    return entry


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parts = args.parts or (MULTI_GPU if world > 1 else ONE_GPU)
    single = [n for n in parts if PARTS[n].ranks == "one"]
    if world > 1 and single:
        parser.error(f"--parts {','.join(single)}: single-process parts; run them without torchrun")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    cuda = torch.cuda.is_available() and not args.dry_run
    device = _init_group(cuda) if world > 1 or any(PARTS[n].ranks == "any" for n in parts) else (
        torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    ctx = Context(device=device, dry_run=not cuda, budget_s=args.budget_s, target_s=args.target_s, dtype=dtype,
                  shapes=args.shape, reps=args.reps)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    title = f"usp_attn benchmarks: {ctx.world} x {name}" + (" (CPU DRY RUN: toy sizes; numbers mean nothing)"
                                                             if ctx.dry_run else "")
    result = {"title": title, "command": " ".join(sys.argv),
              "env": environment(device), "world": ctx.world, "dry_run": ctx.dry_run, "parts": {}}
    for name in parts:
        if ctx.out_of_time():
            entry = {"rows": [], "error": f"skipped: {args.budget_s:.0f} s budget spent", "seconds": 0.0}
        else:
            entry = run_part(name, ctx)
        result["parts"][name] = entry
        if ctx.rank == 0:
            print(report.part_section(name, entry), flush=True)
            report.write(result, out_dir=args.out, json_path=args.json, plot=False)
    if ctx.rank == 0:
        report.write(result, out_dir=args.out, json_path=args.json, plot=True)
        print(f"\n{report.headline_table(result)}\n\ntotal {time.monotonic() - ctx.t0:.0f} s", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 1 if report.failures(result) else 0


if __name__ == "__main__":
    sys.exit(main())
