"""Counting and timing attention calls.

FLOPs: two matrix products of ``S_q x S_k x D`` per (batch, head), 2 FLOPs per multiply-add:
``4 * B * H * S_q * S_k * D``; causal attention does half of it.

Timing on CUDA: one pair of CUDA events around every call, after warm-up calls; the caller cycles
through several input sets so repeated calls do not run out of the L2 cache. A call whose Python
overhead exceeds its GPU time shows in these numbers too: the start event is recorded while the
host still prepares the launch. On CPU every call is timed with ``time.perf_counter``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = ["Timing", "attention_flops", "tflops", "random_qkv", "rotation_count", "time_fn", "time_interleaved",
           "host_issue_time", "plan_reps", "synchronize"]


def attention_flops(batch: int, heads: int, s_q: int, s_k: int, head_dim: int, causal: bool = False) -> float:
    """FLOPs of one attention forward (see module doc)."""
    flops = 4.0 * batch * heads * s_q * s_k * head_dim
    return flops / 2 if causal else flops


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def random_qkv(shape: Sequence[int], dtype: torch.dtype, device, *, seed: int, count: int = 1,
               kv_len: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``count`` sets of standard-normal q, k, v ``[B, S, H, D]`` for ``shape = (B, H, S, D)``; k and v
    have ``kv_len`` tokens (default S). Never zeros: kernels can run faster on zeros."""
    b, h, s, d = (int(x) for x in shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    lengths = (s, s if kv_len is None else kv_len, s if kv_len is None else kv_len)
    return [tuple(torch.randn(b, n, h, d, generator=gen, device=device).to(dtype) for n in lengths)
            for _ in range(count)]


def rotation_count(bytes_per_set: int, device: torch.device | str, *, max_sets: int = 4) -> int:
    """Input sets to cycle through so consecutive calls miss the L2 cache: enough to span 3x the L2
    (2 to ``max_sets``), never more than a quarter of the free device memory holds."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    affordable = int(0.25 * torch.cuda.mem_get_info(device)[0]) // max(bytes_per_set, 1)
    return max(1, min(max(2, math.ceil(3 * l2 / max(bytes_per_set, 1))), max_sets, affordable))


@dataclasses.dataclass
class Timing:
    """Per-call times in seconds (after warm-up), in call order."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_interleaved(variants: dict[str, tuple[Callable[..., object], Sequence[tuple]]], *, warmup: int, reps: int,
                     device: torch.device | str) -> dict[str, Timing]:
    """Time several variants call by call in turn (A B C A B C ...), so clock, power and thermal drift
    affect them alike; ratios of their medians are then comparable to ~1%.

    ``variants``: name -> (fn, arg_sets); call i of a variant is ``fn(*arg_sets[i % len(arg_sets)])``.
    Returns name -> Timing of ``reps`` calls each.
    """
    cuda = torch.device(device).type == "cuda"
    for i in range(warmup):
        for fn, sets in variants.values():
            fn(*sets[i % len(sets)])
    synchronize(device)
    marks: dict[str, list] = {name: [] for name in variants}
    for i in range(reps):
        for name, (fn, sets) in variants.items():
            if cuda:  # events made before the start is recorded: their creation is not timed
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*sets[i % len(sets)])
                end.record()
                marks[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fn(*sets[i % len(sets)])
                marks[name].append(time.perf_counter() - t0)
    synchronize(device)
    if cuda:
        return {name: Timing([s.elapsed_time(e) / 1e3 for s, e in m]) for name, m in marks.items()}
    return {name: Timing(m) for name, m in marks.items()}


def time_fn(fn: Callable[..., object], arg_sets: Sequence[tuple], *, warmup: int, reps: int,
            device: torch.device | str) -> Timing:
    """Time ``fn(*arg_sets[i % len(arg_sets)])`` for ``reps`` calls after ``warmup`` calls."""
    return time_interleaved({"fn": (fn, arg_sets)}, warmup=warmup, reps=reps, device=device)["fn"]


def host_issue_time(fn: Callable[..., object], arg_sets: Sequence[tuple], *, calls: int, device) -> float:
    """Host seconds per call to issue ``fn`` (CUDA: without waiting for the GPU)."""
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(*arg_sets[i % len(arg_sets)])
    elapsed = time.perf_counter() - t0
    synchronize(device)
    return elapsed / calls


def plan_reps(seconds_per_call: float, *, target_s: float, lo: int, hi: int) -> int:
    """Repetitions that fill about ``target_s`` seconds, clamped to ``[lo, hi]``."""
    return hi if not seconds_per_call > 0 else int(min(hi, max(lo, round(target_s / seconds_per_call))))
