"""Choosing the layout: (cfg, U, R) for a world of N GPUs from a cost model with explicit terms.

Every factorisation ``cfg x U x R = N`` is a candidate (``cfg`` in {1, 2} when the model runs two
guidance passes per denoising step, else 1). For each one the model predicts the time of one
attention layer call and of the attention part of one denoising step on the slowest rank:

    heads     HeadPlan.make(H, H_kv, U), exactly what the Ulysses layer does: h = padded heads / U
              query heads per rank, h_kv kv heads per rank (repeated / zero-padded where U does not
              divide them; zero heads cost real kernel time and real bytes)
    shard     s = the largest shard (shard_sizes(S, U*R)); seg = the largest ring segment (U shards)
    kernel    t_k(h, s_q, s_k) = launch + 4 B h s_q s_k D / tflops(s_k)
              tflops(L) interpolated (linearly in log L) between timed points of the measured
              kernel choice, clamped outside them; one curve without the LSE (R = 1), one with it
    ulysses   U > 1: 2 latency + (qkv bytes + output bytes) * (U-1)/U / all-to-all bandwidth
              qkv bytes = B s (U h + 2 U h_kv) D e, output bytes = B s U h D e (e: bytes per element)
    ring      R = 1: t_k(h, seg, seg) (no LSE)
              R > 1: (R-1) [max(t_k', x) + overlap_loss min(t_k', x) + hop overhead] + t_k', with
              t_k' = t_k(h, seg, seg) with the LSE and x = latency + 2 B seg h_kv D e / P2P bandwidth:
              the transfer of hop t+1 overlaps the kernel of hop t, and overlap_loss is the share of
              the shorter of the two that still shows (the transfer's kernels take SMs and memory
              bandwidth from the attention kernel): 0 = perfect overlap, 1 = none
    call      ulysses + ring
    step      layers * passes * call + cfg gather, passes = 2 with guidance and cfg = 1, else 1;
              cfg gather (cfg > 1) = latency + (cfg-1) prediction bytes / P2P bandwidth, once per step

Only attention and its communication are modelled: the rest of a transformer (projections, MLPs)
does 1/N of the work per rank in every layout, so it shifts every candidate alike and never changes
the pick. On several nodes (``CostTerms.gpus_per_node``) ranks are placed as the groups are built:
global rank = c * U * R + r * U + u, node = rank // gpus_per_node; a collective whose group spans two
nodes moves the bytes bound for the other node over the inter-node link (``CostTerms.inter``) and
takes the slower of the two parts.

The pick is the fastest prediction; candidates within ``TIE_TOLERANCE`` of it count as equal and
the one with the fewest per-layer collectives wins: larger cfg first (one collective per step,
none per layer), then larger U (two all-to-alls per layer whatever U is), then smaller R (R-1
transfers per layer, hidden only while the kernel outlasts them). The order is fixed, so every
rank given the same terms makes the same pick; :func:`choose_layout` still computes on one rank and
broadcasts, so ranks whose measurements differ cannot disagree.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from usp_attn.distributed.state import shard_sizes
from usp_attn.ulysses.heads import HeadPlan

__all__ = [
    "KernelCurve",
    "Link",
    "CostTerms",
    "Workload",
    "LayoutCost",
    "LayoutChoice",
    "MODELS",
    "TIE_TOLERANCE",
    "assumed_terms",
    "enumerate_layouts",
    "predict_layouts",
    "pick_layout",
    "measure_kernel_curve",
    "measure_links",
    "measure_terms",
    "choose_layout",
    "broadcast_layout",
    "format_layouts",
    "layouts_info",
    "placement",
    "lengths_for",
    "measure_node_links",
    "with_measured_links",
    "INFINIBAND_400G",
]

#: predictions within this fraction of the fastest count as a tie (broken by fewest collectives)
TIE_TOLERANCE = 0.01


# ---- the terms -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelCurve:
    """Speed of the local attention kernel against the key length of one call.

    Attributes:
        points: ``(key tokens per call, TFLOP/s)``, sorted by tokens; TFLOP/s counts
            ``4 B h s_q s_k D`` per call. Interpolated linearly in log(tokens), clamped at both ends.
        launch_ms: fixed cost per kernel call (launch, prologue), milliseconds.
    """

    points: tuple[tuple[int, float], ...]
    launch_ms: float = 0.0

    def __post_init__(self):
        if not self.points or any(n < 1 or t <= 0 for n, t in self.points):
            raise ValueError(f"a kernel curve needs points (tokens >= 1, TFLOP/s > 0), got {self.points!r}")
        object.__setattr__(self, "points", tuple(sorted((int(n), float(t)) for n, t in self.points)))

    def tflops(self, keys: float) -> float:
        """Effective TFLOP/s of a call over ``keys`` key tokens."""
        pts = self.points
        if keys <= pts[0][0]:
            return pts[0][1]
        if keys >= pts[-1][0]:
            return pts[-1][1]
        for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
            if n0 <= keys <= n1:
                w = (math.log(keys) - math.log(n0)) / (math.log(n1) - math.log(n0))
                return t0 + w * (t1 - t0)
        raise AssertionError("unreachable")

    def ms(self, batch: int, heads: int, q_tokens: int, k_tokens: int, head_size: int) -> float:
        """Milliseconds of one call: ``heads`` query heads, ``q_tokens`` x ``k_tokens``, head size ``head_size``."""
        if heads == 0 or q_tokens == 0 or k_tokens == 0:
            return 0.0
        flops = 4.0 * batch * heads * q_tokens * k_tokens * head_size
        return self.launch_ms + flops / (self.tflops(k_tokens) * 1e9)


@dataclasses.dataclass(frozen=True)
class Link:
    """One kind of link between two GPUs.

    Attributes:
        alltoall_gbps: GB/s of an all-to-all, counted as bytes each rank sends to other ranks / time
            (as the layer runs it: the packing copy included).
        p2p_gbps: GB/s of one rank sending a block to its neighbour while receiving one (a ring hop).
        latency_ms: fixed cost per collective or transfer, milliseconds.
    """

    alltoall_gbps: float
    p2p_gbps: float
    latency_ms: float = 0.0


@dataclasses.dataclass(frozen=True)
class CostTerms:
    """Every number the cost model uses, each with where it came from.

    Attributes:
        kernel: the kernel without the log-sum-exp (Ulysses only, R = 1).
        kernel_lse: the kernel returning the log-sum-exp (ring hops).
        intra: the link inside a node.
        inter: the link between nodes (``None``: one node).
        gpus_per_node: ranks per node (``None``: every rank on one node).
        hop_overhead_ms: per ring hop beyond the kernel and the transfer (merge, bookkeeping).
        overlap_loss: share of the shorter of a hop's kernel and transfer that is not hidden by
            running them at the same time (0: perfect overlap, 1: none).
        sources: term name -> "measured: ..." or "assumed: ..." for kernel, kernel_lse, alltoall, p2p,
            latency, hop_overhead, overlap and, on several nodes, inter (a term without one is "given").
        device: what the terms describe (e.g. "NVIDIA H200", "assumed H200").
    """

    kernel: KernelCurve
    kernel_lse: KernelCurve
    intra: Link
    inter: Link | None = None
    gpus_per_node: int | None = None
    hop_overhead_ms: float = 0.0
    overlap_loss: float = 0.0
    sources: tuple[tuple[str, str], ...] = ()
    device: str = ""

    def source(self, name: str) -> str:
        return dict(self.sources).get(name, "given")

    def measured(self) -> list[str]:
        """Names of the terms that were measured on this machine."""
        return [n for n, s in self.sources if s.startswith("measured")]

    def assumed(self) -> list[str]:
        """Names of the terms that were assumed (not measured here)."""
        return [n for n, s in self.sources if s.startswith("assumed")]

    def on_nodes(self, gpus_per_node: int, inter: Link, source: str) -> "CostTerms":
        """The same terms for several nodes of ``gpus_per_node`` GPUs joined by ``inter``."""
        sources = tuple((n, s) for n, s in self.sources if n != "inter") + (("inter", source),)
        return dataclasses.replace(self, gpus_per_node=int(gpus_per_node), inter=inter, sources=sources)


#: H200 figures measured on this project's machines (bf16, head size 128), used wherever nothing is
#: measured: the automatic kernel choice reaches ~670 TFLOP/s at 32760-118800 keys, and a ring rank's
#: hops reach 0.97 / 0.95 / 0.88 of one call at ~16k / ~8k / ~4k keys per hop (BENCHMARKS.md, ring hops);
#: the curve with and without the LSE is taken as the same. Two GPUs on NVLink: the layer's q,k,v
#: all-to-all 184 GB/s, output all-to-all 171 GB/s, a ring hop of K and V 357 GB/s, a P2P probe 303 GB/s;
#: ring-2 at Wan 14B 720p took 92.3 ms per call where its kernels take ~88.9 ms and its one transfer
#: ~2.2 ms, so the transfer was not hidden at all (overlap_loss 1).
_H200_KERNEL = ((4096, 590.0), (8192, 635.0), (16384, 650.0), (32768, 665.0), (118800, 670.0))
#: one 400 Gb/s InfiniBand adapter per GPU: 50 GB/s line rate; assumed 0.9 of it for a P2P transfer and
#: 0.8 for an all-to-all (many small messages), 0.03 ms per transfer
INFINIBAND_400G = Link(alltoall_gbps=40.0, p2p_gbps=45.0, latency_ms=0.03)


def assumed_terms(*, gpus_per_node: int | None = None, inter: Link | None = None) -> CostTerms:
    """Terms for H200 GPUs on NVLink, none measured here (head size 128, bf16; other head sizes
    reuse the curve, which then is only a guess). With ``gpus_per_node``, nodes joined by ``inter``
    (default :data:`INFINIBAND_400G`, assumed)."""
    terms = CostTerms(
        kernel=KernelCurve(_H200_KERNEL, launch_ms=0.01),
        kernel_lse=KernelCurve(_H200_KERNEL, launch_ms=0.01),
        intra=Link(alltoall_gbps=180.0, p2p_gbps=300.0, latency_ms=0.02),
        hop_overhead_ms=0.02,
        overlap_loss=1.0,
        sources=(
            ("kernel", "assumed: H200 automatic kernel choice, 590 TFLOP/s at 4096 keys to 670 at 32768+"),
            ("kernel_lse", "assumed: H200, the same curve with the LSE"),
            ("alltoall", "assumed: H200 NVLink all-to-all as the layer runs it, 180 GB/s per rank"),
            ("p2p", "assumed: H200 NVLink ring hop, 300 GB/s"),
            ("latency", "assumed: 0.02 ms per collective or transfer"),
            ("hop_overhead", "assumed: 0.02 ms per ring hop (merge on a side stream)"),
            ("overlap", "assumed: 1.0, a ring transfer is not hidden (2 x H200, ring-2 at Wan 14B 720p)"),
        ),
        device="assumed H200",
    )
    if gpus_per_node is not None:
        terms = terms.on_nodes(gpus_per_node, inter or INFINIBAND_400G,
                               "assumed: 400 Gb/s InfiniBand per GPU (all-to-all 40 GB/s, P2P 45 GB/s, 0.03 ms)")
    return terms


# ---- the workload and the candidates ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Workload:
    """One model's attention, as the layout sees it.

    Attributes:
        heads, kv_heads: query and key/value heads of a self-attention layer (``heads % kv_heads == 0``).
        tokens: sequence length S of one pass (video tokens; replicated text tokens are not modelled).
        head_size: D.
        guidance: the model runs two passes per step (cond and uncond), so cfg = 2 is a candidate.
        layers: self-attention layers per pass (per-step predictions multiply by it).
        batch: B of one pass.
        element_bytes: bytes per q/k/v element (2 for bf16 / fp16).
        prediction_bytes: bytes of one pass's prediction gathered per step with cfg > 1 (default:
            64 fp32 values per token, a 16-channel latent with 1 x 2 x 2 patches).
    """

    heads: int
    tokens: int
    head_size: int
    kv_heads: int | None = None
    guidance: bool = False
    layers: int = 1
    batch: int = 1
    element_bytes: int = 2
    prediction_bytes: int | None = None

    def __post_init__(self):
        kv = self.heads if self.kv_heads is None else self.kv_heads
        for name, value in (("heads", self.heads), ("kv_heads", kv), ("tokens", self.tokens),
                            ("head_size", self.head_size), ("layers", self.layers), ("batch", self.batch),
                            ("element_bytes", self.element_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.heads % kv:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({kv})")
        object.__setattr__(self, "kv_heads", kv)

    @property
    def gather_bytes(self) -> int:
        return self.prediction_bytes if self.prediction_bytes is not None else self.batch * self.tokens * 64 * 4


#: The model shapes of the benchmarks (bf16, self-attention per pass): Wan 2.1 1.3B at 480p (81 frames),
#: Wan 2.1 14B at 720p, HunyuanVideo at 720p (129 frames; guidance-distilled: one pass per step).
MODELS: dict[str, Workload] = {
    "Wan 1.3B 480p": Workload(heads=12, tokens=32760, head_size=128, guidance=True, layers=30),
    "Wan 14B 720p": Workload(heads=40, tokens=75600, head_size=128, guidance=True, layers=40),
    "HunyuanVideo 720p": Workload(heads=24, tokens=118800, head_size=128, guidance=False, layers=60),
}


@dataclasses.dataclass(frozen=True)
class LayoutCost:
    """One candidate's prediction (milliseconds, the slowest rank)."""

    cfg: int
    ulysses: int
    ring: int
    local_heads: int
    local_kv_heads: int
    shard_tokens: int  # the largest shard
    kernel_ms: float  # kernel time of one call: one call (R = 1) or the R hops' kernels
    ulysses_ms: float  # the two all-to-alls of one call
    ring_exposed_ms: float  # ring transfers and hop overheads not hidden behind the kernel
    call_ms: float  # one attention layer call
    passes: int  # passes per step on each rank's group
    cfg_gather_ms: float  # once per step
    step_ms: float  # attention part of one denoising step
    padding: str  # "" or what is padded / repeated
    spans_nodes: tuple[str, ...] = ()  # which collectives cross nodes

    @property
    def layout(self) -> tuple[int, int, int]:
        return self.cfg, self.ulysses, self.ring

    @property
    def name(self) -> str:
        return f"cfg{self.cfg} x U{self.ulysses} x R{self.ring}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "name": self.name}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(world: int, workload: Workload, cfg_degrees: Sequence[int] | None = None
                      ) -> tuple[list[tuple[int, int, int]], list[tuple[tuple[int, int, int], str]]]:
    """Every ``(cfg, U, R)`` with ``cfg * U * R == world``.

    Args:
        world: number of ranks (GPUs).
        workload: the model's attention.
        cfg_degrees: CFG degrees allowed (default ``(1, 2)`` with guidance, ``(1,)`` without).

    Returns:
        ``(valid, rejected)``: valid layouts in a fixed order (cfg descending, U descending), and
        ``(layout, reason)`` for those that cannot run (a rank without tokens; cfg > 1 without guidance).
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    degrees = tuple(cfg_degrees) if cfg_degrees is not None else ((1, 2) if workload.guidance else (1,))
    valid, rejected = [], []
    for cfg in sorted({int(c) for c in degrees}, reverse=True):
        if cfg < 1 or world % cfg:
            continue
        sp = world // cfg
        for u in sorted(_divisors(sp), reverse=True):
            layout = (cfg, u, sp // u)
            if cfg > 1 and not workload.guidance:
                rejected.append((layout, "cfg > 1 needs a model with guidance (two passes per step)"))
            elif workload.tokens < sp:
                rejected.append((layout, f"{workload.tokens} tokens over {sp} ranks leaves a rank without tokens"))
            else:
                valid.append(layout)
    return valid, rejected


def _padding_text(plan: HeadPlan) -> str:
    notes = []
    if plan.is_padded:
        notes.append(f"q heads {plan.num_heads} -> {plan.padded_heads} (+{plan.padded_heads - plan.num_heads} zero)")
    if plan.kv_heads_before_split != plan.num_kv_heads:
        notes.append(f"kv heads {plan.num_kv_heads} repeated to {plan.kv_heads_before_split}")
    if plan.is_padded and plan.padded_kv_heads != plan.kv_heads_before_split:
        notes.append(f"kv heads padded to {plan.padded_kv_heads}")
    return "; ".join(notes)


def _nodes_of(ranks: Iterable[int], gpus_per_node: int | None) -> list[int]:
    return [0 if gpus_per_node is None else r // gpus_per_node for r in ranks]


def _alltoall_ms(terms: CostTerms, group: list[int], bytes_per_rank: float) -> tuple[float, bool]:
    """One all-to-all of ``bytes_per_rank`` (each rank's whole buffer, 1/U of it stays) over ``group``
    (global ranks): the slowest member's time, and whether the group spans nodes."""
    u = len(group)
    if u == 1:
        return 0.0, False
    per_peer = bytes_per_rank / u
    nodes = _nodes_of(group, terms.gpus_per_node)
    worst, spans = 0.0, len(set(nodes)) > 1
    for node in set(nodes):
        same = nodes.count(node)
        intra = per_peer * (same - 1) / (terms.intra.alltoall_gbps * 1e6)
        inter = per_peer * (u - same) / (terms.inter.alltoall_gbps * 1e6) if u > same else 0.0
        latency = terms.inter.latency_ms if u > same else terms.intra.latency_ms
        worst = max(worst, latency + max(intra, inter))
    return worst, spans


def _p2p_link(terms: CostTerms, pairs: Iterable[tuple[int, int]]) -> tuple[Link, bool]:
    """The link of the slowest of these simultaneous transfers, and whether any crosses nodes."""
    crosses = any(a != b for a, b in (tuple(_nodes_of(p, terms.gpus_per_node)) for p in pairs))
    if crosses:
        if terms.inter is None:
            raise ValueError("terms with gpus_per_node need an inter-node link")
        return terms.inter, True
    return terms.intra, False


def placement(layout: tuple[int, int, int]) -> dict[str, list[list[int]]]:
    """The groups of global ranks a layout ``(cfg, U, R)`` makes, as ``init_sequence_parallel(ulysses_degree=U,
    ring_degree=R, cfg_degree=cfg)`` builds them over ranks ``0 .. cfg*U*R-1`` (global rank
    = cfg_rank * U * R + ring_rank * U + ulysses_rank): ``{"ulysses": [...], "ring": [...], "cfg": [...]}``,
    each a list of groups (a group of one rank where that degree is 1)."""
    cfg, u, r = layout
    sp = u * r
    return {
        "ulysses": [[c * sp + g * u + x for x in range(u)] for c in range(cfg) for g in range(r)],
        "ring": [[c * sp + g * u + x for g in range(r)] for c in range(cfg) for x in range(u)],
        "cfg": [[c * sp + i for c in range(cfg)] for i in range(sp)],
    }


def _predict(world: int, workload: Workload, terms: CostTerms, layout: tuple[int, int, int]) -> LayoutCost:
    cfg, u, r = layout
    w, b, d, e = workload, workload.batch, workload.head_size, workload.element_bytes
    plan = HeadPlan.make(w.heads, w.kv_heads, u)
    h, h_kv = plan.local_heads, plan.local_kv_heads
    sizes = shard_sizes(w.tokens, u * r)
    shard = max(sizes)
    segment = max(sum(sizes[g * u:(g + 1) * u]) for g in range(r))
    spans = []
    groups = placement(layout)
    # Ulysses: one fused q,k,v all-to-all in, one output all-to-all back; every group runs at once, so
    # the slowest group sets the time
    ulysses_ms = 0.0
    if u > 1:
        qkv = b * shard * (plan.padded_heads + 2 * plan.padded_kv_heads) * d * e
        out = b * shard * plan.padded_heads * d * e
        found = [(_alltoall_ms(terms, g, qkv), _alltoall_ms(terms, g, out)) for g in groups["ulysses"]]
        ulysses_ms = max(t_in + t_out for (t_in, _), (t_out, _) in found)
        if any(cross for (_, cross), _ in found):
            spans.append("ulysses")
    if r == 1:
        kernel_ms = terms.kernel.ms(b, h, segment, segment, d)
        ring_exposed = 0.0
    else:
        hop = terms.kernel_lse.ms(b, h, segment, segment, d)
        link, cross = _p2p_link(terms, [(g[i], g[(i + 1) % r]) for g in groups["ring"] for i in range(r)])
        transfer = link.latency_ms + 2 * b * segment * h_kv * d * e / (link.p2p_gbps * 1e6)
        kernel_ms = r * hop
        shown = terms.overlap_loss * min(hop, transfer)
        ring_exposed = (r - 1) * (max(hop, transfer) - hop + shown + terms.hop_overhead_ms)
        if cross:
            spans.append("ring")
    call_ms = ulysses_ms + kernel_ms + ring_exposed
    passes = 2 if (w.guidance and cfg == 1) else 1
    gather_ms = 0.0
    if cfg > 1:
        link, cross = _p2p_link(terms, [(g[i], g[i + 1]) for g in groups["cfg"] for i in range(cfg - 1)])
        gather_ms = link.latency_ms + (cfg - 1) * w.gather_bytes / (link.p2p_gbps * 1e6)
        if cross:
            spans.append("cfg")
    return LayoutCost(cfg=cfg, ulysses=u, ring=r, local_heads=h, local_kv_heads=h_kv, shard_tokens=shard,
                      kernel_ms=kernel_ms, ulysses_ms=ulysses_ms, ring_exposed_ms=ring_exposed, call_ms=call_ms,
                      passes=passes, cfg_gather_ms=gather_ms, step_ms=w.layers * passes * call_ms + gather_ms,
                      padding=_padding_text(plan), spans_nodes=tuple(spans))


def predict_layouts(world: int, workload: Workload, terms: CostTerms, cfg_degrees: Sequence[int] | None = None
                    ) -> list[LayoutCost]:
    """The prediction of every valid layout (see :func:`enumerate_layouts`), in enumeration order.

    Args:
        world: number of ranks; workload: the model's attention; terms: the cost model's numbers;
        cfg_degrees: CFG degrees allowed (default by ``workload.guidance``).
    """
    if terms.gpus_per_node is not None and world > terms.gpus_per_node and terms.inter is None:
        raise ValueError("terms with gpus_per_node need an inter-node link")
    return [_predict(world, workload, terms, layout) for layout in enumerate_layouts(world, workload, cfg_degrees)[0]]


def _preference(cost: LayoutCost) -> tuple[int, int, int]:
    return (-cost.cfg, -cost.ulysses, cost.ring)


def pick_layout(costs: Sequence[LayoutCost], tolerance: float = TIE_TOLERANCE) -> LayoutCost:
    """The fastest per step; those within ``tolerance`` (a fraction) of it are ties, broken by
    fewest collectives: larger cfg, then larger U, then smaller R (module doc says why)."""
    if not costs:
        raise ValueError("no layout to pick from")
    best = min(c.step_ms for c in costs)
    tied = [c for c in costs if c.step_ms <= best * (1 + tolerance)]
    return min(tied, key=_preference)


# ---- measuring the terms -----------------------------------------------------------------------
def _time_ms(call, device: torch.device, *, budget_ms: float = 200.0, max_reps: int = 20, stat=statistics.median,
             reps: int | None = None) -> float:
    """Milliseconds per call (``stat`` of the timed rounds: the median, or ``min`` for a floor) after one
    warm-up call; on CUDA the calls are queued back to back between two events, so the host's launch
    cost hides behind the GPU as in a model. ``reps``: calls per round, fixed; ``None`` plans them from
    one timed call and ``budget_ms``. A collective must pass ``reps``: planned counts differ between
    ranks, and ranks making different numbers of collective calls hang."""
    cuda = device.type == "cuda"
    call()
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize(device)
    first = (time.perf_counter() - t0) * 1e3
    if reps is None:
        reps = max(3, min(max_reps, int(budget_ms / max(first, 1e-3))))
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        rounds = []
        for _ in range(3):
            start.record()
            for _ in range(reps):
                call()
            end.record()
            torch.cuda.synchronize(device)
            rounds.append(start.elapsed_time(end) / reps)
        return stat(rounds)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return stat(times)


def measure_kernel_curve(lengths: Sequence[int], *, heads: int, head_size: int, dtype: torch.dtype = torch.bfloat16,
                         device: torch.device | str | None = None, need_lse: bool = False, batch: int = 1,
                         budget_ms: float = 200.0) -> tuple[KernelCurve, list[dict]]:
    """Time the kernel that ``LocalAttention``'s automatic choice runs at ``lengths`` (square calls,
    ``heads`` heads of ``head_size``), plus one tiny call for the launch cost.

    Args:
        lengths: query = key tokens per timed call.
        heads, head_size, dtype, batch: the calls' shape.
        device: where to run (default: the current CUDA device, else the CPU).
        need_lse: time the kernel the choice makes when the log-sum-exp is needed (ring hops).
        budget_ms: about this many milliseconds of timed calls per point (3 calls at least).

    Returns:
        ``(curve, rows)``: the curve (TFLOP/s net of the launch cost) and one dict per timed point
        (tokens, heads, kernel, ms, tflops).
    """
    from usp_attn.layers.local import LocalAttention  # layers sit above this module's imports

    device = torch.device(device) if device is not None else torch.device(
        "cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    attn = LocalAttention(heads, head_size)
    gen = torch.Generator(device=device).manual_seed(0)

    def timed(n: int, h: int, stat=statistics.median) -> tuple[float, str]:
        q, k, v = (torch.randn(batch, n, h, head_size, generator=gen, device=device).to(dtype) for _ in range(3))
        layer = attn if h == heads else LocalAttention(h, head_size)
        with torch.no_grad():
            kernel = layer.kernel_for(q, k, v, causal=False, need_lse=need_lse)
            ms = _time_ms(lambda: layer.attend(q, k, v, return_lse=need_lse, kernel=kernel), device, stat=stat,
                          budget_ms=budget_ms)
        sel = kernel[0]
        return ms, str(sel.backend) + (f" ({sel.kernel})" if sel.kernel else "")

    launch_ms, _ = timed(128, 1, stat=min)  # a floor: a busy host must not inflate it
    rows, points = [], []
    for n in sorted(set(int(x) for x in lengths)):
        ms, kernel = timed(n, heads)
        flops = 4.0 * batch * heads * n * n * head_size
        net = max(ms - launch_ms, ms * 0.5)  # the launch cost is a small part of a timed call; never all of it
        points.append((n, flops / (net * 1e9)))
        rows.append({"tokens": n, "heads": heads, "kernel": kernel, "ms": ms, "tflops": flops / (ms * 1e9)})
    return KernelCurve(tuple(points), launch_ms=launch_ms), rows


def measure_links(group: dist.ProcessGroup | None = None, *, mib: int = 64, device: torch.device | None = None
                  ) -> Link:
    """Probe the group's links: one ``all_to_all_single`` of ``mib`` MiB per rank and one ring step
    (each rank sends ``mib`` MiB to the next and receives from the previous), plus a 4-byte
    all-to-all for the latency. A collective: every rank of ``group`` must call it.

    Args:
        group: the process group (default: the world); needs 2 or more ranks.
        mib: message size per rank, MiB.
        device: tensors' device (default: the current CUDA device under NCCL, else the CPU).
    """
    world = dist.get_world_size(group)
    if world < 2:
        raise ValueError("measuring links needs a group of two or more ranks")
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
                  else torch.device("cpu"))
    rank = dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    n = mib * 2**20 // 2 // world * world
    send, recv = torch.ones(n, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.bfloat16, device=device)
    tiny_s, tiny_r = torch.ones(world, dtype=torch.int32, device=device), torch.empty(world, dtype=torch.int32,
                                                                                          device=device)

    def ring_step():
        ops = [dist.P2POp(dist.isend, send, ranks[(rank + 1) % world], group),
               dist.P2POp(dist.irecv, recv, ranks[(rank - 1) % world], group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    def slowest(ms: float) -> float:  # every rank uses the slowest rank's time
        t = torch.tensor([ms], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return float(t.item())

    dist.barrier(group=group)
    # fixed call counts: every rank must make the same number of collective calls
    latency = slowest(_time_ms(lambda: dist.all_to_all_single(tiny_r, tiny_s, group=group), device, reps=20))
    a2a = slowest(_time_ms(lambda: dist.all_to_all_single(recv, send, group=group), device, reps=5))
    p2p = slowest(_time_ms(ring_step, device, reps=5))
    sent = 2 * n
    return Link(alltoall_gbps=sent * (world - 1) / world / (max(a2a - latency, 1e-6) * 1e6),
                p2p_gbps=sent / (max(p2p - latency, 1e-6) * 1e6), latency_ms=latency)


def measure_terms(lengths: Sequence[int], *, heads: int, head_size: int, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str | None = None, group: dist.ProcessGroup | None = None,
                  measure_links_on: str = "cuda", budget_ms: float = 200.0, links: Link | None = None) -> CostTerms:
    """The cost model's terms measured on this machine where possible, assumed (:func:`assumed_terms`)
    for the rest, each marked in ``sources``.

    The kernel curves are measured on ``device`` (default: CUDA if available, else the CPU) at
    ``lengths`` with ``heads`` heads of ``head_size``. The links: ``links`` if given (measured before
    by :func:`measure_links` over ``group``, which then names its size); else measured here when
    ``group`` is given and has two or more ranks on a ``measure_links_on`` device ("cuda": NCCL
    groups only, since gloo on CPU says nothing about NVLink; "any": every group), a collective that
    every rank of ``group`` must call; else assumed. ``budget_ms``: timed calls per kernel point
    (:func:`measure_kernel_curve`).
    """
    base = assumed_terms()
    sources = dict(base.sources)
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    what = f"{device.type} {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
    kernel, rows = measure_kernel_curve(lengths, heads=heads, head_size=head_size, dtype=dtype, device=device,
                                        budget_ms=budget_ms)
    kernel_lse, rows_lse = measure_kernel_curve(lengths, heads=heads, head_size=head_size, dtype=dtype,
                                                device=device, need_lse=True, budget_ms=budget_ms)
    for name, curve, found in (("kernel", kernel, rows), ("kernel_lse", kernel_lse, rows_lse)):
        sources[name] = (f"measured: {what}, {found[-1]['kernel']}, {heads} heads x {head_size}, "
                         + ", ".join(f"{p[0]} keys {p[1]:.3g} TFLOP/s" for p in curve.points)
                         + f", launch {curve.launch_ms * 1e3:.0f} us")
    intra = base.intra
    if links is None and group is not None and dist.get_world_size(group) > 1 and (
            measure_links_on == "any" or dist.get_backend(group) == "nccl"):
        links = measure_links(group)
    terms = dataclasses.replace(base, kernel=kernel, kernel_lse=kernel_lse, intra=intra,
                                sources=tuple(sources.items()), device=what)
    if links is not None:
        n = dist.get_world_size(group) if group is not None else None
        terms = with_measured_links(terms, intra=links, where=f"{n} ranks" if n else "")
    return terms


def with_measured_links(terms: CostTerms, *, intra: Link | None = None, inter: Link | None = None,
                        gpus_per_node: int | None = None, where: str = "") -> CostTerms:
    """``terms`` with links measured by :func:`measure_links` / :func:`measure_node_links`, their sources
    marked measured (``where``: what was probed, for the source text). ``inter`` needs ``gpus_per_node``."""
    sources = dict(terms.sources)
    at = f" ({where})" if where else ""
    if intra is not None:
        sources["alltoall"] = f"measured{at}: all_to_all_single, {intra.alltoall_gbps:.0f} GB/s per rank"
        sources["p2p"] = f"measured{at}: ring step, {intra.p2p_gbps:.0f} GB/s"
        sources["latency"] = f"measured{at}: 4-byte all-to-all, {intra.latency_ms * 1e3:.0f} us"
        terms = dataclasses.replace(terms, intra=intra)
    if inter is not None:
        if gpus_per_node is None:
            raise ValueError("an inter-node link needs gpus_per_node")
        sources["inter"] = (f"measured: between nodes of {gpus_per_node}, all-to-all {inter.alltoall_gbps:.0f} GB/s, "
                            f"P2P {inter.p2p_gbps:.0f} GB/s, {inter.latency_ms * 1e3:.0f} us")
        terms = dataclasses.replace(terms, inter=inter, gpus_per_node=int(gpus_per_node))
    return dataclasses.replace(terms, sources=tuple(sources.items()))


def measure_node_links(gpus_per_node: int, *, mib: int = 64) -> tuple[Link | None, Link | None]:
    """Probe the links inside a node and between nodes of the default group, whose global ranks are
    node-major (node n holds ranks n*gpus_per_node ..): every node's ranks probe together, then every set
    of same-position ranks across the nodes, each set at the same time as the others (as a layout loads
    them). A collective: every rank of the world calls it.

    Args:
        gpus_per_node: ranks per node (torchrun's LOCAL_WORLD_SIZE); must divide the world size.
        mib: message size per rank, MiB.

    Returns:
        ``(intra, inter)``: ``None`` where there is nothing to probe (one GPU per node; one node).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 1 \
            or world % gpus_per_node:
        raise ValueError(f"gpus_per_node must be a positive int dividing the world size {world}, got {gpus_per_node!r}")
    g = gpus_per_node
    found: dict[str, Link | None] = {"intra": None, "inter": None}
    for kind, sets in (("intra", [list(range(n * g, (n + 1) * g)) for n in range(world // g)]),
                       ("inter", [list(range(i, world, g)) for i in range(g)])):
        if len(sets[0]) < 2:
            continue
        groups = [dist.new_group(members) for members in sets]  # every rank makes every group, in order
        try:
            mine = next(grp for grp, members in zip(groups, sets) if rank in members)
            found[kind] = measure_links(mine, mib=mib)
        finally:
            for grp in groups:
                dist.destroy_process_group(grp)
    return found["intra"], found["inter"]


def lengths_for(world: int, workload: Workload) -> list[int]:
    """The key lengths the candidates' kernels run at on ``world`` ranks (S / R for every R dividing
    ``world``): measuring the curve there makes it exact at every candidate."""
    return sorted({-(-workload.tokens // r) for r in _divisors(world)})


# ---- every rank gets the same answer ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayoutChoice:
    """What :func:`choose_layout` returns on every rank.

    Attributes:
        cfg, ulysses, ring: the pick (``cfg * ulysses * ring == world``).
        step_ms, call_ms: its predicted attention time per step and per layer call.
        candidates: every candidate's prediction (group rank 0 only; empty elsewhere).
        terms: the terms used (group rank 0 only; ``None`` elsewhere).
        table: the printed form (:func:`format_layouts`; group rank 0 only, "" elsewhere).
    """

    cfg: int
    ulysses: int
    ring: int
    step_ms: float
    call_ms: float
    candidates: tuple[LayoutCost, ...] = ()
    terms: CostTerms | None = None
    table: str = ""

    @property
    def layout(self) -> tuple[int, int, int]:
        return self.cfg, self.ulysses, self.ring


def broadcast_layout(choice: LayoutChoice | BaseException | None, group: dist.ProcessGroup | None = None,
                     device: torch.device | None = None) -> LayoutChoice:
    """Group rank 0's ``choice`` on every rank of ``group`` (one broadcast of five numbers; other ranks
    pass ``None``). Rank 0 passes the exception instead when it could not choose: every rank then raises
    (``RuntimeError`` naming it; rank 0 its own exception) rather than waiting for a pick that never comes.
    ``device``: the tensor's device (default: the current CUDA device under NCCL, else CPU)."""
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
                  else torch.device("cpu"))
    src = dist.get_global_rank(group, 0) if group is not None else 0
    first = dist.get_rank(group) == 0
    if first and isinstance(choice, LayoutChoice):
        values = [choice.cfg, choice.ulysses, choice.ring, choice.step_ms, choice.call_ms]
    else:
        values = [0.0] * 5  # cfg 0 from rank 0: it failed
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=src, group=group)
    if first:
        if isinstance(choice, BaseException):
            raise choice
        return choice
    cfg, u, r, step, call = t.tolist()
    if cfg == 0:
        raise RuntimeError("choose_layout failed on group rank 0 (its exception says why); no layout was chosen")
    return LayoutChoice(int(cfg), int(u), int(r), step, call)


