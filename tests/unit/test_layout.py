"""The layout cost model (usp_attn/layout.py): every (cfg, U, R) is enumerated and can run, the
predictions behave as the model's formulas say they must when a term changes, ties go to the
layout with the fewest collectives, every rank of a real gloo group gets rank 0's pick, and
``usp-attn info --layouts`` prints it all.

Properties, not magic numbers: the terms are injected, so no test depends on this machine's speed.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
import torch.distributed as dist

from usp_attn import layout as L
from usp_attn.cli import main as cli_main
from usp_attn.ulysses.heads import HeadPlan
from tests.helpers.multiproc import run_cases

WAN14 = L.MODELS["Wan 14B 720p"]
HUNYUAN = L.MODELS["HunyuanVideo 720p"]


def flat_terms(*, tflops=600.0, launch=0.0, a2a=200.0, p2p=200.0, latency=0.0, overlap=0.0, overhead=0.0
               ) -> L.CostTerms:
    """Injected terms: one kernel speed at every length (no granularity effects) unless changed."""
    curve = L.KernelCurve(((1, tflops), (10**6, tflops)), launch_ms=launch)
    return L.CostTerms(kernel=curve, kernel_lse=curve, intra=L.Link(a2a, p2p, latency), hop_overhead_ms=overhead,
                       overlap_loss=overlap, sources=(("kernel", "given"),), device="test")


FREE_LINKS = dict(a2a=1e12, p2p=1e12)


# ---- enumeration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("guidance", [False, True])
def test_every_factorisation_is_a_candidate(world, guidance):
    w = L.Workload(heads=24, tokens=4096, head_size=64, guidance=guidance)
    valid, rejected = L.enumerate_layouts(world, w)
    want = {(c, u, world // c // u) for c in ((1, 2) if guidance else (1,)) if world % c == 0
            for u in range(1, world // c + 1) if (world // c) % u == 0}
    assert set(valid) == want and len(valid) == len(want) and rejected == []
    assert [c.layout for c in L.predict_layouts(world, w, flat_terms())] == valid


def test_cfg_degrees_as_told_and_rejections_say_why():
    w = L.Workload(heads=8, tokens=6, head_size=64)
    valid, rejected = L.enumerate_layouts(8, w, cfg_degrees=(1, 2))
    assert valid == [] and len(rejected) == 3 + 4
    assert all("needs a model with guidance" in why for (c, _, _), why in rejected if c == 2)
    assert all("6 tokens over 8 ranks" in why for (c, _, _), why in rejected if c == 1)
    wg = dataclasses.replace(w, guidance=True)
    assert {lay for lay in L.enumerate_layouts(8, wg, cfg_degrees=(1, 2))[0]} == {(2, 4, 1), (2, 2, 2), (2, 1, 4)}
    assert L.enumerate_layouts(8, wg, cfg_degrees=(4,))[0] == [(4, 2, 1), (4, 1, 2)]
    with pytest.raises(ValueError, match="no layout to pick from"):
        L.pick_layout(L.predict_layouts(8, w, flat_terms()))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        L.Workload(heads=12, kv_heads=5, tokens=10, head_size=8)


@pytest.mark.parametrize("heads, kv_heads", [(12, 12), (24, 24), (40, 40), (40, 8), (24, 1), (12, 4), (5, 5),
                                             (48, 2)])
def test_every_candidate_runs_as_the_ulysses_layer_splits_heads(heads, kv_heads):
    """Each candidate's heads per rank and padding are the Ulysses layer's own (HeadPlan), and a
    candidate pads exactly when the layer would."""
    w = L.Workload(heads=heads, kv_heads=kv_heads, tokens=1000, head_size=64, guidance=True)
    for world in (8, 16):
        for c in L.predict_layouts(world, w, L.assumed_terms()):
            plan = HeadPlan.make(heads, kv_heads, c.ulysses)
            assert c.cfg * c.ulysses * c.ring == world and c.shard_tokens >= 1
            assert (c.local_heads, c.local_kv_heads) == (plan.local_heads, plan.local_kv_heads)
            assert c.local_heads * c.ulysses >= heads and c.local_kv_heads >= 1
            assert bool(c.padding) == (plan.is_padded or plan.kv_heads_before_split != kv_heads), c
            if plan.is_padded:
                assert f"q heads {heads} -> {plan.padded_heads}" in c.padding


def test_padding_costs_kernel_time_and_is_avoided():
    """12 heads on 8 ranks: Ulysses-8 pads to 16 heads, a third more kernel work than U4 x R2; with
    cheap links the pick is a layout without padding."""
    w = L.Workload(heads=12, tokens=8192, head_size=64)
    costs = {c.layout: c for c in L.predict_layouts(8, w, flat_terms(**FREE_LINKS))}
    assert costs[(1, 8, 1)].padding.startswith("q heads 12 -> 16")
    assert costs[(1, 8, 1)].kernel_ms == pytest.approx(costs[(1, 4, 2)].kernel_ms * 16 / 12)
    assert not L.pick_layout(list(costs.values())).padding


# ---- the kernel curve ----------------------------------------------------------------------------
def test_kernel_curve_interpolates_in_log_length_and_clamps():
    curve = L.KernelCurve(((4096, 400.0), (1024, 200.0)), launch_ms=0.05)
    assert curve.points == ((1024, 200.0), (4096, 400.0))
    assert curve.tflops(1024) == 200.0 and curve.tflops(4096) == 400.0
    assert curve.tflops(2048) == pytest.approx(300.0)  # halfway in log length
    assert curve.tflops(10) == 200.0 and curve.tflops(10**6) == 400.0
    assert curve.ms(1, 2, 4096, 4096, 64) == pytest.approx(0.05 + 4 * 2 * 4096 * 4096 * 64 / 400e9)
    assert curve.ms(1, 0, 4096, 4096, 64) == 0.0
    with pytest.raises(ValueError):
        L.KernelCurve(())


# ---- properties of the model ---------------------------------------------------------------------
def _times(world, w, terms):
    return {c.layout: c.step_ms for c in L.predict_layouts(world, w, terms)}


@pytest.mark.parametrize("change", [
    dict(a2a=400.0), dict(p2p=400.0), dict(tflops=1200.0), dict(latency=0.0), dict(overlap=0.0), dict(launch=0.0)])
def test_a_faster_term_never_slows_a_layout(change):
    base = dict(a2a=200.0, p2p=200.0, tflops=600.0, latency=0.02, overlap=1.0, launch=0.01, overhead=0.02)
    for w in (WAN14, HUNYUAN, L.Workload(heads=12, kv_heads=4, tokens=3000, head_size=64, guidance=True)):
        slow, fast = _times(8, w, flat_terms(**base)), _times(8, w, flat_terms(**{**base, **change}))
        assert all(fast[k] <= slow[k] for k in slow), (w, change)


def test_free_communication_ties_go_to_the_fewest_collectives():
    """With free links and one kernel speed every layout costs the same: cfg first, then Ulysses."""
    terms = flat_terms(**FREE_LINKS)
    for w, want in ((WAN14, (2, 4, 1)), (HUNYUAN, (1, 8, 1))):
        costs = L.predict_layouts(8, w, terms)
        assert max(c.step_ms for c in costs) == pytest.approx(min(c.step_ms for c in costs), rel=1e-9)
        assert L.pick_layout(costs).layout == want
    # not a tie: the faster one wins whatever the preference
    costs = L.predict_layouts(8, HUNYUAN, flat_terms(a2a=1.0, p2p=1e12))
    assert L.pick_layout(costs).layout == (1, 1, 8)


def test_a_slower_link_kind_moves_the_pick_away_from_it():
    """Sweeping one link from fast to slow: the ring degree of the pick never grows as P2P slows (and
    ends at 1), the Ulysses degree never grows as the all-to-all slows (and ends at 1)."""
    rings, ulysses = [], []
    for scale in (1e6, 1e3, 100.0, 10.0, 1.0, 0.1, 0.01):
        slow_p2p = flat_terms(a2a=200.0, p2p=300.0 * scale, latency=0.02, launch=0.01, overlap=1.0)
        slow_a2a = flat_terms(a2a=200.0 * scale, p2p=300.0, latency=0.02, launch=0.01, overlap=1.0)
        rings.append(L.pick_layout(L.predict_layouts(8, HUNYUAN, slow_p2p)).ring)
        ulysses.append(L.pick_layout(L.predict_layouts(8, HUNYUAN, slow_a2a)).ulysses)
    assert rings == sorted(rings, reverse=True) and rings[0] > 1 and rings[-1] == 1, rings
    assert ulysses == sorted(ulysses, reverse=True) and ulysses[0] > 1 and ulysses[-1] == 1, ulysses


@pytest.mark.parametrize("seed", range(5))
def test_with_guidance_cfg_parallel_is_never_slower(seed):
    """Per rank CFG-2 does the work of U x R = N/2 in one pass, which is the work of N in two passes,
    in longer calls and with fewer collectives per layer: for any kernel that is no slower on longer
    calls, the best CFG-2 layout is at least as fast up to its one gather per step."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen))  # noqa: E731
    speeds = sorted(r(100, 700) for _ in range(3))
    curve = L.KernelCurve(tuple(zip((1024, 8192, 65536), speeds)), launch_ms=r(0, 0.1))
    terms = L.CostTerms(kernel=curve, kernel_lse=curve, intra=L.Link(r(1, 500), r(1, 500), r(0, 0.1)),
                        hop_overhead_ms=r(0, 0.1), overlap_loss=r(0, 1))
    for w in (WAN14, L.Workload(heads=12, kv_heads=4, tokens=5000, head_size=64, guidance=True, layers=3)):
        costs = L.predict_layouts(8, w, terms)
        gather = next(c.cfg_gather_ms for c in costs if c.cfg == 2)
        best_cfg = min(c.step_ms for c in costs if c.cfg == 2)
        assert best_cfg <= (min(c.step_ms for c in costs if c.cfg == 1) + gather) * (1 + 1e-9)


