"""Issue 6, P4 (scaling) and P5 (peers) for one GPU count k, under torchrun.

    torchrun --standalone --nproc-per-node K benchmarks/multigpu_scaling.py --json FILE
        [--sections attention,dit,wan] [--budget-s S] [--cpu-dry-run]

Sections (each in its own try/except; the JSON is rewritten after each):

attention  Wan 14B 720p self-attention, B=1, H=40, S=75600, D=128, bf16 (launch/bench.py's
           machinery: benchmarks.bench_rows): ``LocalAttention`` (auto) on every rank, then
           for every layout U x R = K: ``USPAttention``, yunchang ``LongContextAttention``
           (benchmarks/multigpu_peers.py: its torch kernels unless flash-attn is there) and
           diffusers' context-parallel attention (``dispatch_attention_fn``), same shards.
dit        one denoising step of the built-in video DiT (launch/tiny_dit.py) at Wan 14B width
           (hidden 5120 = 40 heads x 128, FFN 13824, 512 text tokens of 4096), 2 blocks,
           81 frames of 720x1280 (75600 tokens), batch 2 (classifier-free guidance), bf16:
           without sequence parallelism, then per layout.
wan        diffusers ``WanTransformer3DModel`` at Wan 14B width, 2 blocks, the same video,
           batch 1 (WanPipeline runs the two guidance branches as separate calls): without
           sequence parallelism (the reference; timed at K = 1), usp_attn's
           ``enable_sequence_parallel`` and diffusers' ``enable_parallelism`` per layout.

Every time is the slowest rank's median (CUDA events around each call after warm-up).
``rel err`` compares the gathered / full output with the same computation without
sequence parallelism on one device. ``--cpu-dry-run``: toy sizes on CPU with gloo (every
code path; the numbers mean nothing). benchmarks/multigpu_report.py turns the JSON of
every K into the P4/P5 tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import pathlib
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "launch"):  # benchmarks.*, tests.*; launch/tiny_dit.py
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import usp_attn  # noqa: E402
from benchmarks.process_group import init_benchmark_group  # noqa: E402
from benchmarks.multigpu_sections import Run, attention_section, dit_section, short_error  # noqa: E402
from benchmarks.multigpu_wan import WAN_14B_SHAPE, WAN_TOY_SHAPE, wan_section  # noqa: E402

SECTIONS = ("attention", "dit", "wan")

#: sizes on the GPU machine and for the CPU dry run
GPU_CONFIG = dict(
    attn_shape=(1, 40, 75600, 128), dtype="bfloat16", attn_target_s=1.0, attn_warmup=2, attn_reps=None,
    model_warmup=1, model_reps=3,
    dit=dict(hidden_size=5120, num_heads=40, num_layers=2, ffn_size=13824, text_dim=4096, text_length=512),
    video=(81, 720, 1280), wan_shape=WAN_14B_SHAPE, wan_layers=2, wan_text=512,
)
CPU_CONFIG = dict(
    attn_shape=(1, 8, 256, 32), dtype="float32", attn_target_s=0.1, attn_warmup=1, attn_reps=2,
    model_warmup=0, model_reps=1,
    dit=dict(hidden_size=64, num_heads=8, num_layers=1, ffn_size=128, text_dim=32, text_length=8),
    video=(5, 64, 64), wan_shape=WAN_TOY_SHAPE, wan_layers=1, wan_text=7,
)


SECTION_FUNCS = {"attention": attention_section, "dit": dit_section, "wan": wan_section}


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "usp_attn": usp_attn.__version__, "diffusers": version("diffusers"), "yunchang": version("yunchang"),
           "flash-attn": version("flash-attn") or version("flash_attn"), "sageattention": version("sageattention"),
           "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpus visible"] = torch.cuda.device_count()
        nccl = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["gpu"] = "none (CPU dry run)"
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, metavar="FILE", help="results (rank 0), rewritten after each section")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="start no new layout once this many seconds are spent (all ranks agree)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on CPU with gloo (every code path)")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; valid: {','.join(SECTIONS)}")
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        parser.error("no CUDA GPU here; use --cpu-dry-run for toy sizes on CPU")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()  # its "experimental feature" warnings, on every rank
    except ImportError:
        pass
    device = init_benchmark_group(cuda, datetime.timedelta(minutes=5))
    run = Run(CPU_CONFIG if args.cpu_dry_run else GPU_CONFIG, device, args.budget_s)
    result = {"k": run.world, "dry_run": args.cpu_dry_run, "config": {k: v for k, v in run.config.items()},
              "env": environment(device), "sections": {}}
    failed = False
    for name in sections:
        t0 = time.monotonic()
        try:
            with torch.inference_mode():  # as launch/bench.py: forward passes only
                rows = SECTION_FUNCS[name](run)
            entry = {"rows": rows}
        except Exception as exc:
            failed = True
            entry = {"rows": [], "error": short_error(exc), "traceback": traceback.format_exc()}
            print(f"[rank {run.rank}] ERROR in section {name}:\n{entry['traceback']}", file=sys.stderr, flush=True)
        run.free()  # the section's tensors and models are gone with its frame
        entry["seconds"] = time.monotonic() - t0
        result["sections"][name] = entry
        if run.rank == 0:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=1, default=str))
            print(f"k={run.world} {name}: {len(entry['rows'])} rows in {entry['seconds']:.1f} s"
                  + (f", ERROR {entry['error']}" if "error" in entry else ""), flush=True)
            for r in entry["rows"]:
                ms = "-" if r["seconds"] is None else f"{r['seconds'] * 1e3:.2f} ms"
                err = "" if r["rel_err"] is None else f", rel err {r['rel_err']:.2e}"
                print(f"    {r['layout']:>5}  {r['impl']:<44} {ms:>12}{err}  {r['note']}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
