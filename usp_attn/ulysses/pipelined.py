"""Ulysses pipelined over head groups: the all-to-all of one group overlaps the attention of another.

Unpipelined, a Ulysses call is three steps in a row: the q/k/v all-to-all, attention over every local head,
the output all-to-all; the link idles while the kernel runs and the GPU idles while the link runs. Attention
is independent per head, so the ``h`` local heads of each rank can be cut into ``G`` groups that go through
the three steps one after another, each group's transfers overlapping another group's attention:

    in(0)  | in(1)     | in(2)      ...
           | attend(0) | attend(1)  | attend(2)
           |           | out(0)     | out(1)     | out(2)

Group g holds the same local heads ``[a_g, b_g)`` of every Ulysses rank's block, so after its all-to-all a rank
holds exactly the rows of those heads that the unpipelined call would give it: each head's kernel sees the same
rows, and the output is the unpipelined output bit for bit (kernels compute heads independently). K/V heads
follow their query heads: groups are cut on whole kv heads where there are enough, else each group takes the
kv head of each of its query heads (repeated). The all-to-alls are asynchronous collectives on the Ulysses
group, issued in the same order on every rank.

How many groups: an explicit count, or chosen by measurement (CUDA): the group's rank 0 times the layer call
with each count that leaves every group at least ``MIN_WAVES`` waves of attention work on the GPU (smaller
groups run the kernel at low occupancy: slower than the overlap gains) against one group, every rank running
the same trials, and the count is broadcast (:func:`usp_attn.measured_choice.agree_once`). A count that is
not faster than one group is never chosen. On the CPU the automatic count is 1.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.distributed as dist

from usp_attn import measured_choice
from usp_attn.ulysses.heads import HeadPlan
from usp_attn.ulysses.steps import UlyssesSteps

__all__ = ["head_groups", "run_pipelined", "candidate_counts", "choose_group_count", "MIN_WAVES"]

#: Attention work of one group, in waves of the GPU (one block of 128 query rows of one head per SM).
MIN_WAVES = 4
#: Group counts tried by the automatic choice (besides 1).
COUNTS = (2, 3, 4, 5, 7)


@dataclasses.dataclass(frozen=True)
class HeadGroup:
    """Local query heads ``[start, stop)`` of every rank's block and the local kv heads they read."""

    start: int
    stop: int
    kv_heads: tuple[int, ...]


