"""Run test code in a real multi-process gloo group on 127.0.0.1 (CPU; no mocked collectives).

Two entry points:

    run_in_group(world_size, fn, *args, timeout=...) -> [fn's return value on rank 0, 1, ...]
        Spawn ``world_size`` processes, initialise ``torch.distributed`` with gloo in each,
        call ``fn(*args)`` once per rank and return the per-rank results. If any rank
        raises, :class:`GroupError` is raised in the parent with every failing rank's
        traceback.

    run_cases(world_size, cases, *, setup=None, timeout=...) -> GroupRun
        Spawn the group once and run many cases in it, one after another (spawning costs
        seconds; cases cost milliseconds). ``GroupRun.check(case)`` raises
        :class:`GroupError` for that case, so a module can spawn once in a module-scoped
        fixture and still report one pytest test per case::

            CASES = [case_a, case_b]

            @pytest.fixture(scope="module")
            def group():
                return run_cases(4, CASES, setup=reset_usp_attn_state)

            @pytest.mark.parametrize("case", CASES, ids=case_name)
            def test_case(group, case):
                group.check(case)

``backend="nccl"`` runs the same group with one process per GPU (rank r on GPU r): tests/gpu/multigpu.py.

Rules for ``fn`` / cases: module-level functions (or ``functools.partial`` of them) so the
spawned processes can import them; inside, use ``torch.distributed`` normally (the default
group is initialised; ``dist.get_rank()`` tells the rank); return values must be picklable.

No hangs: collectives of the default group time out after ``collective_timeout`` seconds
(so a rank that fails before a collective turns its peers' wait into an error), and the
whole run is killed after ``timeout`` seconds with a report of which rank was stuck where.
After a case fails on any rank the remaining cases are not run (the group may be out of
step); they are reported as not run, naming the case that failed.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import pickle
import queue as queue_module
import time
import traceback
from typing import Any, Callable, Sequence

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["GroupError", "GroupRun", "CaseOutcome", "case_name", "run_cases", "run_in_group", "runs_per_world"]

_HOST = "127.0.0.1"


class GroupError(AssertionError):
    """A case failed (or never finished) on at least one rank; the message holds every rank's story."""


def case_name(case: Callable) -> str:
    """A readable name for a case: the function name, with a ``partial``'s arguments."""
    if isinstance(case, functools.partial):
        args = ", ".join([repr(a) for a in case.args] + [f"{k}={v!r}" for k, v in case.keywords.items()])
        return f"{case_name(case.func)}({args})"
    return getattr(case, "__name__", repr(case))


@dataclasses.dataclass
class CaseOutcome:
    """What one case did on every rank: ``values[rank]`` on success, ``errors[rank]`` otherwise."""

    name: str
    world_size: int
    values: dict[int, Any] = dataclasses.field(default_factory=dict)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and len(self.values) == self.world_size

    def check(self) -> list[Any]:
        """Per-rank return values; raises :class:`GroupError` if any rank failed or did not finish."""
        if self.ok:
            return [self.values[r] for r in range(self.world_size)]
        missing = [r for r in range(self.world_size) if r not in self.values and r not in self.errors]
        parts = [
            f"case {self.name!r} failed on rank(s) {sorted(self.errors)} of {self.world_size}"
            + (f"; no result from rank(s) {missing}" if missing else "")
        ]
        by_text: dict[str, list[int]] = {}  # ranks with the same story are reported once
        for rank in sorted(self.errors):
            by_text.setdefault(self.errors[rank].rstrip(), []).append(rank)
        for text, ranks in by_text.items():
            label = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
            parts.append(f"--- {label} ---\n{text}")
        raise GroupError("\n".join(parts))


@dataclasses.dataclass
class GroupRun:
    """Outcomes of :func:`run_cases`, by case name (in the order the cases were given)."""

    world_size: int
    outcomes: dict[str, CaseOutcome]

    def check(self, case: Callable | str) -> list[Any]:
        """Per-rank return values of ``case``; raises :class:`GroupError` if it failed anywhere."""
        name = case if isinstance(case, str) else case_name(case)
        return self.outcomes[name].check()

    def check_all(self) -> None:
        for outcome in self.outcomes.values():
            outcome.check()


