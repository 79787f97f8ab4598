"""The measured kernel choice in real gloo groups: rank 0 measures, every rank runs its winner.

Each rank "is" a Hopper machine with FlashAttention 4 (an injected platform and the FA4 stand-in,
which follows the real ``return_lse`` convention) and has its own deterministic timer that would
pick a *different* kernel on every rank; the sequence-parallel layers must still run rank 0's
winner everywhere, time only on rank 0, and compute attention exactly (bf16 vs fp64)."""

from __future__ import annotations

import contextlib
import functools
import sys

import pytest
import torch
import torch.distributed as dist

import usp_attn
import usp_attn.platforms
from tests.distributed.sp_cases import ensure_layout
from tests.helpers import fake_kernels
from tests.helpers.multiproc import run_cases
from tests.helpers.reference import reference_attention
from tests.helpers.state import reset_usp_attn_state
from usp_attn import AttentionBackendEnum as B
from usp_attn import measured_choice

HOPPER_FA4 = usp_attn.platforms.Platform.make("cuda", capability=(9, 0), packages=["flash_attn.cute"], device_name="H200")
# rank r's timer would crown WINNERS[r]; only rank 0's may count
WINNERS = ["fa4", "cudnn", "efficient", "flash"]
KERNELS = ["fa4", "cudnn", "flash", "efficient"]


class RankTimer(measured_choice.KernelTimer):
    def __init__(self, winner):
        self.table = {k: (1.0 if k == winner else 5.0 + i) for i, k in enumerate(KERNELS)}
        self.timed = 0

    def usable(self, q):
        return True

    def warm_up(self, candidate, call, device):
        call()

    def time(self, candidate, call, device):
        call()
        self.timed += 1
        return self.table[candidate.kernel]


@contextlib.contextmanager
def hopper_with_fa4():
    """This process: an H200 with flash-attn-4 (stand-in) and a timer of its own."""
    saved = sys.modules.get("flash_attn.cute")
    sys.modules["flash_attn.cute"] = fake_kernels.fake_flash_attn4()
    timer = RankTimer(WINNERS[dist.get_rank()])
    previous = measured_choice.set_timer(timer)
    try:
        with usp_attn.platforms.override_platform(HOPPER_FA4):
            yield timer
    finally:
        measured_choice.set_timer(previous)
        if saved is None:
            sys.modules.pop("flash_attn.cute", None)
        else:
            sys.modules["flash_attn.cute"] = saved
        usp_attn.destroy_sequence_parallel()
        reset_usp_attn_state()


def _attend(layer, heads, causal=False, length=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, length, heads, 64, generator=gen).to(torch.bfloat16) for _ in range(3))
    out = layer(usp_attn.shard_sequence(q), usp_attn.shard_sequence(k), usp_attn.shard_sequence(v))
    ref = usp_attn.shard_sequence(reference_attention(q, k, v, causal=causal))
    err = (out.double() - ref).abs().max().item()
    assert err <= 2.0**-6 * ref.abs().max().item(), err
    return err


def case_rank0_measures_every_rank_runs_its_winner(ulysses, ring):
    with hopper_with_fa4() as timer:
        ensure_layout(ulysses, ring)
        layer = usp_attn.USPAttention(8, 64)
        _attend(layer, 8)
        sel = layer.local._last
        assert sel.source == "measured" and sel.kernel == "fa4" and sel.backend is B.FA
        assert (timer.timed > 0) == (dist.get_rank() == 0)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (sel.kernel, sel.timings))
        assert all(g == gathered[0] for g in gathered)  # the same kernel and the same record everywhere
        timed = timer.timed
        _attend(layer, 8, seed=1)  # steady state: nothing timed, nothing exchanged
        _attend(usp_attn.USPAttention(8, 64), 8, seed=2)  # another layer of the same class
        assert timer.timed == timed
        causal = usp_attn.USPAttention(8, 64, causal=True)
        _attend(causal, 8, causal=True)  # a new class is measured (on rank 0) again
        assert (timer.timed > timed) == (dist.get_rank() == 0)


def case_explicit_fa_runs_fa4_under_the_ring(ulysses, ring):
    """--attention-backend fa with flash-attn-4: FA4 in every block, with the LSE asked for as FA4
    wants it (its stand-in returns no LSE otherwise, and the ring would fail)."""
    with hopper_with_fa4() as timer:
        usp_attn.global_force_attn_backend("fa")
        ensure_layout(ulysses, ring)
        layer = usp_attn.USPAttention(8, 64)
        _attend(layer, 8)
        sel = layer.local._last
        assert sel.backend is B.FA and layer.local.kernel_for(
            *(torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16) for _ in range(3)), need_lse=ring > 1)[1].generation == "fa4"
        calls = sys.modules["flash_attn.cute"].calls
        assert calls and all(c["return_lse"] == (ring > 1) for c in calls)
        assert timer.timed == 0  # an explicit request is not measured


LAYOUTS = [(2, 2), (1, 4), (4, 1)]
CASES = [functools.partial(case, u, r) for u, r in LAYOUTS
         for case in (case_rank0_measures_every_rank_runs_its_winner, case_explicit_fa_runs_fa4_under_the_ring)]


@pytest.fixture(scope="module")
def group():
    return run_cases(4, CASES, setup=reset_usp_attn_state, timeout=240)


@pytest.mark.xdist_group("measured_choice_group")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.func.__name__}-U{c.args[0]}xR{c.args[1]}")
def test_case(group, case):
    group.check(case)
