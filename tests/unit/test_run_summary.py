"""generate.py's summary table states the time of a steady step: a step that compiles a kernel (the first step,
and the first sparse step after the dense ones, where FlashAttention 4 compiles its block-sparse kernel) is
shown beside it and does not inflate it."""

from __future__ import annotations

import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
sys.path.insert(0, str(LAUNCH))  # the launch scripts import their siblings by name

from run_report import step_time  # noqa: E402


def test_a_compiling_sparse_step_does_not_stand_for_every_step():
    # seen on one H200: 3 dense steps, then the sparse kernel compiled at step 3 (about 4.5 s), then 5 ms steps
    times = [2.359, 0.005, 0.005, 4.500, 0.0061, 0.0061, 0.0061, 0.006, 0.0061, 0.006]
    assert step_time(times, first_sparse_step=3) == "6.1 ms median (first 2.359 s, first sparse 4.500 s)"


def test_dense_runs_and_short_runs():
    assert step_time([1.0, 0.2, 0.4, 0.3]) == "300 ms median (first 1.000 s)"
    assert step_time([1.0, 0.2, 0.4, 0.3], first_sparse_step=0) == "300 ms median (first 1.000 s)"  # all sparse
    assert step_time([0.7]) == "700 ms"
    assert step_time([2.5, 1.25, 1.5]) == "1.375 s median (first 2.500 s)"
    assert step_time([0.1, 0.00123, 0.00123]) == "1.23 ms median (first 100 ms)"  # a 1 ms step keeps its digits
    assert step_time([]) == "-"