def run_in_group(world_size: int, fn: Callable, *args, timeout: float = 120.0, **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` once on each rank of a fresh gloo group; return per-rank results."""
    case = functools.partial(fn, *args, **kwargs)
    return run_cases(world_size, [case], timeout=timeout).check(case)


def runs_per_world(cases_for: Callable[[int], list], *, setup=None, timeout: float = 300.0) -> Callable:
    """``run(world)``: one spawned group per world size runs all of ``cases_for(world)`` at the first
    call, later calls return that run (spawning costs seconds, a case milliseconds)."""
    runs: dict[int, Any] = {}

    def run(world: int):
        if world not in runs:
            runs[world] = run_cases(world, cases_for(world), setup=setup, timeout=timeout)
        return runs[world]

    return run


def run_cases(
    world_size: int,
    cases: Sequence[Callable],
    *,
    setup: Callable[[], None] | None = None,
    timeout: float = 120.0,
    collective_timeout: float = 30.0,
    backend: str = "gloo",
) -> GroupRun:
    """Spawn ``world_size`` ranks once and run each case in all of them, in order.

    Args:
        world_size: number of processes (ranks 0..world_size-1).
        cases: picklable callables taking no arguments (use ``functools.partial`` for args).
        setup: called in every rank before each case (e.g. resetting global state).
        timeout: seconds for the whole run; past it the ranks are killed and reported.
        collective_timeout: timeout of the default group's collectives, in seconds.
        backend: the default group's backend: "gloo" (CPU) or "nccl" (rank r on GPU r).

    Returns:
        A :class:`GroupRun`; nothing is raised here for failing cases (use ``check``), only
        for a run that could not start.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    names = [case_name(c) for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    outcomes = {n: CaseOutcome(n, world_size) for n in names}

    # The parent owns the rendezvous store: port 0 lets the OS pick a free port, with no race.
    store = dist.TCPStore(_HOST, 0, None, True, timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, backend, store.port, list(cases), setup, messages, collective_timeout, timeout),
            name=f"usp_attn-test-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    tracker = _Tracker(names, outcomes)
    deadline = time.monotonic() + timeout
    try:
        while len(tracker.done) < world_size:
            try:
                tracker.record(messages.get(timeout=0.2))
                continue
            except queue_module.Empty:
                pass
            for rank, p in enumerate(procs):
                if rank not in tracker.done and not p.is_alive():
                    tracker.drain(messages)
                    if rank not in tracker.done:
                        tracker.lost(rank, f"exited with code {p.exitcode}")
            if time.monotonic() > deadline:
                tracker.drain(messages)
                for rank in range(world_size):
                    if rank not in tracker.done:
                        tracker.lost(rank, f"timed out after {timeout:.0f} s")
                break
    finally:
        for p in procs:  # only the processes started above
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        messages.close()
        del store

    tracker.mark_not_run()
    return GroupRun(world_size, outcomes)


class _Tracker:
    """Parent-side bookkeeping of the messages the ranks send."""

    def __init__(self, names: list[str], outcomes: dict[str, CaseOutcome]) -> None:
        self.names, self.outcomes = names, outcomes
        self.current: dict[int, str] = {}  # rank -> case it is running
        self.fatal: dict[int, str] = {}  # rank -> traceback of a failure outside any case
        self.done: set[int] = set()

    def record(self, msg) -> None:
        kind, rank = msg[0], msg[1]
        if kind == "start":
            self.current[rank] = msg[2]
        elif kind == "result":
            _, _, name, ok, payload = msg
            if ok:
                self.outcomes[name].values[rank] = pickle.loads(payload)
            else:
                self.outcomes[name].errors[rank] = payload
            self.current.pop(rank, None)
        elif kind == "fatal":  # could not join the group, or the group broke between cases
            self.fatal[rank] = msg[2]
        elif kind == "done":
            self.done.add(rank)

    def drain(self, messages) -> None:
        while True:
            try:
                self.record(messages.get(timeout=0.05))
            except queue_module.Empty:
                return

    def lost(self, rank: int, what: str) -> None:
        """Rank ``rank`` will send nothing more: charge the case it was in (or the first case)."""
        where = self.current.get(rank)
        text = f"rank {rank} {what}" + (f" while running {where!r}" if where else " outside any case")
        if rank in self.fatal:
            text += "\n" + self.fatal[rank]
        target = where or next((n for n in self.names if rank not in self.outcomes[n].values), None)
        if target is not None:
            self.outcomes[target].errors.setdefault(rank, text)
        self.done.add(rank)

    def mark_not_run(self) -> None:
        failed = next((n for n in self.names if self.outcomes[n].errors), None)
        for n in self.names:
            o = self.outcomes[n]
            for rank in range(o.world_size):
                if rank not in o.values and rank not in o.errors:
                    o.errors[rank] = (
                        f"not run: case {failed!r} failed first" if failed and failed != n else "no result"
                    )


# ---- inside each spawned rank ------------------------------------------------------------------
def _rank_main(rank, world_size, backend, port, cases, setup, messages, collective_timeout, timeout) -> None:
    import torch

    try:
        kwargs = {}
        if backend == "nccl":
            # NVLink multicast stays off: on shared hosts it can take the GPUs out of service.
            for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
                os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
            kwargs["device_id"] = torch.device("cuda", rank)
            torch.cuda.set_device(rank)
        else:
            # Several ranks share a few cores: one intra-op thread each avoids oversubscription (~3x faster).
            torch.set_num_threads(1)
        store = dist.TCPStore(_HOST, port, None, False, timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout), **kwargs)
        # A second group for the pass/fail handshake, so it never queues behind a data collective.
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    except BaseException:
        messages.put(("fatal", rank, traceback.format_exc()))
        return
    try:
        for case in cases:
            name = case_name(case)
            messages.put(("start", rank, name))
            try:
                if setup is not None:
                    setup()
                payload, ok = _picklable(case()), True
            except BaseException:
                payload, ok = traceback.format_exc(), False
            messages.put(("result", rank, name, ok, payload))
            statuses: list = [None] * world_size
            dist.all_gather_object(statuses, ok, group=control)
            if not all(statuses):
                break  # the default group may be mid-collective on some rank: stop here
        dist.barrier(group=control)
        messages.put(("done", rank))
    except BaseException:
        messages.put(("fatal", rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _picklable(value) -> bytes:
    try:
        return pickle.dumps(value)
    except Exception:  # report what we can rather than losing the result
        return pickle.dumps(repr(value))
