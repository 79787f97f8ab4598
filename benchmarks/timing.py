"""Counting and timing attention calls.

FLOPs: two matrix products of ``S_q x S_k x D`` per (batch, head), 2 FLOPs per
multiply-add: ``4 * B * H * S_q * S_k * D``; causal attention does half of it.

Timing on CUDA uses one pair of CUDA events around every call (the median of many
calls after a warm-up), cycling through several input sets so that repeated calls
do not run out of the L2 cache. A call whose Python overhead exceeds its GPU time
shows up in these numbers too: the start event is already recorded while the host
is still preparing the launch. On CPU every call is timed with ``time.perf_counter``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = [
    "Timing",
    "attention_flops",
    "tflops",
    "random_qkv",
    "rotation_count",
    "time_fn",
    "host_issue_time",
    "plan_reps",
    "synchronize",
    "time_interleaved",
]


def attention_flops(batch: int, heads: int, s_q: int, s_k: int, head_dim: int, causal: bool = False) -> float:
    """FLOPs of one attention forward (see module doc)."""
    flops = 4.0 * batch * heads * s_q * s_k * head_dim
    return flops / 2 if causal else flops


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def random_qkv(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    seed: int,
    count: int = 1,
    kv_len: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``count`` independent sets of standard-normal q, k, v in the layers' ``[B, S, H, D]`` layout.

    ``shape`` is ``(B, H, S, D)`` (the order benchmarks are named in); k and v have
    ``kv_len`` tokens (default S). Never zeros: kernels can run faster on zeros.
    """
    b, h, s, d = (int(x) for x in shape)
    s_k = s if kv_len is None else int(kv_len)
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(count):
        q = torch.randn(b, s, h, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
        k = torch.randn(b, s_k, h, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
        v = torch.randn(b, s_k, h, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
        sets.append((q, k, v))
    return sets


def rotation_count(bytes_per_set: int, device: torch.device | str, *, max_sets: int = 4) -> int:
    """How many input sets to cycle through so that consecutive calls miss the L2 cache.

    Enough sets to span three times the L2 (at least 2, at most ``max_sets``), never more
    than a quarter of the free device memory allows.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    wanted = max(2, math.ceil(3 * l2 / max(bytes_per_set, 1)))
    free, _ = torch.cuda.mem_get_info(device)
    affordable = max(1, int(0.25 * free) // max(bytes_per_set, 1))
    return max(1, min(wanted, max_sets, affordable))


@dataclasses.dataclass
class Timing:
    """Per-call times in seconds (after warm-up), in call order."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: how noisy the calls were."""
        if len(self.times) < 5:
            return (max(self.times) - min(self.times)) / self.median
        qs = statistics.quantiles(self.times, n=10)
        return (qs[7] - qs[1]) / self.median

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.times), "reps": len(self.times), "spread": self.spread}


def time_fn(fn: Callable[..., object], arg_sets: Sequence[tuple], *, warmup: int, reps: int,
            device: torch.device | str) -> Timing:
    """Time ``fn(*arg_sets[i % len(arg_sets)])`` for ``reps`` calls after ``warmup`` calls."""
    return time_interleaved({"fn": (fn, arg_sets)}, warmup=warmup, reps=reps, device=device)["fn"]


def host_issue_time(fn: Callable[..., object], arg_sets: Sequence[tuple], *, calls: int, device) -> float:
    """Host seconds per call to issue ``fn`` (CUDA: without waiting for the GPU)."""
    synchronize(device)
    n = len(arg_sets)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(*arg_sets[i % n])
    elapsed = time.perf_counter() - t0
    synchronize(device)
    return elapsed / calls


def plan_reps(seconds_per_call: float, *, target_s: float, lo: int, hi: int) -> int:
    """Repetitions that fill about ``target_s`` seconds, clamped to ``[lo, hi]``."""
    if not seconds_per_call > 0:
        return hi
    return int(min(hi, max(lo, round(target_s / seconds_per_call))))


def time_interleaved(
    variants: dict[str, tuple[Callable[..., object], Sequence[tuple]]],
    *,
    warmup: int,
    reps: int,
    device: torch.device | str,
) -> dict[str, Timing]:
    """Time several variants call by call in turn (A B C A B C ...), so clock, power and
    thermal drift affect them alike; ratios of their medians are then comparable to ~1%.

    ``variants``: name -> (fn, arg_sets); returns name -> Timing of ``reps`` calls each.
    """
    device = torch.device(device)
    names = list(variants)
    for i in range(warmup):
        for name in names:
            fn, sets = variants[name]
            fn(*sets[i % len(sets)])
    synchronize(device)
    if device.type != "cuda":
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(reps):
            for name in names:
                fn, sets = variants[name]
                t0 = time.perf_counter()
                fn(*sets[i % len(sets)])
                times[name].append(time.perf_counter() - t0)
        return {name: Timing(t) for name, t in times.items()}
    events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(reps)] for name in names}
    for i in range(reps):
        for name in names:
            fn, sets = variants[name]
            start, end = events[name][i]
            start.record()
            fn(*sets[i % len(sets)])
            end.record()
    torch.cuda.synchronize(device)
    return {name: Timing([s.elapsed_time(e) / 1e3 for s, e in events[name]]) for name in names}