def choose_layout(world: int | None = None, *, heads: int, tokens: int, head_size: int, kv_heads: int | None = None,
                  guidance: bool = False, layers: int = 1, batch: int = 1, cfg_degrees: Sequence[int] | None = None,
                  terms: CostTerms | None = None, measure: bool | None = None, group: dist.ProcessGroup | None = None,
                  dtype: torch.dtype = torch.bfloat16, budget_ms: float = 200.0) -> LayoutChoice:
    """Pick ``(cfg, U, R)`` for ``world`` ranks; with a process group, every rank gets group rank 0's pick.

    Args:
        world: number of ranks to lay out (default: the size of ``group``, or 1 without one).
        heads, kv_heads, tokens, head_size, guidance, layers, batch: the model (:class:`Workload`).
        cfg_degrees: CFG degrees allowed (default ``(1, 2)`` with guidance, ``(1,)`` without).
        terms: the cost model's numbers; ``None``: measured (``measure``) or assumed.
        measure: measure the terms here (default: when CUDA is available). Measuring the links is a
            collective of ``group`` (NCCL only); the kernel is timed on group rank 0 only.
        group: the process group that must agree (default: the world when ``torch.distributed`` is
            initialised, else none); one broadcast from its rank 0.
        dtype: the kernel's dtype when measuring.
        budget_ms: about this many milliseconds of timed calls per kernel point when measuring.

    Call it before ``init_sequence_parallel`` (whose degrees it decides): rank 0 then times the kernel
    that the automatic choice measures as fastest; once a sequence-parallel group is set up, a plain
    ``LocalAttention`` call on one rank keeps to the static rule instead. Every rank of ``group`` must
    call it (one broadcast; with measuring on NCCL also the link probes).
    """
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if world is None:
        world = dist.get_world_size(group) if group is not None else 1
    workload = Workload(heads=heads, tokens=tokens, head_size=head_size, kv_heads=kv_heads, guidance=guidance,
                        layers=layers, batch=batch, element_bytes=torch.tensor([], dtype=dtype).element_size())
    valid, rejected = enumerate_layouts(world, workload, cfg_degrees)
    if not valid:  # the same on every rank, before any collective
        raise ValueError(f"no layout of {world} ranks can run this model: "
                         + ("; ".join(f"cfg{c} x U{u} x R{r}: {why}" for (c, u, r), why in rejected)
                            or f"no CFG degree in {tuple(cfg_degrees or ())} divides {world}"))
    first = group is None or dist.get_rank(group) == 0
    if measure is None:
        measure = terms is None and torch.cuda.is_available()
    if group is None and measure and terms is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # each torchrun rank would time its own kernel and could pick a different layout
        raise ValueError("choose_layout(measure=True) under torchrun needs torch.distributed initialised (rank 0 "
                         "measures and broadcasts); initialise it first, or pass measure=False (assumed terms: "
                         "the same pick on every rank without a collective)")
    links = None
    if terms is None and measure and group is not None and dist.get_world_size(group) > 1 \
            and dist.get_backend(group) == "nccl":
        links = measure_links(group)  # every rank takes part; the kernel below is rank 0's alone
    alone = group is None or dist.get_world_size(group) == 1
    choice = None
    if first:
        try:
            if terms is None:
                terms = (measure_terms(lengths_for(world, workload), heads=heads, head_size=head_size, dtype=dtype,
                                       group=group if links is not None else None, links=links,
                                       budget_ms=budget_ms)
                         if measure else assumed_terms())
            costs = predict_layouts(world, workload, terms, cfg_degrees)
            best = pick_layout(costs)
            choice = LayoutChoice(best.cfg, best.ulysses, best.ring, best.step_ms, best.call_ms, tuple(costs),
                                  terms, format_layouts(world, workload, terms, cfg_degrees))
        except Exception as exc:  # the peers wait in the broadcast: tell them, then raise here too
            if alone:
                raise
            choice = exc
    if alone:
        return choice
    return broadcast_layout(choice, group)