def test_ring_transfer_hides_behind_a_longer_kernel():
    """overlap_loss 0: a hop costs max(kernel, transfer); overlap_loss 1: kernel + transfer."""
    w = L.Workload(heads=8, tokens=8192, head_size=64)
    hidden = {c.layout: c for c in L.predict_layouts(4, w, flat_terms(p2p=1e4, overlap=0.0))}[(1, 1, 4)]
    assert hidden.ring_exposed_ms == 0.0
    slow = {c.layout: c for c in L.predict_layouts(4, w, flat_terms(p2p=0.01, overlap=0.0))}[(1, 1, 4)]
    transfer = 2 * 2048 * 8 * 64 * 2 / (0.01 * 1e6)
    assert slow.ring_exposed_ms == pytest.approx(3 * (transfer - slow.kernel_ms / 4))
    none = {c.layout: c for c in L.predict_layouts(4, w, flat_terms(p2p=1e4, overlap=1.0))}[(1, 1, 4)]
    assert none.ring_exposed_ms == pytest.approx(3 * 2 * 2048 * 8 * 64 * 2 / 1e10)


def test_longer_sequences_make_sequence_parallel_relatively_cheaper():
    """Communication grows like S and the kernel like S^2: sequence parallelism's extra cost over CFG
    parallelism shrinks as the sequence grows (and CFG stays ahead: the same work, no collectives per layer)."""
    ratios = []
    for tokens in (2048, 8192, 32768, 131072):
        costs = L.predict_layouts(8, L.Workload(heads=24, tokens=tokens, head_size=128, guidance=True),
                                  L.assumed_terms())
        ratios.append(min(c.step_ms for c in costs if c.cfg == 1) / min(c.step_ms for c in costs if c.cfg == 2))
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] > 1.0, ratios


