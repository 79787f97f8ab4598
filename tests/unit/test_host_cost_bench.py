"""The host-cost and ulysses-overlap benchmark parts at their CPU sizes: every code path runs and the rows
are complete (what they measure is the GPU's business; these check what the parts produce)."""

from __future__ import annotations

import torch

from benchmarks.suite import Context
from tests.helpers.multiproc import run_in_group


def _ctx() -> Context:
    return Context(device=torch.device("cpu"), dry_run=True, budget_s=120, target_s=0.1)


def test_host_cost_part_rows():
    from benchmarks.host_cost import host_cost_part

    rows = host_cost_part(_ctx())
    names = {r["what"] for r in rows}
    assert {"raw kernel eager", "LocalAttention eager", "DiT block eager", "DiT block compiled"} <= names, names
    assert all(r["ms"] > 0 for r in rows if "ms" in r)
    assert any(r.get("metric") == "H1" for r in rows)


def _overlap_rows():
    torch.set_num_threads(1)
    from benchmarks.host_cost import ulysses_overlap_part

    return ulysses_overlap_part(_ctx())


def test_ulysses_overlap_part_rows_on_two_ranks():
    for rows in run_in_group(2, _overlap_rows, timeout=120):
        names = [r["what"] for r in rows]
        assert "Ulysses-2 unpipelined" in names and "Ulysses-2 pipelined, automatic" in names, names
        assert any("2 groups" in n for n in names)
        timed = [r for r in rows if "ms" in r]
        assert all(r["ms"] > 0 for r in timed), timed
        assert [r for r in rows if r.get("metric") == "U2"], rows


def test_ulysses_overlap_part_on_one_rank_times_the_head_groups():
    from benchmarks.host_cost import ulysses_overlap_part

    rows = ulysses_overlap_part(_ctx())
    timed = {r["what"]: r for r in rows if "ms" in r}
    assert set(timed) == {"one call, every local head", "2 head groups, one after another"}, rows
    assert all(r["ms"] > 0 and r["vs_one_call"] > 0 for r in timed.values())
    assert timed["one call, every local head"]["vs_one_call"] == 1.0
    assert any("needs 2 ranks" in r.get("note", "") for r in rows)  # the pipeline itself is not claimed
