"""The measurements behind ``launch/bench.py``: one :class:`Row` per implementation and shape.

Local rows time ``LocalAttention`` with each backend forced (plus automatic
selection) on this rank's device. Sequence-parallel rows time ``USPAttention`` on
this rank's shard under one ``U x R`` layout, every rank at once; a rank's time is
the median over calls, and the row reports the slowest rank's median. Peer rows do
the same for yunchang and diffusers.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

import usp_attn
from usp_attn import AttentionBackendEnum, LocalAttention, USPAttention
from usp_attn.backends import BACKEND_CLASSES
from usp_attn.platforms import current_platform

from benchmarks.peers import PEERS, PeerUnavailable
from benchmarks.timing import Timing, attention_flops, plan_reps, random_qkv, rotation_count, time_fn

__all__ = ["Row", "BenchSettings", "local_rows", "parallel_rows"]

logger = logging.getLogger("usp_attn.bench")


@dataclasses.dataclass
class BenchSettings:
    dtype: torch.dtype
    device: torch.device
    warmup: int
    reps: int | None  # None: plan from one call (about target_s per row)
    target_s: float
    seed: int
    causal: bool = False


@dataclasses.dataclass
class Row:
    shape: tuple[int, int, int, int]  # (B, H, S, D)
    impl: str
    layout: str = "local"
    backend: str = "-"
    seconds: float | None = None
    flops: float = 0.0
    world: int = 1
    note: str = ""
    rel_err: float | None = None  # vs the local automatic-selection output

    @property
    def tflops(self) -> float | None:
        return None if not self.seconds else self.flops / self.seconds / 1e12

    @property
    def tflops_per_rank(self) -> float | None:
        return None if self.tflops is None else self.tflops / self.world


def _flops(shape, causal):
    b, h, s, d = shape
    return attention_flops(b, h, s, s, d, causal)


def _reps(settings: BenchSettings, fn, args) -> int:
    if settings.reps is not None:
        return settings.reps
    if settings.device.type != "cuda":
        return 3
    one = time_fn(fn, [args], warmup=0, reps=1, device=settings.device).median
    return plan_reps(one, target_s=settings.target_s, lo=5, hi=100)


def local_rows(shape, settings: BenchSettings, backends: list[str]) -> tuple[list[Row], torch.Tensor | None]:
    """Time ``LocalAttention`` per backend at ``shape``; also returns the automatic pick's output
    for input set 0 (the reference the parallel rows are compared with)."""
    b, h, s, d = shape
    dev, dtype = settings.device, settings.dtype
    per_set = 3 * b * s * h * d * torch.tensor([], dtype=dtype).element_size()
    sets = random_qkv(shape, dtype, dev, seed=settings.seed, count=rotation_count(per_set, dev))
    platform = current_platform()
    rows, reference = [], None
    for name in backends:
        row = Row(tuple(shape), f"LocalAttention[{name}]", flops=_flops(shape, settings.causal))
        enum = None if name == "auto" else AttentionBackendEnum(name)
        if enum is not None:
            reason = BACKEND_CLASSES[enum].unsupported_reason(platform, d, dtype)
            if reason:
                row.note = f"skipped: {reason}"
                rows.append(row)
                continue
        layer = LocalAttention(h, d, causal=settings.causal)
        try:
            with usp_attn.global_force_attn_backend_context_manager(enum):
                out = layer(*sets[0])
                row.backend = str(layer.backend)
                if enum is not None and layer.backend != enum:
                    row.note = f"skipped: fell back to {layer.backend}"
                    rows.append(row)
                    continue
                timing = time_fn(layer, sets, warmup=settings.warmup, reps=_reps(settings, layer, sets[0]), device=dev)
            row.seconds = timing.median
            row.note = f"{len(timing.times)} reps, spread {timing.spread:.2f}"
            if name == "auto":
                reference = out
        except Exception as exc:  # a kernel failing at this shape is a result, not a crash
            row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
    return rows, reference


def _max_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _rel_err(out_local: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    """‖gathered output − reference‖ / ‖reference‖ (the reference is the full local result)."""
    if reference is None:
        return None
    full = usp_attn.gather_sequence(out_local).double()
    ref = reference.double()
    return float((full - ref).norm() / ref.norm())


def _time_parallel(fn, shards, settings: BenchSettings, reference) -> tuple[float, float | None, str]:
    out = fn(*shards[0])
    err = _rel_err(out, reference)
    reps = int(_max_over_ranks(_reps(settings, fn, shards[0]), settings.device))  # same count on every rank
    timing: Timing = time_fn(fn, shards, warmup=settings.warmup, reps=reps, device=settings.device)
    return _max_over_ranks(timing.median, settings.device), err, f"{reps} reps"


def parallel_rows(shape, settings: BenchSettings, layouts, peers, reference) -> list[Row]:
    """``USPAttention`` (and each peer) per ``(U, R)`` layout at ``shape``, on every rank."""
    b, h, s, d = shape
    world, rank = dist.get_world_size(), dist.get_rank()
    dev = settings.device
    per_set = 3 * b * s * h * d * torch.tensor([], dtype=settings.dtype).element_size()
    full_sets = random_qkv(shape, settings.dtype, dev, seed=settings.seed, count=rotation_count(per_set // world, dev))
    rows = []
    for ulysses, ring in layouts:
        layout = f"{ulysses}x{ring}"
        state = usp_attn.init_sequence_parallel(ulysses, ring)
        try:
            shards = [tuple(usp_attn.shard_sequence(x).contiguous() for x in qkv) for qkv in full_sets]
            layer = USPAttention(h, d, causal=settings.causal)
            row = Row(tuple(shape), "USPAttention", layout, str(state.backend), flops=_flops(shape, settings.causal),
                      world=world)
            try:
                row.seconds, row.rel_err, row.note = _time_parallel(layer, shards, settings, reference)
                row.backend = str(layer.backend)
            except Exception as exc:
                row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
            for peer in peers:
                rows.append(_peer_row(peer, shape, layout, ulysses, ring, shards, settings, world, reference))
        finally:
            usp_attn.destroy_sequence_parallel()
        dist.barrier()
    if rank == 0:
        logger.debug("parallel rows done for %s", shape)
    return rows


def _peer_row(peer, shape, layout, ulysses, ring, shards, settings, world, reference) -> Row:
    b, h, s, d = shape
    row = Row(tuple(shape), peer, layout, flops=_flops(shape, settings.causal), world=world)
    if settings.causal:
        row.note = "skipped: peers are timed without causal masking only"
        return row
    try:
        fn = PEERS[peer](ulysses, ring, heads=h, seq_len=s, scale=d**-0.5)
        row.impl = getattr(fn, "label", peer)
        row.seconds, row.rel_err, row.note = _time_parallel(fn, shards, settings, reference)
    except PeerUnavailable as exc:
        row.note = f"skipped: {exc}"
    except Exception as exc:
        row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row
