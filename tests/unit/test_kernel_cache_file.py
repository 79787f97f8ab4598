"""The measured choice's cache file (``--kernel-cache FILE``) in hostile and shared places.

The file may sit in a directory others can write (a shared /tmp, a team's scratch space) and
its winners are used without measuring, so the library must never write through a planted
link, never trust a file another user could have written, never overwrite a file it did not
write, keep every entry when processes write at the same time, and drop malformed entries
rather than fail on them every run. The attacks are simulated with this test's own uid
(links, modes, foreign content); the one case that needs a second uid runs only as root,
in a forked child that drops to ``nobody``.

Measurements come from a deterministic timer through :func:`measured_choice.choose` (the
library's own path: cache lookup, measuring, writing), with aten sub-kernel candidates that
the timer never calls.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import stat

import pytest
import torch

from usp_attn import AttentionBackendEnum as B
from usp_attn import measured_choice
from usp_attn.measured_choice import CACHE_FORMAT, CACHE_VERSION, Candidate, ShapeClass
from usp_attn.platforms import Platform

HOPPER = Platform.make("cuda", capability=(9, 0), device_name="H200")
CANDIDATES = (Candidate(B.TORCH_SDPA, "cudnn"), Candidate(B.TORCH_SDPA, "flash"), Candidate(B.TORCH_SDPA, "efficient"))
TABLE = {"cudnn": 1.0, "flash": 2.0, "efficient": 3.0}  # cudnn is the measured winner
NOBODY = 65534


class TableTimer(measured_choice.KernelTimer):
    """Each kernel "takes" its milliseconds in TABLE; nothing is called."""

    def __init__(self):
        self.timed = 0

    def usable(self, q):
        return True

    def warm_up(self, candidate, call, device):
        pass

    def time(self, candidate, call, device):
        self.timed += 1
        return TABLE[candidate.kernel]


@pytest.fixture
def timer():
    t = TableTimer()
    measured_choice.set_timer(t)
    return t  # the autouse state reset puts the real timer back


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "kernels.json"
    measured_choice.set_kernel_choice("measure", cache_path=path)
    return path


def shape(n=0):
    return ShapeClass.of(torch.bfloat16, 64, 8 + n, 8 + n, 4096, 4096, False, False)


def decide(n=0):
    q = torch.zeros(1, 1, 1, 1)
    return measured_choice.choose(shape(n), CANDIDATES, HOPPER, q, q, q, causal=False, softmax_scale=None)


def new_process():
    """Forget what this process measured and read, as a fresh process would."""
    measured_choice.clear_measurements()


def entry_key(n=0):
    return measured_choice._entry_key(shape(n), CANDIDATES)


def cache_document(entries):
    """A cache file as usp_attn writes it, holding ``{entry key: entry}`` for HOPPER."""
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION,
            "machines": {measured_choice.machine_fingerprint(HOPPER): entries}}


def edited(winner="efficient"):
    return {"winner": winner, "timings_ms": [[winner, 0.1]]}


def warnings_about(caplog, path):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]


# ---- what a normal run writes -----------------------------------------------------------------
def test_written_file_is_marked_private_to_write_and_read_back(timer, cache):
    first = decide()
    assert first.source == "measured" and first.winner.kernel == "cudnn"
    doc = json.loads(cache.read_text())
    assert (doc["format"], doc["version"]) == (CACHE_FORMAT, CACHE_VERSION)
    assert doc["machines"][measured_choice.machine_fingerprint(HOPPER)][entry_key()]["winner"] == "cudnn"
    info = os.stat(cache)
    assert stat.S_IMODE(info.st_mode) == 0o644 and info.st_uid == os.geteuid()
    lock = cache.parent / (cache.name + ".lock")
    assert stat.S_IMODE(os.stat(lock).st_mode) & 0o077 == 0
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name, lock.name]  # no temporary file left
    new_process()
    timed = timer.timed
    second = decide()
    assert second.source == "cache file" and second.winner == first.winner and timer.timed == timed


# ---- planted links and files ---------------------------------------------------------------------
@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_at_the_cache_path_is_refused(timer, cache, caplog, dangling):
    victim = cache.parent / "victim.txt"
    if not dangling:
        victim.write_text("precious")
    os.symlink(victim, cache)
    assert decide(0).source == "measured" and decide(1).source == "measured"
    assert os.path.islink(cache) and os.readlink(cache) == str(victim)
    assert (victim.read_text() == "precious") if not dangling else not victim.exists()
    (message,) = warnings_about(caplog, cache)  # once, for both shapes
    assert "symbolic link" in message and "neither read nor written" in message


def test_symlink_at_the_old_temporary_name_is_not_written_through(timer, cache):
    """Writes used to go to ``FILE.<pid>.tmp``: a link planted there redirected them."""
    victim = cache.parent / "victim.txt"
    victim.write_text("precious")
    planted = cache.parent / f"{cache.name}.{os.getpid()}.tmp"
    os.symlink(victim, planted)
    decide()
    assert victim.read_text() == "precious" and os.path.islink(planted)
    assert json.loads(cache.read_text())["format"] == CACHE_FORMAT
    assert not os.path.islink(cache) and stat.S_IMODE(os.stat(cache).st_mode) == 0o644


def test_precreated_temporary_file_does_not_become_the_cache(timer, cache):
    """A file pre-created at the old temporary name (0666) used to become the cache file, so
    its creator could edit the winner later."""
    planted = cache.parent / f"{cache.name}.{os.getpid()}.tmp"
    planted.write_text("")
    os.chmod(planted, 0o666)
    decide()
    assert planted.read_text() == "" and os.stat(cache).st_ino != os.stat(planted).st_ino
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o644


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646])
def test_cache_writable_by_others_is_not_trusted(timer, cache, caplog, mode):
    """Anyone who can write the file could have edited a winner (a slow or broken kernel)."""
    text = json.dumps(cache_document({entry_key(): edited()}))
    cache.write_text(text)
    os.chmod(cache, mode)
    outcome = decide()
    assert outcome.source == "measured" and outcome.winner.kernel == "cudnn" and timer.timed > 0
    assert cache.read_text() == text and stat.S_IMODE(os.stat(cache).st_mode) == mode
    (message,) = warnings_about(caplog, cache)
    assert "writable by group or others" in message and oct(mode) in message


def test_lock_file_symlink_is_refused(timer, cache, caplog):
    victim = cache.parent / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, cache.parent / (cache.name + ".lock"))
    assert decide().source == "measured"
    assert victim.read_text() == "precious" and not cache.exists()
    assert any("lock file" in m and "symbolic link" in m for m in warnings_about(caplog, cache))


def test_fifo_at_the_cache_path_is_refused_without_blocking(timer, cache, caplog):
    os.mkfifo(cache)
    assert decide().source == "measured"
    assert stat.S_ISFIFO(os.lstat(cache).st_mode)
    assert any("not a regular file" in m for m in warnings_about(caplog, cache))


# ---- files usp_attn did not write ------------------------------------------------------------------
FOREIGN = {
    "note": b"remember to rerun the sweep\n",
    "binary": bytes(range(256)) * 4,
    "empty": b"",
    "json object": b'{"learning_rate": 0.001}',
    "json list": b"[1, 2, 3]",
    "other format": json.dumps({"format": "something else", "machines": {}}).encode(),
    "cache of the release before the marker": json.dumps({"0123456789abcdef": {"k": edited()}}).encode(),
    "another format version": json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION + 1,
                                          "machines": {}}).encode(),
}


@pytest.mark.parametrize("kind", FOREIGN)
def test_a_file_usp_attn_did_not_write_is_never_overwritten(timer, cache, caplog, kind):
    cache.write_bytes(FOREIGN[kind])
    assert decide(0).source == "measured" and decide(1).source == "measured"
    assert cache.read_bytes() == FOREIGN[kind]
    (message,) = warnings_about(caplog, cache)
    assert "measured without a cache file" in message


def test_oversized_file_is_not_read(timer, cache, caplog):
    text = json.dumps(cache_document({entry_key(): edited()})) + " " * measured_choice.MAX_CACHE_BYTES
    cache.write_text(text)
    outcome = decide()
    assert outcome.source == "measured" and outcome.winner.kernel == "cudnn"
    assert cache.stat().st_size == len(text)
    (message,) = warnings_about(caplog, cache)
    assert "limit" in message


# ---- malformed entries of our own file ------------------------------------------------------------
def test_malformed_entries_are_dropped_and_rewritten(timer, cache, caplog):
    fingerprint = measured_choice.machine_fingerprint(HOPPER)
    doc = cache_document({
        entry_key(0): "cudnn",  # not an object: used to fail every run before measuring
        entry_key(1): edited("flash"),  # well-formed: kept and used
        entry_key(2): {"winner": "flash", "timings_ms": [["flash", "fast"]]},
        entry_key(3): {"winner": 3},
        entry_key(4): {"winner": "flash", "timings_ms": {"flash": 1.0}},
    })
    doc["machines"]["another machine"] = ["not", "an", "object"]
    cache.write_text(json.dumps(doc))
    first = decide(0)
    assert first.source == "measured" and first.winner.kernel == "cudnn"
    assert decide(1).source == "cache file" and decide(1).winner.kernel == "flash"
    (message,) = warnings_about(caplog, cache)
    assert "dropping 5 malformed entries" in message
    rewritten = json.loads(cache.read_text())["machines"]
    assert list(rewritten) == [fingerprint]
    assert sorted(rewritten[fingerprint]) == sorted([entry_key(0), entry_key(1)])
    new_process()
    caplog.clear()
    assert decide(0).source == "cache file" and decide(1).source == "cache file"
    assert warnings_about(caplog, cache) == []  # nothing left to complain about in the next run


# ---- writers at the same time ----------------------------------------------------------------------
def _writer(path, first, count, barrier):
    measured_choice.set_kernel_choice("measure", cache_path=path)
    measured_choice.set_timer(TableTimer())
    measured_choice.clear_measurements()
    barrier.wait()
    for n in range(first, first + count):
        assert decide(n).source == "measured"


def test_concurrent_writers_keep_every_entry(tmp_path):
    """Each writer re-reads the file under an exclusive lock and merges before replacing it;
    without that, 4 writers kept about 1 entry in 4."""
    path = tmp_path / "kernels.json"
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    writers, per_writer = 4, 5
    barrier = ctx.Barrier(writers)
    procs = [ctx.Process(target=_writer, args=(str(path), i * per_writer, per_writer, barrier))
             for i in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * writers
    (entries,) = json.loads(path.read_text())["machines"].values()
    assert sorted(entries) == sorted(entry_key(n) for n in range(writers * per_writer))


def test_a_writer_that_cannot_get_the_lock_measures_and_does_not_write(timer, cache, caplog, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setattr(measured_choice, "LOCK_TIMEOUT_S", 0.2)
    lock = cache.parent / (cache.name + ".lock")
    with open(lock, "w") as held:
        os.chmod(lock, 0o600)
        fcntl.flock(held, fcntl.LOCK_EX)
        assert decide().source == "measured"
    assert not cache.exists()
    assert any("stayed locked" in m for m in warnings_about(caplog, cache))


# ---- a second user -----------------------------------------------------------------------------
def _as_another_user(action) -> None:
    """Run ``action()`` in a forked child that has dropped to uid/gid ``nobody``; skip the test
    where that is impossible (not root, no fork, no setuid)."""
    if not hasattr(os, "fork") or os.geteuid() != 0:
        pytest.skip("needs root, to act as a second user in a forked child")
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = 2
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 3:
        pytest.skip("os.setuid in a forked child failed here")
    assert code == 0, f"the second user's action failed (exit {code})"


@pytest.mark.parametrize("plant", ["cache file", "symlink"])
def test_what_another_user_planted_is_refused(timer, tmp_path, caplog, plant):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: anyone may create files, only owners remove them
    path = shared / "kernels.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    text = json.dumps(cache_document({entry_key(): edited()}))

    def attacker():
        # relative to an open directory: the test's own ancestors are private to root
        if plant == "symlink":
            os.symlink(victim, path.name, dir_fd=shared_fd)
        else:
            fd = os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=shared_fd)
            os.write(fd, text.encode())
            os.fchmod(fd, 0o644)  # not writable by others: only its owner makes it suspect
            os.close(fd)

    shared_fd = os.open(shared, os.O_RDONLY)
    try:
        _as_another_user(attacker)
    finally:
        os.close(shared_fd)
    measured_choice.set_kernel_choice("measure", cache_path=path)
    outcome = decide()
    assert outcome.source == "measured" and outcome.winner.kernel == "cudnn"
    assert victim.read_text() == "precious" and os.lstat(path).st_uid == NOBODY
    (message,) = warnings_about(caplog, path)
    assert ("symbolic link" if plant == "symlink" else f"owned by uid {NOBODY}") in message
    if plant == "cache file":
        assert path.read_text() == text