def test_short_sequences_prefer_ulysses_to_ring_hops():
    """Each ring hop pays a launch, a latency and a hop overhead: at 2048 tokens the pick has no ring."""
    w = L.Workload(heads=24, tokens=2048, head_size=128)
    assert L.pick_layout(L.predict_layouts(8, w, L.assumed_terms())).ring == 1


def test_two_nodes_keep_ulysses_inside_a_node():
    terms = L.assumed_terms(gpus_per_node=8)
    for w in (WAN14, HUNYUAN):
        costs = {c.layout: c for c in L.predict_layouts(16, w, terms)}
        assert "ulysses" in costs[(1, 16, 1)].spans_nodes and costs[(1, 8, 2)].spans_nodes == ("ring",)
        assert "ulysses" not in L.pick_layout(list(costs.values())).spans_nodes
    wan = {c.layout: c for c in L.predict_layouts(16, WAN14, terms)}
    assert wan[(2, 8, 1)].spans_nodes == ("cfg",) and wan[(2, 4, 2)].spans_nodes == ("cfg",)
    # the same 16 GPUs on one node: nothing crosses
    assert all(not c.spans_nodes for c in L.predict_layouts(16, WAN14, L.assumed_terms()))
    with pytest.raises(ValueError, match="inter-node link"):
        L.predict_layouts(16, WAN14, dataclasses.replace(L.assumed_terms(), gpus_per_node=8))


