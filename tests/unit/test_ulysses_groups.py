"""How the Ulysses pipeline cuts a rank's heads into groups, and which counts the automatic choice times."""

from __future__ import annotations

import types

import pytest
import torch

from usp_attn.ulysses import pipelined
from usp_attn.ulysses.heads import HeadPlan


@pytest.mark.parametrize("heads,kv_heads,degree", [(8, 8, 2), (8, 2, 2), (8, 4, 2), (5, 5, 2), (40, 8, 4), (6, 1, 2)])
def test_groups_cover_every_local_head_once_with_the_kv_heads_they_read(heads, kv_heads, degree):
    plan = HeadPlan.make(heads, kv_heads, degree)
    h, m = plan.local_heads, plan.local_kv_heads
    for count in range(1, h + 1):
        groups = pipelined.head_groups(plan, count)
        assert len(groups) == count
        assert [g.start for g in groups] == [0] + [g.stop for g in groups[:-1]] and groups[-1].stop == h
        assert max(g.stop - g.start for g in groups) - min(g.stop - g.start for g in groups) <= (h // m)
        for g in groups:
            n, n_kv = g.stop - g.start, len(g.kv_heads)
            assert n > 0 and n % n_kv == 0  # the kernel's GQA rule holds inside the group
            assert [g.kv_heads[(i - g.start) // (n // n_kv)] for i in range(g.start, g.stop)] == \
                   [i // (h // m) for i in range(g.start, g.stop)]  # each query head reads its own kv head
    with pytest.raises(ValueError):
        pipelined.head_groups(plan, h + 1)


def test_candidate_counts_keep_four_waves_per_group(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))
    plan = HeadPlan.make(40, 40, 2)  # 20 heads per rank
    cuda = torch.device("cuda", 0)
    # Wan 14B 720p: 75600 rows -> 591 blocks per head; a group of h heads is h * 591 blocks, 528 = 4 waves
    assert pipelined.candidate_counts(plan, 1, 75600, cuda) == (2, 3, 4, 5, 7)
    # Flux: 4608 rows -> 36 blocks per head: a group needs 15 heads, so no count qualifies
    assert pipelined.candidate_counts(plan, 1, 4608, cuda) == ()
    assert pipelined.candidate_counts(plan, 1, 75600, torch.device("cpu")) == ()
