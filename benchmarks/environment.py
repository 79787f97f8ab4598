"""Parts "env" (what ran: device, versions, usp_attn's picks) and "ceilings" (what the device can do)."""

from __future__ import annotations

import platform as py_platform
import subprocess
import time

import torch

import usp_attn
from usp_attn import LocalAttention
from usp_attn.platforms import current_platform

from benchmarks.kernels import CANDIDATES, package_version
from benchmarks.suite import Context, short_error
from benchmarks.timing import time_fn

__all__ = ["environment", "env_part", "ceilings_part"]

PACKAGES = ("triton", "flash-attn", "flash-attn-4", "sageattention", "yunchang", "diffusers")


def git_commit(root: str) -> str:
    """The checkout's commit, "<sha>, with local changes" when the files differ from it (a report must
    not name a commit whose code it did not run), or "unknown" outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=root)

    try:
        sha = git("rev-parse", "--short", "HEAD").stdout.strip()
        if not sha:
            return "unknown"
        changed = git("status", "--porcelain").stdout.strip()  # untracked files count: they may be code too
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}, with local changes" if changed else sha


def environment(device: torch.device) -> dict:
    """Versions and the device, as one flat dict (also the header of every report)."""
    info = {"date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "python": py_platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "usp_attn": usp_attn.__version__}
    info.update({name: package_version(name) for name in PACKAGES if package_version(name)})
    info["git commit"] = git_commit(__file__.rsplit("/", 2)[0])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}", "gpus": torch.cuda.device_count(),
                     "cudnn": torch.backends.cudnn.version(), "nccl": ".".join(map(str, torch.cuda.nccl.version()))})
    else:
        info["gpu"] = "none (CPU)"
    return info


def env_part(ctx: Context) -> list[dict]:
    info = environment(ctx.device)
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        info.update({"SMs": props.multi_processor_count, "memory GiB": round(props.total_memory / 2**30, 1),
                     "L2 MiB": round(getattr(props, "L2_cache_size", 0) / 2**20, 1)})
        try:
            q = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu"
            info["nvidia-smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:
            info["nvidia-smi"] = short_error(exc)
    info["usp_attn platform"] = current_platform().describe()
    dtype = ctx.dtype or (torch.bfloat16 if ctx.cuda else torch.float32)
    for d in (128, 64):
        sel = LocalAttention(1, d).selection(dtype)
        info[f"auto pick ({str(dtype).removeprefix('torch.')}, D={d})"] = f"{sel.backend}" + (" (kernel measured per shape)" if ctx.cuda else "")
    info["auto pick with LSE (ring)"] = str(LocalAttention(1, 128).selection(dtype, need_lse=True).backend)
    info["candidates here"] = ", ".join(c.name for c in CANDIDATES if not c.reason(ctx.device)) or "none"
    return [{"what": k, "value": v} for k, v in info.items()]


def ceilings_part(ctx: Context) -> list[dict]:
    n, nbytes = (8192, 2**30) if ctx.cuda else (512, 2**20)
    dtype = ctx.dtype or torch.bfloat16
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, device=ctx.device).to(dtype) for _ in range(2))
    mm = time_fn(torch.matmul, [(a, b)], warmup=3, reps=20 if ctx.cuda else 3, device=ctx.device).median
    src = torch.randn(nbytes // 4, generator=gen, device=ctx.device)
    cp = time_fn(torch.empty_like(src).copy_, [(src,)], warmup=3, reps=20 if ctx.cuda else 3, device=ctx.device).median
    return [{"what": f"{str(dtype).removeprefix('torch.')} matmul {n}^3 (random data)", "ms": mm * 1e3,
             "tflops": 2 * n**3 / mm / 1e12},
            {"what": f"device copy {nbytes / 2**20:.0f} MiB (read + write)", "ms": cp * 1e3,
             "GB/s": 2 * nbytes / cp / 1e9}]
