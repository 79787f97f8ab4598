"""Run test cases in a real multi-GPU group: one spawned process per GPU, NCCL, no torchrun.

    MULTIGPU = [...]                     # pytestmark of a module needing >= 2 GPUs
    run = run_on_gpus(CASES)             # every case once, in order, in one group
    run.check(case)                      # per-rank return values; GroupError if any rank failed

Spawning from the test (rather than running pytest under torchrun) keeps one pytest process, one
report and a clean skip where GPUs are missing; a group runs all cases of a module because its start
(CUDA contexts, NCCL communicators) costs seconds and a case milliseconds.

How many processes: every visible GPU, or the first ``USP_ATTN_TEST_GPUS`` of them
(``launch/multigpu_check.sh N``). ``USP_ATTN_MULTIGPU_CPU_RANKS=N`` runs the same cases on N CPU
processes with gloo instead: the check script's ``--cpu-dry-run`` and tests/unit run every line of
the cases that way before a GPU machine is paid for (the tolerances follow the device).

The group is tests/helpers/multiproc.py's (``run_cases`` with ``backend="nccl"``), with its case rules:
module-level functions (or partials) taking no arguments, returning picklable values; usp_attn's state is
reset before each case. After a case fails on any rank the remaining ones are not run (the group may be
out of step).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import pytest
import torch
import torch.distributed as dist

from tests.helpers.multiproc import GroupRun, run_cases
from tests.helpers.state import reset_usp_attn_state

__all__ = ["BACKEND", "WORLD", "MULTIGPU", "run_on_gpus", "device"]


def _world() -> tuple[int, str, str | None]:
    """(processes, backend, why the multigpu tests cannot run here or None)."""
    cpu_ranks = os.environ.get("USP_ATTN_MULTIGPU_CPU_RANKS")
    if cpu_ranks:
        return int(cpu_ranks), "gloo", None if int(cpu_ranks) >= 2 else "USP_ATTN_MULTIGPU_CPU_RANKS < 2"
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = int(os.environ.get("USP_ATTN_TEST_GPUS", visible))
    if world > visible:
        return world, "nccl", f"USP_ATTN_TEST_GPUS={world} but {visible} CUDA GPU(s) are visible"
    if world < 2:
        return world, "nccl", f"needs 2 or more CUDA GPUs, {visible} visible; CI has none"
    return world, "nccl", None


WORLD, BACKEND, _SKIP = _world()
MULTIGPU = [pytest.mark.multigpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


def device() -> torch.device:
    """This rank's device inside a case: its GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_on_gpus(cases: Sequence[Callable], *, world: int | None = None, backend: str | None = None,
                timeout: float = 300.0, collective_timeout: float = 120.0) -> GroupRun:
    """Spawn the group, run every case on every rank, return the outcomes (nothing raised for a failing
    case: ``GroupRun.check`` does that, so each test reports its own case)."""
    return run_cases(world or WORLD, cases, setup=reset_usp_attn_state, timeout=timeout,
                     collective_timeout=collective_timeout, backend=backend or BACKEND)
