"""The sequence-parallel layers on several GPUs (NCCL), one process per GPU: every test scenario in
every layout of every group size (groups side by side), and the safe defaults there.

``pytest -m multigpu tests/gpu`` (launch/multigpu_check.sh runs it); skipped with fewer than 2 GPUs.
The cases and their tolerances: multigpu_cases.py; how they run: multigpu.py.
"""

from __future__ import annotations

import functools

import pytest

from tests.gpu import multigpu_cases as cases
from tests.gpu.multigpu import BACKEND, MULTIGPU, WORLD, run_on_gpus

pytestmark = MULTIGPU

LAYOUTS = [(k, u, r) for k in cases.group_sizes(max(WORLD, 1)) for u, r in cases.layouts_of(k)]
PAIRS = WORLD % 2 == 0  # the safe-default cases run in groups of 2
SAFE = [functools.partial(cases.steady_state_syncs, 2, 1), functools.partial(cases.steady_state_syncs, 1, 2),
        cases.fp64_through_the_ring, functools.partial(cases.first_call_error, cases.MASK_ON_RANK0)]
if BACKEND == "nccl":
    SAFE.append(functools.partial(cases.first_call_error, cases.CPU_TENSORS))
CASES = [functools.partial(cases.layout, k, u, r) for k, u, r in LAYOUTS] + (SAFE if PAIRS else [])
needs_pairs = pytest.mark.skipif(WORLD > 1 and not PAIRS, reason=f"the safe-default cases pair the ranks; {WORLD} is odd")


@pytest.fixture(scope="module")
def group():
    return run_on_gpus(CASES)


@pytest.mark.parametrize("scenario", cases.SCENARIOS)
@pytest.mark.parametrize("k,u,r", LAYOUTS, ids=[f"{k}gpus-{u}x{r}" for k, u, r in LAYOUTS])
def test_layout_scenario(group, k, u, r, scenario):
    per_rank = group.check(functools.partial(cases.layout, k, u, r))
    groups = [list(range(g, g + k)) for g in range(0, WORLD, k)]
    verdict = cases.judge(groups, [results[scenario] for results in per_rank])
    assert verdict["passed"], verdict["problems"]


@needs_pairs
@pytest.mark.parametrize("u,r", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_default_validation_makes_no_host_sync_in_steady_state(group, u, r):
    expected = "none" if BACKEND == "nccl" else "no CUDA"
    assert group.check(functools.partial(cases.steady_state_syncs, u, r)) == [expected] * WORLD


@needs_pairs
def test_fp64_stays_fp64_through_the_ring(group):
    errors = group.check(cases.fp64_through_the_ring)
    assert max(errors) < 1e-12, errors


@needs_pairs
def test_key_mask_on_one_rank_fails_the_first_call_on_every_rank(group):
    for res in group.check(functools.partial(cases.first_call_error, cases.MASK_ON_RANK0)):
        assert res["error"].startswith("ValueError: attn_mask given: rank 0: True; rank 1: False"), res
        assert res["seconds"] < cases.TIMEOUT_S / 2, res  # raised at once, not after a collective's timeout


@needs_pairs
@pytest.mark.skipif(BACKEND != "nccl", reason="NCCL only: gloo moves CPU tensors")
def test_cpu_tensors_under_nccl_fail_the_first_call_on_every_rank(group):
    for res in group.check(functools.partial(cases.first_call_error, cases.CPU_TENSORS)):
        assert res["error"].startswith("ValueError") and "needs CUDA tensors" in res["message"], res
        assert res["seconds"] < cases.TIMEOUT_S / 2, res
