"""The sequence-parallel layers and a DiT block using them, captured in CUDA graphs under NCCL at
Ulysses-2 and ring-2 (groups of 2 GPUs side by side): replay bit-identical to eager.

``pytest -m multigpu tests/gpu/test_multigpu_graphs.py``; skipped with fewer than 2 GPUs. With
``USP_ATTN_MULTIGPU_CPU_RANKS=2`` the eager steps run on CPU processes (capture needs CUDA).
"""

from __future__ import annotations

import functools

import pytest

from tests.gpu import graph_cases as cases
from tests.gpu.multigpu import BACKEND, MULTIGPU, WORLD, run_on_gpus

pytestmark = [*MULTIGPU, pytest.mark.skipif(WORLD % 2 != 0, reason=f"the cases pair the ranks; {WORLD} is odd")]

LAYOUTS = [(2, 1), (1, 2)]
CASES = [functools.partial(fn, u, r) for u, r in LAYOUTS
         for fn in (cases.layer_replay, cases.block_replay, cases.compiled_layer_replay,
                    cases.pipeline_equals_unpipelined)]
EXPECTED = ("equal",) if BACKEND == "nccl" else ("no CUDA",)  # gloo dry run: the eager steps only


@pytest.fixture(scope="module")
def group():
    return run_on_gpus(CASES, timeout=600)


@pytest.mark.parametrize("u,r", LAYOUTS, ids=["ulysses2", "ring2"])
def test_layer_replay_equals_eager(group, u, r):
    results = group.check(functools.partial(cases.layer_replay, u, r))
    assert all(res in EXPECTED for res in results), results


@pytest.mark.parametrize("u,r", LAYOUTS, ids=["ulysses2", "ring2"])
def test_dit_block_replay_equals_eager(group, u, r):
    results = group.check(functools.partial(cases.block_replay, u, r))
    assert all(res in EXPECTED for res in results), results


@pytest.mark.parametrize("u,r", LAYOUTS, ids=["ulysses2", "ring2"])
def test_reduce_overhead_compile_equals_eager(group, u, r):
    results = group.check(functools.partial(cases.compiled_layer_replay, u, r))
    assert all(res in EXPECTED for res in results), results


@pytest.mark.parametrize("u,r", LAYOUTS, ids=["ulysses2", "ring2"])
def test_ulysses_pipeline_equals_unpipelined(group, u, r):
    results = group.check(functools.partial(cases.pipeline_equals_unpipelined, u, r))
    assert all(res in EXPECTED for res in results), results
