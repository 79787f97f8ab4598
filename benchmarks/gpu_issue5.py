"""Issue 5 on one GPU, in one call: environment, ceilings, correctness, host syncs, P2, P1, P3, compile.

    python benchmarks/gpu_issue5.py                 # on the GPU machine (< 6 min on an H100)
    python benchmarks/gpu_issue5.py --cpu-smoke     # toy sizes on CPU: every code path, no GPU

Sections (each in its own try/except: an error is reported and the next one runs):
    env          GPU, driver, torch/CUDA/cuDNN/Triton/SageAttention versions, usp_attn's picks
    ceilings     bf16 matmul 8192^3 TFLOP/s and device-to-device copy GB/s, measured here
    correctness  every available kernel, LocalAttention per backend, USPAttention (world 1) and the
                 ring loop vs an fp64 reference; SageAttention leaves the caller's K untouched
    syncs        steady-state forwards under torch.cuda.set_sync_debug_mode("error")
    p2           raw kernel vs LocalAttention vs USPAttention (world 1), B=1 H=12 S=4096 D=128
    p1           TFLOP/s of every raw kernel and of LocalAttention (auto) at the Wan shapes
    p3           the ring's per-rank work (R blocks + merge, in-memory exchange) vs one call, R=2,4,8
    compile      torch.compile(fullgraph=True) of LocalAttention / USPAttention with torch_sdpa

Markdown tables go to stdout as each section finishes, a summary last; with $OUT set
(or --out DIR) everything also goes to DIR/results.json, rewritten after each section.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform as py_platform
import subprocess
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import usp_attn  # noqa: E402
from usp_attn.platforms import current_platform  # noqa: E402

from benchmarks.issue5_checks import compile_check, correctness, sync_debug  # noqa: E402
from benchmarks.issue5_common import GPU_CONFIG, SMOKE_CONFIG, Ctx, auto_raw_kernel, short_error  # noqa: E402
from benchmarks.issue5_speed import p1_default_choice, p2_layer_overhead, p3_ring_hops  # noqa: E402
from benchmarks.kernels import RAW_KERNELS, package_version  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from benchmarks.timing import time_fn  # noqa: E402

SECTION_ORDER = ["env", "ceilings", "correctness", "syncs", "p2", "p1", "p3", "compile"]


def env_info(ctx: Ctx) -> dict:
    info = {
        "python": py_platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": package_version("triton"), "sageattention": package_version("sageattention"),
        "flash-attn": package_version("flash-attn") or package_version("flash_attn"),
        "usp_attn": usp_attn.__version__, "usp_attn platform": current_platform().describe(),
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    try:
        info["git commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or "unknown (no .git)"
    except Exception:
        info["git commit"] = "unknown"
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                     "SMs": props.multi_processor_count,
                     "memory GiB": round(props.total_memory / 2**30, 1),
                     "L2 MiB": round(getattr(props, "L2_cache_size", 0) / 2**20, 1)})
        try:
            q = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu"
            info["nvidia-smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:
            info["nvidia-smi"] = short_error(exc)
    d = ctx.config["p1_shapes"][0][3]
    backend, kernel, desc = auto_raw_kernel(ctx.device, ctx.dtype, d)
    info[f"auto pick ({str(ctx.dtype).replace('torch.', '')}, D={d})"] = desc
    lse = usp_attn.LocalAttention(1, d).selection(ctx.dtype, need_lse=True)
    info["auto pick with LSE (ring)"] = str(lse.backend)
    info["raw kernels here"] = ", ".join(f"{k.name}" for k in RAW_KERNELS if not k.reason(ctx.device)) or "none"
    table = markdown_table(["item", "value"], [[k, v] for k, v in info.items()])
    return {"table": table, "data": info}


def ceilings(ctx: Ctx) -> dict:
    n = 512 if ctx.smoke else 8192
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=ctx.device).to(ctx.dtype)
    b = torch.randn(n, n, generator=gen, device=ctx.device).to(ctx.dtype)
    mm = time_fn(torch.matmul, [(a, b)], warmup=3, reps=3 if ctx.smoke else 20, device=ctx.device)
    nbytes = (2**20 if ctx.smoke else 2**30)
    src = torch.randn(nbytes // 4, generator=gen, device=ctx.device)
    dst = torch.empty_like(src)
    cp = time_fn(dst.copy_, [(src,)], warmup=3, reps=3 if ctx.smoke else 20, device=ctx.device)
    data = {"matmul_tflops": 2 * n**3 / mm.median / 1e12, "matmul_n": n,
            "copy_GBps_read_plus_write": 2 * nbytes / cp.median / 1e9, "copy_bytes": nbytes}
    table = markdown_table(["ceiling", "measured"], [
        [f"{str(ctx.dtype).replace('torch.', '')} matmul {n}^3 (random data), TFLOP/s", data["matmul_tflops"]],
        [f"device copy {nbytes / 2**20:.0f} MiB, GB/s (read + write)", data["copy_GBps_read_plus_write"]],
    ])
    return {"table": table, "data": data}


SECTIONS = {"env": env_info, "ceilings": ceilings, "correctness": correctness, "syncs": sync_debug,
            "p2": p2_layer_overhead, "p1": p1_default_choice, "p3": p3_ring_hops, "compile": compile_check}


def summary_table(results: dict) -> str:
    rows = []
    for name in SECTION_ORDER:
        res = results.get(name, {})
        if "error" in res:
            rows.append([name, "-", "ERROR", res["error"][:200]])
        for item in res.get("summary", []):
            item = dict(item)
            row = item.pop("row")
            ratio = item.pop("ratio", None)
            rows.append([row, ratio, item.pop("target", ""), ", ".join(f"{k}={_short(v)}" for k, v in item.items())])
    return markdown_table(["row", "ratio", "target", "details"], rows)


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else v


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (checks every code path)")
    parser.add_argument("--sections", default=",".join(SECTION_ORDER), help=f"subset of {','.join(SECTION_ORDER)}")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the remaining work once this is spent")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.json (default: $OUT)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; valid: {','.join(SECTION_ORDER)}")
    if args.cpu_smoke:
        device, config = torch.device("cpu"), SMOKE_CONFIG
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --cpu-smoke for a dry run on CPU")
    else:
        device, config = torch.device("cuda", torch.cuda.current_device()), GPU_CONFIG
        torch.cuda.set_device(device)
    ctx = Ctx(device=device, smoke=args.cpu_smoke, config=config, budget_s=args.budget_s)
    out_dir = pathlib.Path(args.out) if args.out else None
    results: dict = {}
    for name in sections:
        print(f"\n## {name}\n", flush=True)
        if ctx.over_budget() and name not in ("env",):
            results[name] = {"error": f"skipped: {ctx.elapsed():.0f} s spent of the {args.budget_s:.0f} s budget"}
            print(results[name]["error"], flush=True)
            continue
        t0 = time.monotonic()
        try:
            with torch.inference_mode(name != "compile"):
                results[name] = SECTIONS[name](ctx)
            print(results[name]["table"], flush=True)
        except Exception as exc:
            results[name] = {"error": short_error(exc, 1000), "traceback": traceback.format_exc()}
            print(f"ERROR in {name}: {results[name]['traceback']}", flush=True)
        results[name]["seconds"] = time.monotonic() - t0
        print(f"\n({name}: {results[name]['seconds']:.1f} s; total {ctx.elapsed():.1f} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n## summary\n\n" + summary_table(results), flush=True)
    print(f"\ntotal {ctx.elapsed():.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
