"""Sequence-parallel layers in real gloo groups of 1, 2, 4 and 8 processes, every (U, R) layout,
against an fp64 single-process reference (see sp_cases.py for the cases and tolerances)."""

from __future__ import annotations

import functools

import pytest

from tests.distributed import sp_cases
from tests.helpers.multiproc import run_cases, runs_per_world
from tests.helpers.state import reset_usp_attn_state

WORLD_SIZES = (1, 2, 4, 8)


def _cases(world: int) -> list:
    cases = []
    for u, r in sp_cases.layouts(world):
        cases += [functools.partial(sp_cases.run_scenario, u, r, name) for name in sp_cases.SCENARIOS]
        cases.append(functools.partial(sp_cases.cross_attention, u, r))
        cases.append(functools.partial(sp_cases.gather_roundtrip, u, r))
        cases.append(functools.partial(sp_cases.layer_flavours, u, r))
    return cases


def _setup() -> None:
    reset_usp_attn_state()


_run = runs_per_world(_cases, setup=_setup, timeout=300)


def _params():
    for world in WORLD_SIZES:
        for u, r in sp_cases.layouts(world):
            for name in sp_cases.SCENARIOS:
                # xdist: keep one world size's tests on one worker, so its group is spawned once.
                # 4 and 8 ranks: the full lane only (slow); 1 and 2 ranks keep every scenario fast.
                yield pytest.param(world, u, r, name, id=f"W{world}-U{u}xR{r}-{name}",
                                   marks=[pytest.mark.xdist_group(f"sp_world{world}"),
                                          *([pytest.mark.slow] if world >= 4 else [])])


@pytest.mark.parametrize("world,u,r,name", list(_params()))
def test_matches_fp64_reference(world, u, r, name):
    results = _run(world).check(functools.partial(sp_cases.run_scenario, u, r, name))
    for rank, res in enumerate(results):
        assert res["error"] <= res["tol"], (rank, res["error"])
    # Replicated (text) tokens: complete and bit-identical on every rank.
    assert all(res["replicated"] == results[0]["replicated"] for res in results)
    assert len({res["backend"] for res in results}) == 1


@pytest.mark.parametrize(
    "world", [pytest.param(w, marks=[pytest.mark.xdist_group(f"sp_world{w}"),
                                     *([pytest.mark.slow] if w >= 4 else [])])
              for w in WORLD_SIZES]
)
def test_cross_attention_gather_and_flavours(world):
    run = _run(world)
    for u, r in sp_cases.layouts(world):
        run.check(functools.partial(sp_cases.cross_attention, u, r))
        run.check(functools.partial(sp_cases.gather_roundtrip, u, r))
        run.check(functools.partial(sp_cases.layer_flavours, u, r))


SAFETY_CASES = [
    sp_cases.agreement_rank0_wins,
    sp_cases.bad_degrees,
    sp_cases.explicit_backend_without_lse_under_ring,
    functools.partial(sp_cases.validation_catches_mismatch, "mask"),
    functools.partial(sp_cases.validation_catches_mismatch, "prefix"),
    functools.partial(sp_cases.validation_catches_mismatch, "shape"),
    sp_cases.dead_rank_times_out,  # last: it leaves the group out of step
]


@pytest.fixture(scope="module")
def safety_run():
    return run_cases(2, SAFETY_CASES, setup=_setup, timeout=120)


def test_agreement_rank0_request_wins(safety_run):
    results = safety_run.check(sp_cases.agreement_rank0_wins)
    assert results == [("torch_sdpa", "torch_sdpa")] * 2


def test_bad_degrees_fail_before_collectives(safety_run):
    for msg in safety_run.check(sp_cases.bad_degrees):
        assert "ulysses_degree * ring_degree = 3" in msg and "got 2 ranks" in msg


def test_explicit_backend_without_lse_is_an_error_under_ring(safety_run):
    for msg in safety_run.check(sp_cases.explicit_backend_without_lse_under_ring):
        assert "ring attention needs a backend that returns the log-sum-exp" in msg and "sage_attn" in msg


@pytest.mark.parametrize("kind,needle", [
    ("mask", "attn_mask given"),
    ("prefix", "num_replicated_prefix"),
    ("shape", "rank 1: q has shape"),
])
def test_validation_errors_on_every_rank(safety_run, kind, needle):
    messages = safety_run.check(functools.partial(sp_cases.validation_catches_mismatch, kind))
    assert len(set(messages)) == 1, messages  # the same error on both ranks
    assert needle in messages[0], messages[0]


def test_dead_rank_gives_error_not_hang(safety_run):
    results = safety_run.check(sp_cases.dead_rank_times_out)
    assert results[0].startswith("error:"), results[0]


def test_world_size_one_equals_local_attention():
    run_cases(1, [sp_cases.world_one_is_local], setup=_setup, timeout=60).check_all()
