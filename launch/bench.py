"""Benchmark usp_attn's attention layers: local kernels per backend and sequence-parallel layouts.

    python launch/bench.py [--shape B,H,S,D ...] [--dtype bf16|fp16|fp32] [--backends auto,torch_sdpa,...]
                           [--warmup N] [--reps N] [--causal] [--markdown FILE] [--plot FILE] [--json FILE]
    torchrun --nproc-per-node W launch/bench.py --layouts 2x1,1x2 [--peers yunchang,diffusers] ...

Single process: ``LocalAttention`` with each backend forced (unavailable ones listed with
the reason) and with automatic selection. Under torchrun also ``USPAttention`` per
``UxR`` layout (U * R = W; default: every factorisation of W) and, where installed,
yunchang's LongContextAttention and diffusers' context parallel on the same shards.

Columns: median time per call; TFLOP/s = 4·B·H·S²·D (halved with --causal) / time;
"vs fastest" = TFLOP/s per rank / the fastest local kernel's TFLOP/s at that shape
(so 1.0 for the fastest local row, and parallel efficiency per GPU for layouts);
"rel err" = ‖gathered output − local automatic output‖ / ‖local output‖.
Timing: CUDA events around each call after a warm-up, cycling input sets larger than
L2 (about 2 s per row unless --reps); on CPU time.perf_counter, 3 calls. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from usp_attn import AttentionBackendEnum  # noqa: E402

from benchmarks.bench_rows import BenchSettings, Row, local_rows, parallel_rows  # noqa: E402
from benchmarks.peers import PEERS  # noqa: E402
from benchmarks.report import MATPLOTLIB_MISSING, markdown_table, write_plot  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Wan 2.x self-attention at 480p / 720p (REFERENCE §5), B=1, D=128: (B, H, S, D)
GPU_SHAPES = [(1, 12, 32760, 128), (1, 40, 32760, 128), (1, 40, 75600, 128)]
CPU_SHAPES = [(1, 4, 1024, 64), (1, 8, 2048, 64)]
HEADERS = ["shape (B,H,S,D)", "implementation", "layout UxR", "backend", "median ms", "TFLOP/s",
           "TFLOP/s per rank", "vs fastest", "rel err", "note"]


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be four positive integers B,H,S,D, got {text!r}")
    return values  # type: ignore[return-value]


def parse_layouts(text: str) -> list[tuple[int, int]]:
    layouts = []
    for item in text.split(","):
        try:
            u, r = (int(x) for x in item.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--layouts takes UxR items like 2x1,1x2, got {item!r}") from None
        if u < 1 or r < 1:
            raise argparse.ArgumentTypeError(f"--layouts degrees must be positive, got {item!r}")
        layouts.append((u, r))
    return layouts


def parse_names(valid: list[str], flag: str):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"{flag}: unknown {bad}; valid: {', '.join(valid)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, action="append", metavar="B,H,S,D",
                   help="repeatable (default: the Wan shapes on GPU, small shapes on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    backends = ["auto"] + [b.value for b in AttentionBackendEnum]
    p.add_argument("--backends", type=parse_names(backends, "--backends"), default=backends,
                   help=f"local rows (default: all: {','.join(backends)})")
    p.add_argument("--layouts", type=parse_layouts, help="UxR list, U*R = world size (default: all factorisations)")
    p.add_argument("--peers", type=parse_names(list(PEERS) + ["none"], "--peers"), default=list(PEERS),
                   help="peer implementations under torchrun (default: yunchang,diffusers; 'none' for none)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per row (default: 3 GPU, 1 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per row (default: ~2 s on GPU, 3 on CPU)")
    p.add_argument("--causal", action="store_true", help="causal attention (FLOPs halved)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of TFLOP/s (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return p


def default_layouts(world: int) -> list[tuple[int, int]]:
    return [(world // r, r) for r in range(1, world + 1) if world % r == 0] if world > 1 else []


def check_layouts(layouts, world: int, parser) -> None:
    for u, r in layouts:
        if u * r != world:
            hint = "" if world > 1 else f"; run under torchrun --nproc-per-node {u * r}"
            parser.error(f"--layouts {u}x{r}: U*R = {u * r} must equal the world size {world}{hint}")


def rows_to_table(rows: list[Row]) -> str:
    fastest = {}
    for r in rows:
        if r.layout == "local" and r.tflops:
            fastest[r.shape] = max(fastest.get(r.shape, 0.0), r.tflops)
    cells = []
    for r in rows:
        best = fastest.get(r.shape)
        ratio = r.tflops_per_rank / best if (best and r.tflops_per_rank) else None
        cells.append([",".join(map(str, r.shape)), r.impl, r.layout, r.backend,
                      None if r.seconds is None else r.seconds * 1e3, r.tflops, r.tflops_per_rank, ratio,
                      r.rel_err, r.note])
    return markdown_table(HEADERS, cells)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layouts = args.layouts if args.layouts is not None else default_layouts(world)
    check_layouts(layouts, world, parser)  # before any collective: every rank fails the same way
    for flag in ("warmup", "reps"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            parser.error(f"--{flag} must be {'>= 0' if flag == 'warmup' else '>= 1'}, got {value}")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif world > 1:  # ranks share the CPU: split its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank() if world > 1 else 0
    settings = BenchSettings(
        dtype=DTYPES[args.dtype or ("bf16" if cuda else "fp32")], device=device,
        warmup=args.warmup if args.warmup is not None else (3 if cuda else 1),
        reps=args.reps, target_s=2.0, seed=args.seed, causal=args.causal,
    )
    peers = [p for p in args.peers if p != "none"]
    rows: list[Row] = []
    with torch.inference_mode():
        for shape in args.shape or (GPU_SHAPES if cuda else CPU_SHAPES):
            local, reference = local_rows(shape, settings, args.backends)
            rows += local
            if layouts:
                rows += parallel_rows(shape, settings, layouts, peers, reference)
            del reference
    if rank == 0:
        emit(rows, args, settings, device, world)
    if world > 1:
        dist.destroy_process_group()
    return 0


def emit(rows, args, settings, device, world) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    dtype = str(settings.dtype).replace("torch.", "")
    causal = ", causal" if settings.causal else ""
    title = f"usp_attn bench: {name}, {world} rank(s), {dtype}{causal}, torch {torch.__version__}"
    table = rows_to_table(rows)
    print(f"## {title}\n\n{table}")
    if args.markdown:
        pathlib.Path(args.markdown).write_text(f"## {title}\n\n{table}\n")
    if args.json:
        data = [dict(vars(r), tflops=r.tflops) for r in rows]
        pathlib.Path(args.json).write_text(json.dumps({"title": title, "rows": data}, indent=1))
    if args.plot:
        groups: dict[str, list] = {}
        for r in rows:
            label = r.impl if r.layout == "local" else f"{r.impl} {r.layout} (per rank)"
            groups.setdefault("B,H,S,D = " + ",".join(map(str, r.shape)), []).append(
                (label, r.tflops_per_rank if r.tflops_per_rank is not None else float("nan")))
        try:
            write_plot(args.plot, groups, title=title, xlabel="TFLOP/s per rank")
        except ImportError:
            print(f"bench.py: --plot {args.plot}: {MATPLOTLIB_MISSING}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
