"""``torch.compile(fullgraph=True)`` of the sequence-parallel layers at world 2 and 4 (gloo, CPU, fp32):
no graph break, one graph over 50 calls at fixed shapes, one more for a changed shape, equal to eager.
Most cases use the ``aot_eager`` backend (dynamo + the fake-tensor pass, no code generation: the
CPU inductor is slow on a 2-core machine); one compiles a DiT block with ``inductor``."""

from __future__ import annotations

import functools

import pytest

from tests.distributed import compile_cases
from tests.helpers.multiproc import case_name, run_cases
from tests.helpers.state import reset_usp_attn_state

P = functools.partial
#: group name -> (ranks, cases): one spawned group per name runs all its cases (spawning costs seconds)
GROUPS = {
    "w2": (2, [P(compile_cases.layer_steady_state, 2, 1), P(compile_cases.layer_steady_state, 1, 2),
               P(compile_cases.graph_breaks, 2, 1), P(compile_cases.graph_breaks, 1, 2),
               P(compile_cases.block_compiled, 2, 1), P(compile_cases.block_compiled, 1, 2)]),
    "w4": (4, [P(compile_cases.layer_steady_state, 2, 2), P(compile_cases.graph_breaks, 2, 2),
               P(compile_cases.block_compiled, 2, 2)]),
    # inductor generates and builds C++ on every rank: tens of seconds on 2 cores
    "w4-inductor": (4, [P(compile_cases.block_compiled, 2, 2, "inductor")]),
}
SLOW = {"w4-inductor"}


@functools.cache
def _run(name: str):
    world, cases = GROUPS[name]
    return run_cases(world, cases, setup=reset_usp_attn_state, timeout=600)


def _params(func):
    for name, (world, cases) in GROUPS.items():
        for case in cases:
            if case.func is not func:
                continue
            marks = [pytest.mark.xdist_group(f"compile_sp_{name}")] + ([pytest.mark.slow] if name in SLOW else [])
            yield pytest.param(name, case, id=f"W{world}-{case_name(case)}", marks=marks)


def _results(name, case):
    return _run(name).check(case)


@pytest.mark.parametrize("group,case", list(_params(compile_cases.layer_steady_state)))
def test_layer_compiles_once_and_equals_eager(group, case):
    for res in _results(group, case):
        assert res["op_in_graph"]
        assert res["graphs_steady"] == 1, res  # no recompile over the 50 calls
        assert res["equal"], res  # bit-identical to the eager layer
        assert res["graphs_after_change"] == 2, res  # a changed shape compiles exactly once more
        assert res["changed_close"] == 0.0 and res["changed_equal"], res


@pytest.mark.parametrize("group,case", list(_params(compile_cases.graph_breaks)))
def test_no_graph_break_even_when_compiled_first(group, case):
    for res in _results(group, case):
        assert res["breaks"] == 0 and res["graphs"] == 1, res
        assert res["equal"], res


@pytest.mark.parametrize("group,case", list(_params(compile_cases.block_compiled)))
def test_dit_block_compiles_whole(group, case):
    for res in _results(group, case):
        assert res["graphs"] == 1, res
        if case.args[2:] in ((), ("aot_eager",)):
            assert res["equal"], res
        else:  # inductor fuses the block's pointwise ops: rounding may differ, the attention does not
            assert res["vs_eager"] <= 1e-5 * max(res["scale"], 1.0), res
        assert res["vs_one_process"] <= 1e-4 * max(res["scale"], 1.0), res
