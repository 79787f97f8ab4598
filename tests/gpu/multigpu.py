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

Case rules as in tests/helpers/multiproc.py: module-level functions (or partials) taking no
arguments, returning picklable values; usp_attn's state is reset before each case. After a case fails
on any rank the remaining ones are not run (the group may be out of step).
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_module
import time
import traceback
from typing import Callable, Sequence

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.multiproc import CaseOutcome, GroupRun, case_name

__all__ = ["BACKEND", "WORLD", "MULTIGPU", "run_on_gpus", "device"]

_HOST = "127.0.0.1"


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
    world, backend = world or WORLD, backend or BACKEND
    names = [case_name(c) for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    outcomes = {n: CaseOutcome(n, world) for n in names}
    store = dist.TCPStore(_HOST, 0, None, True, timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, name=f"usp_attn-multigpu-rank{rank}", daemon=True,
                         args=(rank, world, backend, store.port, list(cases), messages, collective_timeout, timeout))
             for rank in range(world)]
    for p in procs:
        p.start()
    current: dict[int, str] = {}  # rank -> the case it is in
    lost: dict[int, str] = {}  # rank -> how it ended without saying "done"
    done: set[int] = set()

    def record(msg) -> None:
        kind, rank, *rest = msg
        if kind == "start":
            current[rank] = rest[0]
        elif kind == "result":
            name, ok, payload = rest
            if ok:
                outcomes[name].values[rank] = pickle.loads(payload)
            else:
                outcomes[name].errors[rank] = payload
            current.pop(rank, None)
        elif kind == "fatal":  # could not join the group, or the group broke between cases
            lost[rank] = f"failed outside any case:\n{rest[0]}"
        else:
            done.add(rank)

    def drain() -> None:
        while True:
            try:
                record(messages.get(timeout=0.05))
            except queue_module.Empty:
                return

    deadline = time.monotonic() + timeout
    try:
        while len(done | set(lost)) < world:
            try:
                record(messages.get(timeout=0.2))
                continue
            except queue_module.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if r not in done and r not in lost and not p.is_alive()]
            if dead:
                drain()  # its last messages may still be in the queue
                for r in dead:
                    if r not in done:
                        lost.setdefault(r, f"exited with code {procs[r].exitcode}")
            if time.monotonic() > deadline:
                drain()
                for r in range(world):
                    if r not in done:
                        lost.setdefault(r, f"timed out after {timeout:.0f} s")
                break
    finally:
        for p in procs:  # only the processes started above
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        messages.close()
        del store
    for rank, why in lost.items():
        where = current.get(rank) or next((n for n in names if rank not in outcomes[n].values), None)
        if where is not None:
            inside = f" while running {where!r}" if rank in current else ""
            outcomes[where].errors.setdefault(rank, f"rank {rank}{inside}: {why}")
    first_failed = next((n for n in names if outcomes[n].errors), None)
    for n in names:
        for rank in range(world):
            if rank not in outcomes[n].values and rank not in outcomes[n].errors:
                outcomes[n].errors[rank] = f"not run: case {first_failed!r} failed first" if first_failed else "no result"
    return GroupRun(world, outcomes)


# ---- inside each spawned rank ------------------------------------------------------------------
def _rank_main(rank, world, backend, port, cases, messages, collective_timeout, timeout) -> None:
    from tests.helpers.state import reset_usp_attn_state

    try:
        kwargs = {}
        if backend == "nccl":
            # NVLink multicast stays off: on shared hosts it can take the GPUs out of service.
            for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
                os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
            kwargs["device_id"] = torch.device("cuda", rank)
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)  # several ranks share a few cores
        store = dist.TCPStore(_HOST, port, None, False, timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=collective_timeout), **kwargs)
        # the pass/fail handshake on a group of its own, never queued behind a data collective
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    except BaseException:
        messages.put(("fatal", rank, traceback.format_exc()))
        return
    try:
        for case in cases:
            name = case_name(case)
            messages.put(("start", rank, name))
            try:
                reset_usp_attn_state()
                payload, ok = pickle.dumps(case()), True
            except BaseException:
                payload, ok = traceback.format_exc(), False
            messages.put(("result", rank, name, ok, payload))
            statuses: list = [None] * world
            dist.all_gather_object(statuses, ok, group=control)
            if not all(statuses):
                break
        dist.barrier(group=control)
        messages.put(("done", rank))
    except BaseException:
        messages.put(("fatal", rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