# ---- text -------------------------------------------------------------------------------------
def format_layouts(world: int, workload: Workload, terms: CostTerms, cfg_degrees: Sequence[int] | None = None
                   ) -> str:
    """Every candidate with its prediction, the terms with their sources, what is padded, and the pick."""
    costs = predict_layouts(world, workload, terms, cfg_degrees)
    _, rejected = enumerate_layouts(world, workload, cfg_degrees)
    w = workload
    nodes = "" if terms.gpus_per_node is None else f" ({-(-world // terms.gpus_per_node)} nodes of " \
                                                   f"{terms.gpus_per_node})"
    lines = [f"layouts for {world} GPUs{nodes}: H={w.heads} H_kv={w.kv_heads} S={w.tokens} D={w.head_size} "
             f"B={w.batch}, {'guidance (2 passes per step)' if w.guidance else 'one pass per step'}, "
             f"{w.layers} layer(s) per pass; terms: {terms.device or 'given'}",
             f"measured here: {', '.join(terms.measured()) or 'nothing'}; "
             f"assumed: {', '.join(terms.assumed()) or 'nothing'}"]
    for name, source in terms.sources:
        lines.append(f"  {name:<13} {source}")
    header = ("layout", "call ms", "step ms", "kernel", "ulysses", "ring exposed", "cfg gather", "h/rank",
              "across nodes", "pads / repeats")
    pick = pick_layout(costs) if costs else None
    rows = [(c.name + (" *" if c is pick else ""), f"{c.call_ms:.2f}", f"{c.step_ms:.1f}", f"{c.kernel_ms:.2f}",
             f"{c.ulysses_ms:.2f}", f"{c.ring_exposed_ms:.2f}", f"{c.cfg_gather_ms:.2f}", str(c.local_heads),
             ",".join(c.spans_nodes) or "-", c.padding or "-") for c in costs]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{wd}}}" for wd in widths)
    lines += [fmt.format(*header).rstrip(), fmt.format(*("-" * wd for wd in widths)).rstrip()]
    lines += [fmt.format(*row).rstrip() for row in rows]
    lines += [f"not a candidate: cfg{c} x U{u} x R{r}: {why}" for (c, u, r), why in rejected]
    if pick is not None:
        lines.append(f"pick: {pick.name} ({pick.step_ms:.1f} ms of attention per step"
                     + (f"; {pick.padding}" if pick.padding else "") + ")")
    else:
        lines.append("pick: none (no layout can run)")
    return "\n".join(lines)