# ---- measuring (CPU: the code path; the numbers describe this CPU) --------------------------------
def test_measured_terms_say_what_was_measured():
    terms = L.measure_terms([64, 128], heads=2, head_size=16, dtype=torch.float32, device="cpu", budget_ms=5.0)
    assert [n for n, _ in terms.kernel.points] == [64, 128] and all(t > 0 for _, t in terms.kernel.points)
    assert terms.kernel.launch_ms > 0 and terms.kernel_lse.points
    assert set(terms.measured()) == {"kernel", "kernel_lse"}
    assert {"alltoall", "p2p", "latency", "overlap"} <= set(terms.assumed())
    assert terms.source("kernel").startswith("measured: cpu")
    assert L.lengths_for(8, WAN14) == [9450, 18900, 37800, 75600]


# ---- every rank gets the same pick -----------------------------------------------------------------
def _pick_with_rank_terms() -> tuple:
    """Rank 1 believes its ring link is nearly dead; it still gets rank 0's pick."""
    slow_ring = dist.get_rank() == 1
    terms = flat_terms(a2a=200.0, p2p=0.001 if slow_ring else 1e6, latency=0.02, launch=0.01)
    choice = L.choose_layout(8, heads=24, tokens=65536, head_size=128, terms=terms)
    mine = L.pick_layout(L.predict_layouts(8, L.Workload(heads=24, tokens=65536, head_size=128), terms))
    return choice.layout, round(choice.step_ms, 6), mine.layout, len(choice.candidates)


def _default_world_and_assumed_terms() -> tuple:
    choice = L.choose_layout(heads=40, tokens=75600, head_size=128, guidance=True, layers=40, measure=False)
    return choice.layout


def _links_on_gloo() -> tuple:
    """Rank 1's clock says every call takes a second: ranks that planned their call counts from their own
    timings would make different numbers of collective calls and hang; the probes' counts are fixed."""
    if dist.get_rank() == 1:
        ticks = iter(range(10**6))
        L.time = type("SlowClock", (), {"perf_counter": staticmethod(lambda: float(next(ticks)))})
    try:
        link = L.measure_links(mib=1)
    finally:
        L.time = time
    return link.alltoall_gbps > 0, link.p2p_gbps > 0, link.latency_ms > 0


def _measured_pick_on_gloo() -> tuple:
    """measure=True in a gloo group: rank 0 times the kernel (links stay assumed on gloo), all get its pick."""
    choice = L.choose_layout(4, heads=2, tokens=64, head_size=16, measure=True, dtype=torch.float32, budget_ms=5.0)
    measured = choice.terms.measured() if choice.terms is not None else None
    return choice.layout, measured