def head_groups(plan: HeadPlan, count: int) -> list[HeadGroup]:
    """``count`` contiguous groups of the ``plan.local_heads`` local query heads (sizes as
    ``torch.tensor_split``), cut on whole kv heads when ``count <= plan.local_kv_heads``."""
    h, m = plan.local_heads, plan.local_kv_heads
    ratio = h // m  # query heads per local kv head (an int in every case of HeadPlan)
    if not 1 <= count <= h:
        raise ValueError(f"a Ulysses pipeline of {count} groups needs 1 <= groups <= {h} (local heads)")
    if count <= m:
        bounds = _splits(m, count)
        return [HeadGroup(a * ratio, b * ratio, tuple(range(a, b))) for a, b in bounds]
    return [HeadGroup(a, b, tuple(i // ratio for i in range(a, b))) for a, b in _splits(h, count)]


def _splits(n: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append((start, start + size))
        start += size
    return out


def run_pipelined(steps: UlyssesSteps, q, k, v, key_mask, count: int, attend, gather_replicated) -> torch.Tensor:
    """One Ulysses call pipelined over ``count`` head groups (inference: no gradients, no LSE).

    Args:
        steps: the call's unpipelined :class:`UlyssesSteps` (heads plan, shard lengths, rows, layout).
        q, k, v, key_mask: as :meth:`UlyssesSteps.to_heads` (``q [B, pre + s_r + suf, H, D]``, ...).
        attend: ``attend(q_all, k_all, v_all, key_mask) -> out_all [B, pre + S_seg + suf, h_g, D]`` for one
            group's heads (the layer's attention step: one kernel call or the ring).
        gather_replicated: ``[B, n_text, h, D]`` (this rank's local heads of the replicated rows' output)
            -> ``[B, n_text, H, D]``, identical on every rank.

    Returns:
        ``[B, pre + s_r + suf, H, D]``, equal to the unpipelined call's output.
    """
    plan, rows, u_deg = steps.heads, steps.rows, steps.heads.degree
    h, m = plan.local_heads, plan.local_kv_heads
    groups = head_groups(plan, count)
    # [B, S, U, heads per rank, D]: a group is a slice of the fourth dimension (no index tensors: nothing
    # is copied from the host, so the call stays capturable in a CUDA graph)
    q5 = plan.prepare_q(q).unflatten(2, (u_deg, h))
    k5, v5 = (plan.prepare_kv(t).unflatten(2, (u_deg, m)) for t in (k, v))
    ratio = h // m
    if count > m:  # groups share kv heads: each takes the kv head of each of its query heads
        # expand, not repeat_interleave: no repeat counts to read back from the device (capturable)
        k5, v5 = (t.unsqueeze(4).expand(*t.shape[:4], ratio, t.shape[4]).flatten(3, 4) for t in (k5, v5))
    mask_all = steps.key_mask_to_heads(key_mask)  # no head dimension: gathered once for every group
    device = q.device

    def start_in(group: HeadGroup):
        a, b = group.start, group.stop
        ka, kb = (a, b) if count > m else (group.kv_heads[0], group.kv_heads[-1] + 1)
        sub = dataclasses.replace(steps, heads=HeadPlan.make(u_deg * (b - a), u_deg * (kb - ka), u_deg))
        q_g = q5[:, :, :, a:b].flatten(2, 3)  # rank u's heads of the group, rank block after rank block
        k_g, v_g = k5[:, :, :, ka:kb].flatten(2, 3), v5[:, :, :, ka:kb].flatten(2, 3)
        return sub, sub.start_to_heads(q_g, k_g, v_g, async_op=True)

    n_pre, n_suf, seg = rows.prefix, rows.suffix, steps.segment
    s_r, batch, d = steps.group_sizes[steps.rank], q.shape[0], q.shape[3]
    out = torch.empty(batch, s_r, u_deg, h, d, dtype=q.dtype, device=device)
    texts, sending = [], []
    incoming = start_in(groups[0])
    for index, group in enumerate(groups):
        nxt = start_in(groups[index + 1]) if index + 1 < len(groups) else None  # in flight during this attention
        sub, started = incoming
        q_all, k_all, v_all = sub.finish_to_heads(started)
        out_all = attend(q_all, k_all, v_all, mask_all)
        if n_pre or n_suf:
            texts.append(torch.cat([out_all[:, :n_pre], out_all[:, n_pre + seg :]], 1))
        sending.append((group, _start_to_sequence(sub, out_all[:, n_pre : n_pre + seg])))
        incoming = nxt
    for group, (work, recv) in sending:
        work.wait()
        n = group.stop - group.start
        out[:, :, :, group.start : group.stop].copy_(recv.view(u_deg, s_r, batch, n, d).permute(2, 1, 0, 3, 4))
    result = out.view(batch, s_r, u_deg * h, d)[:, :, : plan.num_heads]
    if not texts:
        return result
    text_out = gather_replicated(torch.cat(texts, dim=2))
    return torch.cat([text_out[:, :n_pre], result, text_out[:, n_pre:]], dim=1)


def _start_to_sequence(steps: UlyssesSteps, out_seg: torch.Tensor):
    """The inverse all-to-all of ``out_seg [B, S_seg, h_g, D]`` started: ``(work, recv [U * s_r, B, h_g, D])``."""
    if steps.zigzag_pieces is not None:
        from usp_attn.distributed.zigzag import to_rank_order

        out_seg = to_rank_order(out_seg, steps.zigzag_pieces, dim=1)
    sizes, s_r = steps.group_sizes, steps.group_sizes[steps.rank]
    batch, _, h, d = out_seg.shape
    send = out_seg.transpose(0, 1).contiguous()
    recv = torch.empty(len(sizes) * s_r, batch, h, d, dtype=out_seg.dtype, device=out_seg.device)
    even = all(n == s_r for n in sizes)
    work = dist.all_to_all_single(recv, send, output_split_sizes=None if even else [s_r] * len(sizes),
                                  input_split_sizes=None if even else list(sizes), group=steps.group, async_op=True)
    return work, recv


# ---- how many groups ---------------------------------------------------------------------------------------

def candidate_counts(plan: HeadPlan, batch: int, rows: int, device: torch.device) -> tuple[int, ...]:
    """Group counts worth timing for a call (``rows``: query rows per head after the all-to-all): those whose
    smallest group keeps at least :data:`MIN_WAVES` waves of 128-row attention blocks on the GPU. Empty on
    the CPU and where no count qualifies."""
    if device.type != "cuda":
        return ()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks_per_head = batch * -(-rows // 128)
    found = []
    for count in COUNTS:
        if count > plan.local_heads:
            break
        smallest = plan.local_heads // count
        if smallest * blocks_per_head >= MIN_WAVES * sms:
            found.append(count)
    return tuple(found)


def choose_group_count(key, run, counts: tuple[int, ...], group, device: torch.device, *, rounds: int = 5) -> int:
    """The group count for a call class ``key``: ``run(count)`` (one whole layer call, on every rank) timed
    for 1 and each of ``counts`` in interleaved rounds on every rank together; rank 0's medians decide, the
    count is broadcast and kept for the process. A count is chosen only if it beats one group. ``group``: every
    rank that must run the same groups (the sequence-parallel group: under the ring, every Ulysses group)."""
    if device.type != "cuda":
        return 1
    # rank 0's candidates for every rank: the trials are collective, so every rank must run the same ones
    counts = measured_choice.agree_once(("ulysses pipeline counts", key), lambda: tuple(counts), group,
                                        "listing Ulysses pipeline counts", "one group (no pipelining)")
    if not counts:
        return 1

    def decide() -> int:
        options = (1, *counts)
        for count in options:  # warm-up: allocations, communicators, kernels
            run(count)
        times = {count: [] for count in options}
        for round_index in range(rounds):
            shift = round_index % len(options)
            for count in options[shift:] + options[:shift]:
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                run(count)
                torch.cuda.synchronize(device)
                times[count].append(time.perf_counter() - start)
        medians = {count: statistics.median(ts) for count, ts in times.items()}
        best = min(medians, key=medians.get)
        return best if medians[best] < medians[1] else 1

    chosen = measured_choice.agree_once(("ulysses pipeline", key), decide, group, "timing the Ulysses pipeline",
                                        "one group (no pipelining)", everyone=True)
    return 1 if chosen is None else int(chosen)
