"""What every part of the suite shares: the run's :class:`Context` and the row format.

A part is ``fn(ctx) -> list[dict]``, one dict per row. Keys every part uses the same way
(the reporter labels them, any other key becomes a column of its own):

    what      the thing measured: a kernel, a layer and layout, a transfer pattern, a check
    shape     "B,H,S,D" of an attention call; model: a model's sizes
    layout    "UxR" of a sequence-parallel row; gpus: the GPUs working on it
    backend   the attention backend that ran
    ms        median milliseconds per call (multi-rank rows: the slowest rank's median)
    tflops    attention TFLOP/s (4 B H S_q S_k D per call, halved for causal)
    rel_err   ||out - reference|| / ||reference||, the reference named in the part
    note      repetitions, or why the row did not run ("skipped: ...", "error: ...")

A headline row also has ``metric`` (P1 ... P5), ``value``, ``target`` and ``status``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
import torch.distributed as dist

import usp_attn
from benchmarks.timing import Timing, plan_reps, time_fn

__all__ = ["Context", "short_error", "headline", "skipped", "layouts_of", "group_sizes", "layout_name",
           "sequence_parallel", "rel_err"]


@dataclasses.dataclass
class Context:
    """One run of the suite: where it runs, at which sizes, and how long it may take."""

    device: torch.device
    dry_run: bool  # CPU at toy sizes: every code path, numbers meaningless
    budget_s: float
    target_s: float  # seconds of calls per timed row on a GPU
    dtype: torch.dtype | None = None  # None: each part's default
    shapes: list[tuple[int, int, int, int]] | None = None  # --shape: replaces a part's attention shapes
    reps: int | None = None  # --reps: fixed repetitions instead of planning them
    t0: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def world(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def sizes(self, gpu: dict, cpu: dict) -> dict:
        """A part's sizes: ``gpu`` on CUDA, ``cpu`` otherwise (dry runs); ``dtype`` overridden by --dtype."""
        out = dict(gpu if self.cuda else cpu)
        if self.dtype is not None:
            out["dtype"] = self.dtype
        return out

    def max_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def out_of_time(self) -> bool:
        """Whether the budget is spent; every rank gets the same answer (the slowest clock decides)."""
        return self.max_over_ranks(time.monotonic() - self.t0) > self.budget_s

    def measure(self, fn, arg_sets, *, target_s: float | None = None, lo: int = 5, hi: int = 100,
                warmup: int = 1) -> Timing:
        """Warm up, time one call to plan the repetitions (about ``target_s`` in all), then time.
        On several ranks every rank makes the same number of calls (collectives stay in step)."""
        first = time_fn(fn, arg_sets, warmup=warmup, reps=1, device=self.device).median
        reps = self.reps or plan_reps(first, target_s=target_s or self.target_s, lo=lo, hi=hi)
        if self.dry_run and not self.reps:
            reps = min(reps, 3)
        reps = int(self.max_over_ranks(reps))
        return time_fn(fn, arg_sets, warmup=0, reps=reps, device=self.device)

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


def short_error(exc: BaseException, limit: int = 200) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:limit]


def headline(metric: str, what: str, value: float | None, target: str, **fields) -> dict:
    """A headline row: ``status`` is "met" / "NOT met" against ``target`` (">= x" or "<= x")."""
    op, bound = target.split()
    status = "-" if value is None else ("met" if (value >= float(bound) if op == ">=" else value <= float(bound))
                                        else "NOT met")
    return {"metric": metric, "what": what, **fields, "value": value, "target": target, "status": status}


def skipped(what: str, why: str, **fields) -> dict:
    return {"what": what, **fields, "note": f"skipped: {why}"}


def layouts_of(world: int) -> list[tuple[int, int]]:
    """Every (U, R) with U x R = world: Ulysses-world first, ring-world last."""
    return [(world // r, r) for r in range(1, world + 1) if world % r == 0]


def group_sizes(world: int) -> list[int]:
    """Sequence-parallel group sizes to measure on ``world`` ranks: 1, 2, 4, 8 and ``world``, dividing it."""
    return sorted({k for k in (1, 2, 4, 8, world) if world % k == 0})


def layout_name(u: int, r: int) -> str:
    k = u * r
    return f"{u}x{r} ({'1 GPU' if k == 1 else f'Ulysses-{k}' if r == 1 else f'ring-{k}' if u == 1 else 'U x R'})"


@contextlib.contextmanager
def sequence_parallel(ctx: Context, u: int, r: int, group_size: int | None = None):
    """usp_attn in layout U x R, the world cut into contiguous groups of ``group_size`` ranks (default
    U x R) that work side by side; afterwards the state is gone and every rank is in step again."""
    k = group_size or u * r
    state = usp_attn.init_sequence_parallel(u, r, ranks=[list(range(g, g + k)) for g in range(0, ctx.world, k)])
    try:
        yield state
    finally:
        usp_attn.destroy_sequence_parallel()
        dist.barrier()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
