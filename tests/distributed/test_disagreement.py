"""Safe by default: every row of the "ranks disagree / bad argument" table, on real gloo groups.

Each row asserts the named error on every rank and a bound on the time it takes. The fast rows
run with a 20 s group timeout and must end within FAST_BOUND_S: the first call of a layer is
checked through the store in milliseconds, so a regression to "wait for the timeout" fails the
bound instead of passing slowly. Two rows can only end at the group timeout by design (a rank
that changes its arguments alone after the first call; see usp_attn.distributed.guard):
they run with a 3 s timeout and are bounded by it plus the report grace period.

One spawned group per world size runs all its cases (spawning costs seconds, a case milliseconds).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import disagreement_cases as cases
from tests.helpers.multiproc import case_name, run_cases
from tests.helpers.state import reset_usp_attn_state
from usp_attn.distributed.guard import REPORT_GRACE_S

P = functools.partial
FAST_BOUND_S = 5.0  # a quarter of the group timeout; measured: 3-60 ms on 2 loaded cores
SLOW_BOUND_S = cases.SHORT_TIMEOUT + REPORT_GRACE_S + 3.0

TWO_RANKS = [
    P(cases.shard_length_off_by_one, True),
    P(cases.shard_length_off_by_one, None),
    P(cases.mask_on_one_rank, 2, 1),
    cases.seq_len_differs,
    cases.dtype_differs,
    cases.head_count_differs,
    P(cases.replicated_prefix_differs, 2, 1),
    cases.bad_softmax_scale,
    cases.meta_tensors,
    P(cases.fp64_ring, 1, 2),
    cases.check_schedule,
    cases.compile_steady_state,
    cases.arguments_change_on_one_rank,  # last: it leaves the SP groups timed out
]
FOUR_RANKS = [
    P(cases.mask_on_one_rank, 1, 4),
    P(cases.replicated_prefix_differs, 4, 1),
    P(cases.replicated_prefix_differs, 2, 2),
    P(cases.fp64_ring, 2, 2),
    cases.rank_dies,  # last: rank 3 exits
]
two_ranks = pytest.mark.xdist_group("disagreement_2")
four_ranks = pytest.mark.xdist_group("disagreement_4")


@pytest.fixture(scope="module")
def two():
    return run_cases(2, TWO_RANKS, setup=reset_usp_attn_state, timeout=180)


@pytest.fixture(scope="module")
def four():
    return run_cases(4, FOUR_RANKS, setup=reset_usp_attn_state, timeout=240)


def same_error_everywhere(results: list[dict], *needles: str, bound: float = FAST_BOUND_S) -> str:
    """Every rank raised the same ValueError, containing ``needles``, within ``bound`` seconds."""
    for rank, res in enumerate(results):
        assert res["type"] == "ValueError", (rank, res)
        assert res["seconds"] < bound, (rank, res["seconds"])
    messages = {res["message"] for res in results}
    assert len(messages) == 1, messages
    message = messages.pop()
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@two_ranks
@pytest.mark.parametrize("validate", [True, None], ids=["validate", "default"])
def test_shard_length_off_by_one(two, validate):
    same_error_everywhere(two.check(P(cases.shard_length_off_by_one, validate)),
                          "rank 1: the local sequence shard has 11 tokens", "seq_len=20", "[10, 10]")


@two_ranks
def test_mask_on_one_rank_ulysses(two):
    same_error_everywhere(two.check(P(cases.mask_on_one_rank, 2, 1)), "attn_mask given: rank 0: True; rank 1: False")


@pytest.mark.slow  # 4 ranks: the full lane; 2 ranks keep each kind of disagreement fast
@four_ranks
def test_mask_on_one_rank_ring4(four):
    same_error_everywhere(four.check(P(cases.mask_on_one_rank, 1, 4)),
                          "attn_mask given: rank 0: True; ranks 1, 2, 3: False")


@two_ranks
def test_seq_len_differs(two):
    same_error_everywhere(two.check(cases.seq_len_differs), "seq_len: rank 0: 20; rank 1: 22")


@two_ranks
def test_dtype_differs(two):
    same_error_everywhere(two.check(cases.dtype_differs), "dtype: rank 0: 'torch.float32'; rank 1: 'torch.bfloat16'")


@two_ranks
def test_head_count_differs(two):
    same_error_everywhere(two.check(cases.head_count_differs),
                          "num_heads, num_kv_heads, head_size: rank 0: (4, 4, 8); rank 1: (2, 2, 8)")


@two_ranks
def test_replicated_prefix_differs_two_ranks(two):
    same_error_everywhere(two.check(P(cases.replicated_prefix_differs, 2, 1)),
                          "num_replicated_prefix: rank 0: 0; rank 1: 2")


@pytest.mark.slow  # 4 ranks: the full lane; 2 ranks keep each kind of disagreement fast
@four_ranks
@pytest.mark.parametrize("layout", [(4, 1), (2, 2)], ids=["U4", "U2xR2"])
def test_replicated_prefix_differs_one_of_four(four, layout):
    same_error_everywhere(four.check(P(cases.replicated_prefix_differs, *layout)),
                          "num_replicated_prefix: ranks 0, 1, 2: 0; rank 3: 2")


@two_ranks
def test_bad_softmax_scale(two):
    for per_rank in zip(*two.check(cases.bad_softmax_scale)):  # inf, nan, 0, -1
        same_error_everywhere(list(per_rank), "softmax_scale must be a finite float > 0")


@two_ranks
def test_meta_tensors(two):
    same_error_everywhere(two.check(cases.meta_tensors),
                          "rank 0: q, k, v are on device meta", "rank 1: q, k, v are on device meta")


@two_ranks
def test_fp64_ring_two(two):
    # fp64 kernels and an fp64 merge: a few fp64 ulps (fp32 merging gave 1e-7..5e-7).
    assert max(two.check(P(cases.fp64_ring, 1, 2))) < 1e-12


@pytest.mark.slow  # 4 ranks: the full lane; 2 ranks keep each kind of disagreement fast
@four_ranks
def test_fp64_ring_ulysses_times_ring(four):
    assert max(four.check(P(cases.fp64_ring, 2, 2))) < 1e-12


@two_ranks
def test_checks_cost_nothing_in_steady_state(two):
    for counts in two.check(cases.check_schedule):
        default, every, off = counts["None"], counts["True"], counts["False"]
        assert (default["first"], default["steady"], default["store_ops"], default["after_change"]) == (1, 0, 0, 1)
        assert (every["first"], every["steady"], every["after_change"]) == (1, 3, 1) and every["store_ops"] > 0
        assert (off["first"], off["steady"], off["store_ops"], off["after_change"]) == (0, 0, 0, 0)
        assert max(c["error"] for c in counts.values()) < 2e-5  # fp32: the changed call still computes right


@two_ranks
def test_default_checks_compile_without_graph_breaks(two):
    assert max(two.check(cases.compile_steady_state)) == 0.0  # aot_eager runs the same kernels


@two_ranks
def test_arguments_change_on_one_rank_after_first_call(two):
    """Only rank 1 enters a check; rank 0 is in the all-to-all. Both end at the timeout, naming rank 1."""
    results = two.check(cases.arguments_change_on_one_rank)
    for res in results:
        assert res["type"] == "ValueError", res
        assert cases.SHORT_TIMEOUT * 0.9 < res["seconds"] < SLOW_BOUND_S, res["seconds"]
    assert "rank 1's arguments changed since the last check (attn_mask given: False -> True)" in results[1]["message"]
    assert "rank(s) 0 did not enter the argument check" in results[1]["message"]
    assert "failed on rank 0" in results[0]["message"]
    assert "rank 1: changed its arguments alone" in results[0]["message"]
    assert "attn_mask given: True there, False here" in results[0]["message"]


@pytest.mark.slow  # 4 ranks: the full lane; 2 ranks keep each kind of disagreement fast
@four_ranks
def test_rank_that_dies_is_named(four):
    outcome = four.outcomes[case_name(cases.rank_dies)]
    assert 3 in outcome.errors and "exited" in outcome.errors[3], outcome.errors
    for rank in range(3):
        res = outcome.values[rank]
        assert res["type"] == "CollectiveError", (rank, res)
        assert res["seconds"] < REPORT_GRACE_S + 3.0, (rank, res["seconds"])  # not the 20 s timeout
        assert f"failed on rank {rank}" in res["message"], res["message"]
        assert "rank 3: no report within" in res["message"], res["message"]


@pytest.mark.xdist_group("disagreement_backward")
def test_rank_that_dies_before_backward_is_named():
    """The backward's collectives name a dead rank as the forward's do, within the report grace, not at the
    group timeout (the all-to-all's backward at U = 2 fails on the connection the dead rank held)."""
    run = run_cases(2, [cases.rank_dies_before_backward], setup=reset_usp_attn_state, timeout=120)
    outcome = run.outcomes[case_name(cases.rank_dies_before_backward)]
    assert 1 in outcome.errors and "exited" in outcome.errors[1], outcome.errors
    res = outcome.values[0]
    assert res["type"] == "CollectiveError", res
    assert res["seconds"] < REPORT_GRACE_S + 3.0, res["seconds"]
    assert "USPAttention backward" in res["message"] and "rank 1: no report within" in res["message"], res


@pytest.mark.xdist_group("disagreement_kernel")
def test_a_local_failure_inside_the_forward_is_named_on_the_peers():
    """Any exception on one rank inside the sequence-parallel forward is reported for its peers, not only a
    collective's: rank 0's timed-out all-to-all names rank 1 and what it raised."""
    run = run_cases(2, [cases.kernel_fails_on_one_rank], setup=reset_usp_attn_state, timeout=120)
    first, second = run.check(cases.kernel_fails_on_one_rank)
    assert second["type"] == "ValueError" and "the kernel refused the block" in second["message"], second
    assert first["type"] in ("ValueError", "CollectiveError") and first["seconds"] < SLOW_BOUND_S, first
    assert "failed on rank 0" in first["message"], first
    assert "rank 1: ValueError: the kernel refused the block" in first["message"], first["message"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_store_host_that_dies_is_named_with_hand_launched_ranks():
    """Ranks started by hand (env://, no torchrun agent): global rank 0 hosts the c10d store. When it exits, the
    survivor's failed collective cannot read its peers' reports; the error says so and names rank 0, at once."""
    port = _free_port()
    job = Path(__file__).with_name("store_host_job.py")
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        procs.append(subprocess.Popen([sys.executable, str(job)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in procs]
    lines = [line for line in outputs[1][0].splitlines() if line.startswith("{")]
    assert lines, outputs[1][1][-3000:]
    res = json.loads(lines[-1])
    assert res["type"] == "CollectiveError", res
    assert "store cannot be reached" in res["message"] and "global rank 0" in res["message"], res["message"]
    assert res["seconds"] < REPORT_GRACE_S + 5.0, res
