"""Layouts across two simulated nodes: 4 gloo ranks, "node" = rank // 2, every (cfg, U, R) of 4 ranks.

For each layout one guided attention step (cond and uncond branches, CFG-combined) runs sequence
parallel and must equal the same step in one process (fp32); the groups ``init_sequence_parallel``
builds must be the ones the layout cost model places (usp_attn.layout.placement), so the model's
"which collective crosses a node" is the real one: CFG across the nodes with Ulysses inside, the
ring across the nodes, Ulysses-4 across them.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import usp_attn
from usp_attn import layout as L
from tests.helpers.multiproc import run_cases
from tests.helpers.state import reset_usp_attn_state

GPUS_PER_NODE = 2
LAYOUTS = [(2, 2, 1), (2, 1, 2), (1, 4, 1), (1, 2, 2), (1, 1, 4)]
B, S, H, D = 1, 37, 6, 8  # uneven shards; 6 heads padded to 8 under Ulysses-4
SCALE = 3.0  # guidance scale


def _branch(i: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(100 + i)
    return tuple(torch.randn(B, S, H, D, generator=gen) for _ in range(3))


def _one_process() -> torch.Tensor:
    attn = usp_attn.LocalAttention(H, D)
    uncond, cond = (attn(*_branch(i)) for i in (0, 1))
    return uncond + SCALE * (cond - uncond)


def guided_step(cfg: int, u: int, r: int) -> dict:
    state = usp_attn.init_sequence_parallel(ulysses_degree=u, ring_degree=r, cfg_degree=cfg)
    try:
        attn = usp_attn.USPAttention(H, D)
        branches = [state.cfg_rank] if cfg > 1 else [0, 1]
        preds = []
        for i in branches:
            q, k, v = (usp_attn.shard_sequence(t) for t in _branch(i))
            preds.append(usp_attn.gather_sequence(attn(q, k, v)))
        both = usp_attn.cfg_gather(preds[0][None]) if cfg > 1 else torch.stack(preds)
        guided = both[0] + SCALE * (both[1] - both[0])
        want = _one_process()
        groups = {"ulysses": list(state.ulysses_ranks) or [dist.get_rank()],
                  "ring": list(state.ring_ranks) or [dist.get_rank()],
                  "cfg": list(state.cfg_ranks) or [dist.get_rank()]}
        return {"rel_err": float((guided - want).norm() / want.norm()), "groups": groups}
    finally:
        usp_attn.destroy_sequence_parallel()


def layout_check_on_two_nodes() -> list[dict]:
    """The layout-check benchmark part as torchrun would run it on 2 nodes of 2: links probed inside and
    between the simulated nodes, every layout timed beside its prediction."""
    import os

    from benchmarks.layout_model import layout_check_part
    from benchmarks.suite import Context

    os.environ["LOCAL_WORLD_SIZE"] = str(GPUS_PER_NODE)
    try:
        return layout_check_part(Context(device=torch.device("cpu"), dry_run=True, budget_s=60, target_s=0.05))
    finally:
        del os.environ["LOCAL_WORLD_SIZE"]


CASES = [functools.partial(guided_step, *layout) for layout in LAYOUTS] + [layout_check_on_two_nodes]
pytestmark = pytest.mark.xdist_group("layout_nodes")  # one worker spawns the 4 ranks once


@pytest.fixture(scope="module")
def group_run():
    return run_cases(4, CASES, setup=reset_usp_attn_state, timeout=180)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "cfg{}xU{}xR{}".format(*t))
def test_layout_across_two_nodes_matches_one_process(group_run, layout):
    results = group_run.check(functools.partial(guided_step, *layout))
    assert all(res["rel_err"] < 1e-5 for res in results), [res["rel_err"] for res in results]
    placed = L.placement(layout)
    for rank, res in enumerate(results):
        for axis, members in res["groups"].items():
            assert members in placed[axis] and rank in members, (rank, axis, members, placed[axis])
    # the cost model's "across nodes" is what the real groups do
    crossing = sorted({axis for res in results for axis, members in res["groups"].items()
                       if len({m // GPUS_PER_NODE for m in members}) > 1})
    terms = L.assumed_terms(gpus_per_node=GPUS_PER_NODE)
    cost = next(c for c in L.predict_layouts(4, L.Workload(H, S, D, guidance=True), terms) if c.layout == layout)
    assert sorted(cost.spans_nodes) == crossing
    assert crossing == {(2, 2, 1): ["cfg"], (2, 1, 2): ["cfg"], (1, 4, 1): ["ulysses"], (1, 2, 2): ["ring"],
                        (1, 1, 4): ["ring"]}[layout]


def test_layout_check_part_measures_both_links_on_two_nodes(group_run):
    rows = group_run.check(layout_check_on_two_nodes)[0]
    steps = {r["layout"]: r for r in rows if r.get("what") == "guided attention step"}
    assert set(steps) == {"1 GPU"} | {"cfg{} x U{} x R{}".format(*t) for t in LAYOUTS}
    assert all(r["ms"] > 0 and r["predicted_ms"] > 0 and r["note"] == "links measured"
               for name, r in steps.items() if name != "1 GPU")
    assert {name: r["across_nodes"] for name, r in steps.items() if name != "1 GPU"} == {
        "cfg2 x U2 x R1": "cfg", "cfg2 x U1 x R2": "cfg", "cfg1 x U4 x R1": "ulysses", "cfg1 x U2 x R2": "ring",
        "cfg1 x U1 x R4": "ring"}
    assert [r.get("pick") for r in steps.values()].count("*") == 1
    assert [r["metric"] for r in rows if "metric" in r] == ["L1"]
    terms = {r["what"]: r["note"] for r in rows if r["what"].startswith("term ")}
    assert terms["term inter"].startswith("measured: between nodes of 2")
    assert terms["term p2p"].startswith("measured (2 ranks of a node)") and terms["term kernel"].startswith("measured")