def _errors_on_every_rank() -> tuple:
    """No layout at all (cfg 2 only, 3 ranks): every rank raises before any collective. Rank 0 alone has
    terms that cannot be used (nodes without an inter-node link): every rank raises, none hangs."""
    found = []
    try:
        L.choose_layout(3, heads=4, tokens=64, head_size=16, guidance=True, cfg_degrees=(2,), measure=False)
    except ValueError as exc:
        found.append(str(exc))
    bad = dataclasses.replace(L.assumed_terms(), gpus_per_node=2) if dist.get_rank() == 0 else L.assumed_terms()
    try:
        L.choose_layout(4, heads=4, tokens=64, head_size=16, terms=bad)
    except (ValueError, RuntimeError) as exc:
        found.append(f"{type(exc).__name__}: {exc}")
    return found


def _layout_check_rows() -> list[dict]:
    from benchmarks.layout_model import layout_check_part
    from benchmarks.suite import Context

    return layout_check_part(Context(device=torch.device("cpu"), dry_run=True, budget_s=60, target_s=0.05))


CASES = [_pick_with_rank_terms, _default_world_and_assumed_terms, _links_on_gloo, _measured_pick_on_gloo,
         _errors_on_every_rank, _layout_check_rows]


@pytest.fixture(scope="module")
def group_run():
    return run_cases(2, CASES, timeout=120)


@pytest.mark.xdist_group("layout_group")
def test_every_rank_gets_rank_zeros_pick(group_run):
    results = group_run.check(_pick_with_rank_terms)
    rank0_pick = results[0][2]
    assert results[1][2] != rank0_pick  # rank 1 alone would pick otherwise
    assert results[0][:2] == results[1][:2] and results[0][0] == rank0_pick
    assert results[0][3] == 4 and results[1][3] == 0  # the table stays on rank 0


@pytest.mark.xdist_group("layout_group")
def test_default_group_is_the_world(group_run):
    assert group_run.check(_default_world_and_assumed_terms) == [(2, 1, 1)] * 2


@pytest.mark.xdist_group("layout_group")
def test_measured_pick_reaches_every_rank(group_run):
    (pick0, measured0), (pick1, measured1) = group_run.check(_measured_pick_on_gloo)
    assert pick0 == pick1 and measured0 == ["kernel", "kernel_lse"] and measured1 is None


@pytest.mark.xdist_group("layout_group")
def test_failures_reach_every_rank(group_run):
    rank0, rank1 = group_run.check(_errors_on_every_rank)
    assert rank0[0] == rank1[0] == "no layout of 3 ranks can run this model: no CFG degree in (2,) divides 3"
    assert rank0[1] == "ValueError: terms with gpus_per_node need an inter-node link"
    assert rank1[1].startswith("RuntimeError: choose_layout failed on group rank 0")


@pytest.mark.xdist_group("layout_group")
def test_layout_check_part_on_two_ranks(group_run):
    """The torchrun part: every layout of 2 ranks timed beside its prediction, the pick among them, and the
    headline comparing the pick with the fastest measured (the numbers describe this CPU)."""
    rows = group_run.check(_layout_check_rows)[0]
    steps = [r for r in rows if r.get("what") == "guided attention step"]
    assert [r["layout"] for r in steps] == ["1 GPU", "cfg2 x U1 x R1", "cfg1 x U2 x R1", "cfg1 x U1 x R2"]
    assert all(r["ms"] > 0 and r["predicted_ms"] > 0 for r in steps)
    assert [r.get("pick") for r in steps[1:]].count("*") == 1 and steps[1]["note"] == "links measured"
    (head,) = [r for r in rows if r.get("metric") == "L1"]
    assert head["value"] >= 1.0 and head["gpus"] == 2


@pytest.mark.xdist_group("layout_group")
def test_links_measured_on_a_real_group(group_run):
    assert group_run.check(_links_on_gloo) == [(True, True, True)] * 2


