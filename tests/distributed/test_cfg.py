"""CFG parallelism in real gloo groups: every (cfg, U, R) of 4 and of 8 ranks with cfg in {1, 2} (U4 and R4 alone,
and those of 8 ranks, in the full lane); the built-in model and the real diffusers pipelines of every supported family
(two-call: Wan, Qwen-Image, Flux and HunyuanVideo with true CFG; batched: CogVideoX, LTX-Video) equal the one-process
run; the state's CFG layout; bad degrees fail alike on every rank. Cases and tolerances: cfg_cases.py."""

from __future__ import annotations

import functools
import importlib.util

import pytest

from tests.distributed import cfg_cases
from tests.helpers.multiproc import run_cases
from tests.helpers.state import reset_usp_attn_state

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def _cases(layouts, with_errors: bool) -> list:
    cases = []
    for cfg, u, r in layouts:
        cases.append(functools.partial(cfg_cases.layout_fields, cfg, u, r))
        cases.append(functools.partial(cfg_cases.builtin_model, cfg, u, r))
        if HAVE_DIFFUSERS:
            cases += [functools.partial(cfg_cases.pipeline, family, cfg, u, r) for family in cfg_cases.PIPELINES]
    if with_errors:
        cases += [cfg_cases.mesh_with_cfg_dim, cfg_cases.split_errors, cfg_cases.agreement_over_the_unit,
                  cfg_cases.guard_per_sp_group, *BAD_DEGREES]
        if HAVE_DIFFUSERS:
            cases += [cfg_cases.two_call_needs_cfg_degree_2, cfg_cases.batch_not_divisible,
                      cfg_cases.guidance_off_is_refused, cfg_cases.new_prompt_relearns]
    return cases


BAD_DEGREES = [
    functools.partial(cfg_cases.bad_degree, dict(ulysses_degree=2, cfg_degree=3)),
    functools.partial(cfg_cases.bad_degree, dict(ulysses_degree=1, cfg_degree=0)),
    functools.partial(cfg_cases.bad_degree, dict(ulysses_degree=2, cfg_degree="2")),
    functools.partial(cfg_cases.bad_degree, dict(ulysses_degree=2, cfg_degree=True)),
]


@pytest.fixture(scope="module")
def world4():
    return run_cases(4, _cases(cfg_cases.LAYOUTS_4, with_errors=True), setup=reset_usp_attn_state, timeout=280)


@pytest.fixture(scope="module")
def world4_slow():
    return run_cases(4, _cases(cfg_cases.LAYOUTS_4_SLOW, with_errors=False), setup=reset_usp_attn_state, timeout=280)


@pytest.fixture(scope="module")
def world8():
    return run_cases(8, _cases(cfg_cases.LAYOUTS_8, with_errors=False), setup=reset_usp_attn_state, timeout=280)


def _layout_id(layout):
    return "CFG{}xU{}xR{}".format(*layout)


