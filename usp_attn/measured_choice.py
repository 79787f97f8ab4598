"""Automatic kernel choice by measurement: time every exact kernel once per shape class.

Which attention kernel is fastest depends on the GPU, the library versions and the
shape: on one H200 FlashAttention 4 is 7 % faster than cuDNN attention on Flux's 4608
tokens and 19-29 % faster on 17776-118800 (BENCHMARKS.md); elsewhere the order differs.
A static rule gets such crossovers wrong somewhere, so on CUDA automatic selection measures:

1. The first call that brings a new :class:`ShapeClass` (dtype, head size, heads, kv
   heads, q/k length buckets, causal, LSE needed, gradients needed) lists the *exact*
   candidates that can serve it on every rank (FA4/FA3/FA2 generations, aten cuDNN /
   flash / memory-efficient; lossy kernels such as SageAttention never; when gradients
   are needed, only kernels with a backward there — the forward alone is timed).
2. One process times them on the call's own tensors: one warm-up call each (FA4
   compiles here), then interleaved rounds in rotating order, median per kernel, within a
   small budget; kernels 1.5x slower than the best after one round are not timed again.
   Under a sequence-parallel group that process is the group's rank 0, which broadcasts
   the winner, so every rank runs the same kernel; the shape class is then built from
   quantities every rank has identically (global lengths), never from a rank's shard.
3. The winner is cached per process (and, with a cache file, on disk, keyed by GPU,
   driver, torch, CUDA, cuDNN and kernel-package versions), so steady-state calls cost a
   dict lookup: no timing, no collective, no host sync. A cached winner is used without
   measuring, so the file is trusted only if usp_attn wrote it (a format marker), this user
   owns it, nobody else can write it and it is no link; anything else is left untouched
   and measured around. Writers lock, merge and replace the file atomically.

Measuring is skipped (the selector's static rule runs) when it is switched off
(:func:`set_kernel_choice` / ``USP_ATTN_KERNEL_CHOICE=static``), inside torch.compile
tracing or CUDA-graph capture, for masked calls, and for plain ``LocalAttention`` calls
made by the ranks of a multi-rank group (they cannot know that the other ranks measure
the same shape at the same time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import stat
import statistics
import tempfile
import time
from typing import Callable, Sequence

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

import torch
import torch.distributed as dist

from usp_attn.backends import BACKEND_CLASSES, AttentionBackendEnum, make_backend
from usp_attn.platforms import Platform
from usp_attn.logs import log_once
from usp_attn.selector import settings_changed
from usp_attn.settings import SETTINGS

__all__ = [
    "ShapeClass",
    "Candidate",
    "Measurement",
    "exact_candidates",
    "length_bucket",
    "measure",
    "choose",
    "agree_once",
    "set_kernel_choice",
    "kernel_choice_settings",
    "measuring_possible",
    "clear_measurements",
    "set_timer",
    "CudaEventTimer",
]

logger = logging.getLogger("usp_attn")

CHOICE_ENV = "USP_ATTN_KERNEL_CHOICE"  # "measure" (default) or "static"
CACHE_ENV = "USP_ATTN_KERNEL_CACHE"  # path of a JSON file that keeps measurements across runs

#: Backends whose kernels are exact (same math as the fp64 reference up to rounding).
EXACT_BACKENDS = (AttentionBackendEnum.FA, AttentionBackendEnum.TORCH_SDPA)
#: Timing budget per shape class after the warm-up calls: rounds stop once this much GPU
#: time is spent (at least MIN_ROUNDS, at most MAX_ROUNDS).
BUDGET_MS = 300.0
MIN_ROUNDS, MAX_ROUNDS = 3, 10
#: After the first round, kernels slower than this factor times the fastest are dropped.
PRUNE_FACTOR = 1.5


def length_bucket(n: int) -> int:
    """Sequence lengths that share a measurement: the next power of two >= ``n``."""
    return 1 << (max(int(n), 1) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ShapeClass:
    """What a measurement is valid for."""

    dtype: torch.dtype
    head_size: int
    heads: int
    kv_heads: int
    q_bucket: int
    k_bucket: int
    causal: bool
    need_lse: bool
    need_backward: bool = False

    @classmethod
    def of(cls, dtype, head_size, heads, kv_heads, q_len, k_len, causal, need_lse, need_backward=False
           ) -> "ShapeClass":
        return cls(dtype, int(head_size), int(heads), int(kv_heads), length_bucket(q_len), length_bucket(k_len),
                   bool(causal), bool(need_lse), bool(need_backward))

    def describe(self) -> str:
        return (f"{str(self.dtype).replace('torch.', '')} D={self.head_size} H={self.heads} H_kv={self.kv_heads} "
                f"S_q<={self.q_bucket} S_k<={self.k_bucket}" + (" causal" if self.causal else "")
                + (" lse" if self.need_lse else "") + (" backward" if self.need_backward else ""))


@dataclasses.dataclass(frozen=True)
class Candidate:
    backend: AttentionBackendEnum
    kernel: str  # unique across backends: fa4, fa3, fa2, cudnn, flash, efficient


@dataclasses.dataclass(frozen=True)
class Measurement:
    """The outcome: the winner and ``(kernel, median ms | None if it failed)``, fastest first."""

    winner: Candidate
    timings: tuple[tuple[str, float | None], ...]
    source: str  # "measured" or "cache file"


# ---- settings ------------------------------------------------------------------------------
_decided: dict[tuple, Measurement] = {}
_disk: dict | None = None


def set_kernel_choice(mode: str | None = None, cache_path: str | os.PathLike | None = None) -> None:
    """``mode``: ``"measure"`` or ``"static"`` (``None``: ``USP_ATTN_KERNEL_CHOICE``, default
    measure); ``cache_path``: JSON file keeping measurements across runs (``None``:
    ``USP_ATTN_KERNEL_CACHE``, default none)."""
    global _disk
    if mode is not None and mode not in ("measure", "static"):
        raise ValueError(f"kernel choice must be 'measure' or 'static', got {mode!r}")
    SETTINGS.kernel_choice = mode
    SETTINGS.kernel_cache = None if cache_path is None else os.fspath(cache_path)
    _disk = None
    settings_changed()  # layers cache their choices on the settings version


def kernel_choice_settings() -> tuple[str, str | None]:
    """``(mode, cache path or None)`` in effect."""
    mode = SETTINGS.kernel_choice or os.environ.get(CHOICE_ENV, "measure").strip().lower() or "measure"
    if mode not in ("measure", "static"):
        log_once(logging.WARNING, f"usp_attn: {CHOICE_ENV}={mode!r} is not 'measure' or 'static'; using 'static'")
        mode = "static"
    return mode, SETTINGS.kernel_cache or os.environ.get(CACHE_ENV) or None


def clear_measurements() -> None:
    """Forget every measurement of this process (not the cache file)."""
    global _disk
    _decided.clear()
    _disk = None
    settings_changed()


def reset() -> None:
    """Forget every measurement and put the default timer back (``usp_attn.settings.reset``)."""
    set_timer(CudaEventTimer())
    clear_measurements()


def measuring_possible(q: torch.Tensor) -> bool:
    """Whether timing kernels now is possible and meaningful (eager CUDA, not capturing)."""
    if kernel_choice_settings()[0] != "measure" or not _timer.usable(q):
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return False
    return q.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


# ---- candidates ----------------------------------------------------------------------------
def exact_candidates(
    platforms: Sequence[Platform], head_size: int, dtype: torch.dtype, *, need_lse: bool,
    allowed: Callable[[AttentionBackendEnum], bool] = lambda b: True, need_backward: bool = False,
) -> tuple[Candidate, ...]:
    """Exact kernels that can serve these properties on every platform in ``platforms``
    (with ``need_backward``: only those with a backward kernel there, for training)."""
    found = []
    for backend in EXACT_BACKENDS:
        cls = BACKEND_CLASSES[backend]
        if not allowed(backend):
            continue
        if any(cls.unsupported_reason(p, head_size, dtype, need_lse=need_lse) for p in platforms):
            continue
        common = [k for k in cls.kernels(platforms[0], head_size, dtype)
                  if all(k in cls.kernels(p, head_size, dtype) for p in platforms[1:])
                  and not (need_backward and not all(cls.supports_backward(p, k) for p in platforms))]
        found += [Candidate(backend, k) for k in common]
    return tuple(found)


# ---- timing --------------------------------------------------------------------------------
class KernelTimer:
    """How :func:`measure` times kernels; tests substitute deterministic timers that define ``time``."""

    def usable(self, q: torch.Tensor) -> bool:
        return q.device.type == "cuda"

    def warm_up(self, candidate: Candidate, call: Callable[[], object], device: torch.device) -> None:
        call()  # JIT compilation (FA4), cuDNN plan building, workspace allocation
        torch.cuda.synchronize(device)

    def time(self, candidate: Candidate, call: Callable[[], object], device: torch.device) -> float:
        """Milliseconds of one call."""
        raise NotImplementedError

    def time_round(self, pairs: Sequence[tuple[Candidate, Callable[[], object]]], device) -> list[float]:
        """Milliseconds of one call of each ``(candidate, call)``, in order."""
        return [self.time(cand, call, device) for cand, call in pairs]


class CudaEventTimer(KernelTimer):
    """GPU time of each call between CUDA events, with the GPU kept busy: in a model the host
    runs ahead of the GPU, so a kernel's launch cost is hidden there and must be here too
    (timing each call from an idle GPU adds the launch to the kernel: ~0.1 ms for FA4's
    Python launch path, which made cuDNN look faster on short sequences)."""

    def time_round(self, pairs, device) -> list[float]:
        pairs[0][1]()  # untimed: the GPU is busy while the timed calls are launched
        marks = []
        for _, call in pairs:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            marks.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in marks]


_timer = CudaEventTimer()


def set_timer(timer) -> object:
    """Replace the timer (tests); returns the previous one."""
    global _timer
    previous, _timer = _timer, timer
    return previous


def measure(
    candidates: Sequence[Candidate], platform: Platform, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    causal: bool, softmax_scale: float | None, need_lse: bool,
) -> Measurement:
    """Time each candidate on these tensors (``[B, S, H, D]``, CUDA) and pick the fastest.

    A candidate that raises is recorded with ``None`` and never wins; if all fail the
    first one's error is raised.
    """
    calls = {}
    errors = {}
    with torch.no_grad():
        for cand in candidates:
            impl = make_backend(cand.backend, platform, cand.kernel)
            call = _bind(impl, q, k, v, causal, softmax_scale, need_lse)
            try:
                _timer.warm_up(cand, call, q.device)
            except Exception as exc:  # a kernel that cannot run this shape is simply not chosen
                errors[cand] = exc
                continue
            calls[cand] = call
        if not calls:
            raise next(iter(errors.values()))
        times = {cand: [] for cand in calls}
        spent, rounds = 0.0, 0
        while rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or spent < BUDGET_MS):
            # Interleaved, and the order rotated every round: clock and thermal drift within a
            # round (a kernel after a long cool one runs at a higher boost) hit all alike.
            order = list(calls)
            order = order[rounds % len(order):] + order[: rounds % len(order)]
            for cand, ms in zip(order, _timer.time_round([(c, calls[c]) for c in order], q.device)):
                times[cand].append(ms)
                spent += ms
            if rounds == 0:  # a kernel 1.5x slower than the best cannot win: stop timing it
                best = min(ts[0] for ts in times.values())
                calls = {c: f for c, f in calls.items() if times[c][0] <= PRUNE_FACTOR * best}
            rounds += 1
    medians = {cand: statistics.median(ts) for cand, ts in times.items()}
    order = sorted(medians, key=medians.get)
    timings = tuple((c.kernel, medians[c]) for c in order) + tuple((c.kernel, None) for c in errors)
    for cand, exc in errors.items():
        log_once(logging.INFO, f"usp_attn: kernel {cand.kernel} could not run ({type(exc).__name__}: {exc}); "
                               "not chosen")
    return Measurement(order[0], timings, "measured")


def _bind(impl, q, k, v, causal, scale, need_lse):
    def call():
        return impl.forward(q, k, v, causal=causal, softmax_scale=scale, return_lse=need_lse)
    return call


# ---- deciding (once per shape class, shared by the group) ----------------------------------
def choose(
    shape: ShapeClass, candidates: Sequence[Candidate], platform: Platform, q, k, v, *,
    causal: bool, softmax_scale: float | None, group: dist.ProcessGroup | None = None,
) -> Measurement | None:
    """The measured winner for ``shape``; with ``group``, decided on its rank 0 and shared.

    Every rank of ``group`` must call this for the same ``shape`` and ``candidates`` at the
    same point (the sequence-parallel layers guarantee it); the process cache makes later
    calls free on every rank alike. ``None`` (on every rank) if the measurement failed:
    the static rule then stays, logged once.
    """
    key = (shape, tuple(candidates))
    if key in _decided:
        return _decided[key]

    def decide():
        outcome = _from_cache_file(shape, candidates, platform)
        if outcome is None:
            outcome = measure(candidates, platform, q, k, v, causal=causal, softmax_scale=softmax_scale,
                              need_lse=shape.need_lse)
            _to_cache_file(shape, candidates, platform, outcome)
        return outcome

    outcome = agree_once(key, decide, group, f"measuring attention kernels for "
                         f"{shape.describe()}", "using the static rule")
    if outcome is None:
        return None
    table = ", ".join(f"{name} {'failed' if ms is None else f'{ms:.3f} ms'}" for name, ms in outcome.timings)
    logger.info("usp_attn: measured kernel choice for %s: %s (%s; %s)", shape.describe(), outcome.winner.kernel,
                table, outcome.source)
    return outcome


def agree_once(key, decide: Callable[[], object], group: dist.ProcessGroup | None, what: str, fallback: str, *,
               everyone: bool = False):
    """``decide()``'s result, decided once per process for ``key`` on the group's rank 0 and broadcast,
    so every rank of ``group`` keeps the same value; ``None`` on every rank if it raised (logged once:
    ``what`` failed, ``fallback``). Every rank must call this for the same ``key`` at the same point.

    ``everyone``: every rank runs ``decide()`` (what it does involves the whole group, e.g. timing a
    collective), rank 0's result is kept. A rank whose run raised still joins the broadcast.
    """
    if key in _decided:
        return _decided[key]
    world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    rank = dist.get_rank(group) if world > 1 else 0
    outcome = None
    if rank == 0 or everyone:
        try:
            outcome = decide()
        except Exception as exc:  # never leave the other ranks waiting in the broadcast
            outcome = f"{type(exc).__name__}: {exc}"
    if world > 1:
        box = [outcome if rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        outcome = box[0]
    if isinstance(outcome, str):
        log_once(logging.WARNING, f"usp_attn: {what} failed ({outcome}); {fallback}")
        outcome = None
    _decided[key] = outcome
    return outcome


# ---- the cache file ------------------------------------------------------------------------
def machine_fingerprint(platform: Platform) -> str:
    """What a cached measurement depends on besides the shape (short hash)."""
    driver = None
    with contextlib.suppress(Exception):
        driver = torch._C._cuda_getDriverVersion()  # no public accessor in torch
    cudnn = None
    with contextlib.suppress(Exception):
        cudnn = torch.backends.cudnn.version()
    facts = {"device": platform.device_name, "capability": platform.capability, "driver": driver,
             "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
             "packages": list(platform.packages)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _entry_key(shape: ShapeClass, candidates) -> str:
    return shape.describe() + " | " + ",".join(c.kernel for c in candidates)


#: What marks a JSON file as a kernel cache this library wrote. A file without it (a note, a
#: binary, another program's JSON, a cache of another format version) is never used or
#: overwritten: the path may have been mistyped, or point at something precious.
CACHE_FORMAT = "usp_attn kernel cache"
CACHE_VERSION = 1
#: A cache holds a few hundred bytes per shape class; anything larger is not ours to parse.
MAX_CACHE_BYTES = 4 << 20
#: How long a writer waits for another process's write before giving up on writing (reading
#: never waits: files are replaced atomically).
LOCK_TIMEOUT_S = 10.0

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class _Refused(Exception):
    """The file at the cache path must be neither used nor written; the message says why."""

    def __init__(self, why: str, kind: str = "") -> None:
        super().__init__(why)
        self.kind = kind  # "unsafe ", "unreadable " or "": how the log message names the file


def _refuse(path: str, why: _Refused) -> None:
    log_once(logging.WARNING, f"usp_attn: ignoring {why.kind}kernel cache file {path} ({why}); it is neither "
                              "read nor written, kernels are measured without a cache file")


def _check_ownership(info: os.stat_result, what: str) -> None:
    """Refuse what another user could have planted or can still edit: a cached winner is used
    without measuring, and a write through such a file could land anywhere."""
    if not stat.S_ISREG(info.st_mode):
        raise _Refused(f"{what} is not a regular file", "unsafe ")
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is not None and info.st_uid != uid:
        raise _Refused(f"{what} is owned by uid {info.st_uid}, not by this user (uid {uid})", "unsafe ")
    if info.st_mode & 0o022:
        raise _Refused(f"{what} is writable by group or others (mode {oct(info.st_mode & 0o777)})", "unsafe ")


def _open_no_follow(path: str, flags: int, what: str, mode: int = 0o600) -> int:
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
            raise _Refused(f"{what} is a symbolic link", "unsafe ") from None
        raise


def _read_cache_file(path: str) -> dict | None:
    """The valid entries of the cache file at ``path`` as ``{fingerprint: {key: entry}}``;
    ``None`` if there is no file. Raises :class:`_Refused` for a file that is not ours."""
    try:
        fd = _open_no_follow(path, os.O_RDONLY, "it")
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)  # of what was opened: no swap between a check and the open
        _check_ownership(info, "it")
        if info.st_size > MAX_CACHE_BYTES:
            raise _Refused(f"it has {info.st_size} bytes, more than a kernel cache's limit of {MAX_CACHE_BYTES}")
        chunks, size = [], 0
        while size <= MAX_CACHE_BYTES:
            chunk = os.read(fd, MAX_CACHE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CACHE_BYTES:  # grew after the fstat
            raise _Refused(f"it has more than a kernel cache's limit of {MAX_CACHE_BYTES} bytes")
    finally:
        os.close(fd)
    try:
        doc = json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Refused(f"{exc}: not JSON, so not a usp_attn kernel cache", "unreadable ") from None
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        raise _Refused(f"it has no '\"format\": \"{CACHE_FORMAT}\"' marker: it was not written by usp_attn "
                       "(or by a release before the marker); delete it to let usp_attn write one")
    if doc.get("version") != CACHE_VERSION:
        raise _Refused(f"it is a kernel cache of format version {doc.get('version')!r}, this usp_attn "
                       f"reads version {CACHE_VERSION}")
    machines, dropped = _valid_entries(doc.get("machines"))
    if dropped:
        log_once(logging.WARNING, f"usp_attn: dropping {dropped} malformed entries of kernel cache file {path}; "
                                  "their shapes are measured again and the file is rewritten without them")
    return machines


def _valid_entries(machines) -> tuple[dict, int]:
    """``(the well-formed entries, how many were dropped)``: a malformed entry is dropped, so it
    is measured again and rewritten rather than failing every run."""
    if not isinstance(machines, dict):
        return {}, int(machines is not None)
    valid, dropped = {}, 0
    for fingerprint, entries in machines.items():
        if not isinstance(entries, dict):
            dropped += 1
            continue
        for key, entry in entries.items():
            clean = _valid_entry(entry)
            if clean is None:
                dropped += 1
            else:
                valid.setdefault(fingerprint, {})[key] = clean
    return valid, dropped


def _valid_entry(entry) -> dict | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("winner"), str):
        return None
    timings = entry.get("timings_ms", [])
    if not isinstance(timings, list):
        return None
    clean = []
    for pair in timings:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            return None
        ms = pair[1]
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms)):
            return None
        clean.append([pair[0], None if ms is None else float(ms)])
    return {"winner": entry["winner"], "timings_ms": clean}


def _document(machines: dict) -> dict:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "machines": machines}


def _load_cache_file(path: str) -> dict:
    """This process's copy of the cache document; without the format marker (``{}``) when the
    file is refused, which also keeps :func:`_to_cache_file` from writing it."""
    global _disk
    if _disk is None:
        try:
            _disk = _document(_read_cache_file(path) or {})
        except _Refused as why:
            _refuse(path, why)
            _disk = {}
        except OSError as exc:
            log_once(logging.WARNING, f"usp_attn: ignoring unreadable kernel cache file {path} ({exc}); "
                                      "kernels are measured without a cache file")
            _disk = {}
    return _disk


@contextlib.contextmanager
def _write_lock(path: str):
    """Exclusive among writers of ``path``: ``flock`` on ``path.lock`` (the cache file itself is
    replaced by every write, so a lock on it would be on a file the next writer never opens)."""
    if fcntl is None:  # no flock (Windows): concurrent writers may drop each other's entries
        yield
        return
    lock = path + ".lock"
    fd = _open_no_follow(lock, os.O_RDWR | os.O_CREAT, f"its lock file {lock}")
    try:
        _check_ownership(os.fstat(fd), f"its lock file {lock}")
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock} stayed locked for {LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace_file(path: str, doc: dict) -> None:
    """Write ``doc`` to a new file under an unpredictable name, created exclusively and without
    following links, and rename it over ``path``: a link or file planted at a guessable temporary
    name is never written through, and readers see the old or the new file, never a part."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())  # a crash must not leave an empty file, which would be refused ever after
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _from_cache_file(shape, candidates, platform) -> Measurement | None:
    path = kernel_choice_settings()[1]
    if not path:
        return None
    machines = _load_cache_file(path).get("machines", {})
    entry = machines.get(machine_fingerprint(platform), {}).get(_entry_key(shape, candidates))
    if not entry:
        return None
    by_name = {c.kernel: c for c in candidates}
    if entry["winner"] not in by_name:
        return None
    timings = tuple((n, ms) for n, ms in entry["timings_ms"])
    return Measurement(by_name[entry["winner"]], timings, "cache file")


def _to_cache_file(shape, candidates, platform, outcome: Measurement) -> None:
    global _disk
    path = kernel_choice_settings()[1]
    if not path or _load_cache_file(path).get("format") != CACHE_FORMAT:  # none, or refused
        return
    fingerprint, key = machine_fingerprint(platform), _entry_key(shape, candidates)
    entry = {"winner": outcome.winner.kernel, "timings_ms": [[n, ms] for n, ms in outcome.timings]}
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with _write_lock(path):
            # Read again under the lock: other processes may have added entries since our read.
            machines = _read_cache_file(path) or {}
            machines.setdefault(fingerprint, {})[key] = entry
            _replace_file(path, _document(machines))
    except _Refused as why:
        _refuse(path, why)
        _disk = {}
        return
    except (OSError, TimeoutError) as exc:
        log_once(logging.WARNING, f"usp_attn: could not write the kernel cache file {path} ({exc})")
        return
    _disk = _document(machines)