def test_measuring_under_torchrun_without_a_group_is_refused(monkeypatch):
    """Each rank would time its own kernel and could pick differently: refused, unless the terms are assumed."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        L.choose_layout(2, heads=4, tokens=64, head_size=16, measure=True)
    assert L.choose_layout(2, heads=4, tokens=64, head_size=16, measure=False).layout in {(1, 2, 1), (1, 1, 2)}


def test_choose_layout_without_a_group():
    choice = L.choose_layout(4, heads=12, tokens=32760, head_size=128, guidance=True, measure=False)
    assert choice.cfg * choice.ulysses * choice.ring == 4 and len(choice.candidates) == 5
    assert choice.terms.measured() == [] and choice.step_ms == min(c.step_ms for c in choice.candidates)
    assert choice.table.startswith("layouts for 4 GPUs")
    assert f"pick: cfg{choice.cfg} x U{choice.ulysses} x R{choice.ring} (" in choice.table


# ---- the CLI ---------------------------------------------------------------------------------------
def test_info_layouts_prints_every_candidate_and_the_pick(capsys):
    assert cli_main(["info", "--layouts", "8,12,32760,128", "--guidance", "--layers", "30", "--assumed"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("layouts for 8 GPUs: H=12 H_kv=12 S=32760 D=128"):]
    assert "measured here: nothing; assumed: kernel, kernel_lse, alltoall, p2p, latency" in table
    valid = L.enumerate_layouts(8, L.Workload(12, 32760, 128, guidance=True))[0]
    names = [f"cfg{c} x U{u} x R{r}" for c, u, r in valid]
    assert len(names) == 7 and all(n in table for n in names)
    assert "q heads 12 -> 16 (+4 zero)" in table  # Ulysses-8 pads
    pick = L.pick_layout(L.predict_layouts(8, L.Workload(12, 32760, 128, guidance=True, layers=30),
                                           L.assumed_terms()))
    assert f"pick: {pick.name} (" in table and f"{pick.name} *" in table


def test_info_layouts_json_nodes_and_errors(capsys):
    assert cli_main(["info", "--layouts", "16,24,118800,128", "--kv-heads", "8", "--nodes", "2", "--layers", "60",
                     "--json", "--assumed"]) == 0
    info = json.loads(capsys.readouterr().out)["layouts"]
    assert info["nodes"] == 2 and len(info["candidates"]) == 5 and info["workload"]["kv_heads"] == 8
    assert "inter" in info["terms"]["assumed"] and info["pick"]["spans_nodes"] != ["ulysses"]
    assert cli_main(["info", "--layouts", "8,12,100,64", "--nodes", "3"]) == 2
    assert "nodes must be a positive int dividing the 8 GPUs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["info", "--layouts", "8,12,3"])
    assert "expected N,H,S,D" in capsys.readouterr().err


# ---- the benchmark part (CPU: a toy shape, the code path) -------------------------------------------
def test_layout_benchmark_part_dry_run():
    from benchmarks.layout_model import layout_part
    from benchmarks.suite import Context

    rows = layout_part(Context(device=torch.device("cpu"), dry_run=True, budget_s=60, target_s=0.1))
    terms = [r for r in rows if r["what"] in ("kernel term", "kernel_lse term")]
    assert len(terms) == 2 * 4 and all(r["tflops"] > 0 for r in terms)  # S, S/2, S/4, S/8, with and without LSE
    assert terms[0]["note"].startswith("measured: cpu")
    checks = [r for r in rows if r["what"] == "kernel at a candidate's call"]
    assert checks and all(r["ms"] > 0 and r["curve_ratio"] > 0 for r in checks)
    for world, what in ((2, "predicted"), (4, "predicted"), (8, "predicted"), (16, "predicted, 2 nodes")):
        mine = [r for r in rows if r["what"] == what and r["gpus"] == world]
        assert len(mine) == len(L.enumerate_layouts(world, L.Workload(4, 256, 16, guidance=True))[0])
        assert [r["pick"] for r in mine].count("*") == 1
        assert all(r["note"] == "measured kernel, assumed links" for r in mine)
    assert {r["across_nodes"] for r in rows if r.get("gpus") == 16} == {"cfg", "ulysses", "ring"}