def _check_layout(run, cfg, u, r):
    world = cfg * u * r
    fields = run.check(functools.partial(cfg_cases.layout_fields, cfg, u, r))
    assert len({f["backend"] for f in fields}) == 1
    assert {f["sp_ranks"] for f in fields} == {tuple(range(c * u * r, (c + 1) * u * r)) for c in range(cfg)}
    builtin = run.check(functools.partial(cfg_cases.builtin_model, cfg, u, r))
    for res in builtin:
        bound = cfg_cases.RTOL_OF_MAX * res["scale"]
        assert res["error"] <= bound, res
        assert res["swap_effect"] > 100 * bound, res  # the bound would catch swapped branches
        # Each rank's model saw the guided batch of 2 rows, or its CFG group's half of it.
        assert res["batch_rows"] == [2 // cfg] * cfg_cases.STEPS, res["batch_rows"]
    assert world == len(builtin)


@pytest.mark.xdist_group("cfg_world4")
@pytest.mark.parametrize("layout", cfg_cases.LAYOUTS_4, ids=_layout_id)
def test_builtin_model_matches_one_process(world4, layout):
    _check_layout(world4, *layout)


@pytest.mark.slow
@pytest.mark.xdist_group("cfg_world4_slow")
@pytest.mark.parametrize("layout", cfg_cases.LAYOUTS_4_SLOW, ids=_layout_id)
def test_sequence_parallel_only_layouts(world4_slow, layout):
    _check_layout(world4_slow, *layout)
    if HAVE_DIFFUSERS:
        for family in cfg_cases.PIPELINES:
            _check_pipeline(world4_slow, family, *layout)


def _check_pipeline(run, family, cfg, u, r):
    results = run.check(functools.partial(cfg_cases.pipeline, family, cfg, u, r))
    for res in results:
        bound = cfg_cases.RTOL_OF_MAX * res["scale"]
        assert res["error"] <= bound, (family, res)
        assert res["swap_effect"] > 100 * bound, (family, res)
        steps = cfg_cases.STEPS
        if family in cfg_cases.TWO_CALLS:
            # Both calls of the first step everywhere (learning the branches), then one call per step and rank.
            want = [1] * (2 * steps if cfg == 1 else 2 + (steps - 1))
        else:
            want = [2 // cfg] * steps  # one call per step on the guided batch, or this CFG group's half
        assert res["computed"] == want, (family, res["computed"], want)


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is not installed (the 'test' extra installs it)")
@pytest.mark.xdist_group("cfg_world4")
@pytest.mark.parametrize("family", cfg_cases.PIPELINES)
@pytest.mark.parametrize("layout", cfg_cases.LAYOUTS_4, ids=_layout_id)
def test_pipeline_matches_one_process(world4, layout, family):
    _check_pipeline(world4, family, *layout)


@pytest.mark.xdist_group("cfg_world4")
def test_mesh_with_cfg_dim(world4):
    results = world4.check(cfg_cases.mesh_with_cfg_dim)
    for rank, res in enumerate(results):
        assert res["degrees"] == (2, 2, 1)
        assert res["sp_ranks"] == ((0, 1) if rank < 2 else (2, 3))
        assert res["cfg_ranks"] == (rank % 2, rank % 2 + 2)
        assert res["mesh_dims"] == ("ring", "ulysses") and res["mesh_ranks"] == list(res["sp_ranks"])
        assert "cfg_degree=4 contradicts the mesh, whose 'cfg' dim has size 2" in res["contradiction"]


@pytest.mark.xdist_group("cfg_world4")
def test_one_backend_agreement_for_both_cfg_groups(world4):
    assert world4.check(cfg_cases.agreement_over_the_unit) == [["torch_sdpa", "torch_sdpa", 4]] * 4


@pytest.mark.xdist_group("cfg_world4")
def test_argument_check_stays_inside_each_sp_group(world4):
    results = world4.check(cfg_cases.guard_per_sp_group)
    for rank, res in enumerate(results):
        assert res["cfg_rank"] == rank // 2
        if rank < 2:  # the other CFG group: untouched by the mismatch
            assert res["error"] is None and res["shape"] == (1, 10, 4, 8), res
        else:
            # The guard names SP ranks: global rank 3 is SP rank 1 of CFG group 1 (state.sp_ranks maps them).
            assert res["error"] is not None and "rank 1: q has shape [1, 10, 3, 8]" in res["error"], res
    assert results[2]["error"] == results[3]["error"]


@pytest.mark.xdist_group("cfg_world4")
@pytest.mark.parametrize("case", BAD_DEGREES, ids=lambda c: repr(c.args[0]))
def test_bad_degrees_fail_alike_on_every_rank(world4, case):
    messages = world4.check(case)
    assert len(set(messages)) == 1, messages
    assert "cfg_degree" in messages[0], messages[0]
    if case.args[0]["cfg_degree"] == 3:
        assert "cfg_degree * ulysses_degree * ring_degree = 6 must equal the number of sequence-parallel ranks, " \
               "got 4 ranks" in messages[0], messages[0]


@pytest.mark.xdist_group("cfg_world4")
def test_split_needs_a_batch_cfg_degree_divides(world4):
    messages = world4.check(cfg_cases.split_errors)
    assert all(m == messages[0] for m in messages) and len(messages[0]) == 2, messages
    assert "cfg_degree=4 must divide the batch to split, but x has 2 rows" in messages[0][0]
    assert "x has 1 rows" in messages[0][1]


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is not installed (the 'test' extra installs it)")
@pytest.mark.xdist_group("cfg_world4")
def test_pipeline_misuse_fails_alike_on_every_rank(world4):
    for case, expected in (
        (cfg_cases.two_call_needs_cfg_degree_2, "splits over cfg_degree=2 CFG groups, not cfg_degree=4"),
        (cfg_cases.batch_not_divisible, "cfg_degree=4 must divide the batch of 2 rows"),
        (cfg_cases.guidance_off_is_refused, "two consecutive calls differ in ['hidden_states', 'timestep']"),
    ):
        messages = world4.check(case)
        assert len(set(messages)) == 1, messages
        assert expected in messages[0], messages[0]


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is not installed (the 'test' extra installs it)")
@pytest.mark.xdist_group("cfg_world4")
def test_new_prompt_is_learned_again(world4):
    for res in world4.check(cfg_cases.new_prompt_relearns):
        assert res["error"] <= cfg_cases.RTOL_OF_MAX * res["scale"], res


@pytest.mark.slow
@pytest.mark.xdist_group("cfg_world8")
@pytest.mark.parametrize("layout", cfg_cases.LAYOUTS_8, ids=_layout_id)
def test_eight_ranks(world8, layout):
    _check_layout(world8, *layout)
    if HAVE_DIFFUSERS:
        for family in cfg_cases.PIPELINES:
            _check_pipeline(world8, family, *layout)