def layouts_info(world: int, heads: int, tokens: int, head_size: int, *, kv_heads: int | None = None,
                 guidance: bool = False, layers: int = 1, nodes: int = 1, measure: bool | None = None,
                 dtype: torch.dtype = torch.bfloat16, terms: CostTerms | None = None) -> dict:
    """What ``usp-attn info --layouts`` shows, as a JSON-serialisable dict (``"text"``: the printed form).

    Args:
        world, heads, tokens, head_size, kv_heads, guidance, layers: the layout's GPUs and the model
            (:class:`Workload`).
        nodes: the ``world`` GPUs sit on this many nodes (dividing ``world``), joined by the assumed
            :data:`INFINIBAND_400G` link.
        measure: time the kernel here (default: when CUDA is available); links are always assumed here
            (measuring them needs a multi-GPU group: :func:`measure_terms`).
        dtype: the kernel's dtype when measuring; terms: use these instead (tests).
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1 or world % nodes:
        raise ValueError(f"nodes must be a positive int dividing the {world} GPUs, got {nodes!r}")
    workload = Workload(heads=heads, tokens=tokens, head_size=head_size, kv_heads=kv_heads, guidance=guidance,
                        layers=layers, element_bytes=torch.tensor([], dtype=dtype).element_size())
    if terms is None:
        if measure is None:
            measure = torch.cuda.is_available()
        terms = (measure_terms(lengths_for(world, workload), heads=heads, head_size=head_size, dtype=dtype)
                 if measure else assumed_terms())
    if nodes > 1:
        terms = terms.on_nodes(world // nodes, INFINIBAND_400G,
                               "assumed: 400 Gb/s InfiniBand per GPU (all-to-all 40 GB/s, P2P 45 GB/s, 0.03 ms)")
    costs = predict_layouts(world, workload, terms)
    _, rejected = enumerate_layouts(world, workload)
    pick = pick_layout(costs) if costs else None
    return {
        "world": world, "nodes": nodes,
        "workload": dataclasses.asdict(workload),
        "terms": {"device": terms.device, "sources": dict(terms.sources), "measured": terms.measured(),
                  "assumed": terms.assumed()},
        "candidates": [c.to_dict() for c in costs],
        "rejected": [{"layout": list(layout), "reason": why} for layout, why in rejected],
        "pick": pick.to_dict() if pick else None,
        "text": format_layouts(world, workload, terms),
    }
