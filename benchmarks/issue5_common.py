"""Settings and helpers shared by the sections of ``gpu_issue5.py``."""

from __future__ import annotations

import dataclasses
import time

import torch

from usp_attn import AttentionBackendEnum, LocalAttention
from usp_attn.backends.sdpa import cuda_subkernel
from usp_attn.platforms import current_platform

from benchmarks.kernels import RawKernel, kernel_by_name
from benchmarks.timing import Timing, plan_reps, time_fn

__all__ = ["Ctx", "GPU_CONFIG", "SMOKE_CONFIG", "auto_raw_kernel", "measure", "short_error"]

#: (B, H, S, D); Wan 2.1 1.3B 480p, 14B 480p, 14B 720p self-attention (REFERENCE §5)
WAN_SHAPES = [(1, 12, 32760, 128), (1, 40, 32760, 128), (1, 40, 75600, 128)]

GPU_CONFIG = dict(
    p1_shapes=WAN_SHAPES, p2_shape=(1, 12, 4096, 128), p3_shapes=WAN_SHAPES, ring_sizes=(2, 4, 8),
    check_shape=(1, 8, 2048, 128), dtype=torch.bfloat16, target_s=1.5, p2_reps=300, compile_backend="inductor",
)
#: --cpu-smoke: the same code paths at toy sizes, so the GPU call cannot fail on a typo
SMOKE_CONFIG = dict(
    p1_shapes=[(1, 2, 256, 64), (1, 3, 200, 64)], p2_shape=(1, 2, 256, 64), p3_shapes=[(1, 2, 256, 64)],
    ring_sizes=(2, 4), check_shape=(1, 2, 128, 64), dtype=torch.bfloat16, target_s=0.05, p2_reps=5,
    compile_backend="eager",
)


@dataclasses.dataclass
class Ctx:
    device: torch.device
    smoke: bool
    config: dict
    budget_s: float
    t0: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def dtype(self) -> torch.dtype:
        return self.config["dtype"]

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s


def short_error(exc: BaseException, limit: int = 300) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text[:limit]


def auto_raw_kernel(device: torch.device, dtype: torch.dtype, head_size: int) -> tuple[str, RawKernel | None, str]:
    """What automatic selection runs for a plain (no mask, no LSE) call: backend, the raw kernel
    that implements it, and a description (e.g. ``torch_sdpa -> cudnn``)."""
    layer = LocalAttention(1, head_size)
    sel = layer.selection(dtype)
    backend = sel.backend
    if backend == AttentionBackendEnum.TORCH_SDPA:
        if device.type == "cuda":
            sub = cuda_subkernel(current_platform().capability, dtype, head_size, False)
            name = {"cudnn": "cudnn", "flash": "flash (aten)", "efficient": "efficient"}.get(sub)
        else:
            sub, name = "cpu sdpa", "cpu flash (aten)"
        return str(backend), (kernel_by_name(name) if name else None), f"torch_sdpa -> {sub}"
    if backend == AttentionBackendEnum.FA:
        return str(backend), kernel_by_name("flash-attn"), "fa"
    if backend == AttentionBackendEnum.SAGE_ATTN:
        return str(backend), kernel_by_name("sage1 (triton)"), "sage_attn"
    return str(backend), None, str(backend)


def measure(ctx: Ctx, fn, arg_sets, *, target_s: float | None = None, lo: int = 5, hi: int = 50,
            warmup: int = 1) -> Timing:
    """Warm up, time one call to plan the repetitions (about ``target_s`` in all), then time."""
    first = time_fn(fn, arg_sets, warmup=warmup, reps=1, device=ctx.device).median
    reps = plan_reps(first, target_s=target_s or ctx.config["target_s"], lo=lo, hi=hi)
    if ctx.smoke:
        reps = min(reps, 3)
    return time_fn(fn, arg_sets, warmup=0, reps=reps, device=ctx.device)
