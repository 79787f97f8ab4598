"""FlashAttention 4's forward launch, bound once per call signature.

``flash_attn.cute.flash_attn_func`` runs several hundred lines of Python per call (about 90 µs on an H200's
host) to decide, from the shapes, strides, dtype and device, which compiled kernel to launch and with which
arguments; for one signature the decision never changes. Once Ulysses-8 leaves each rank 3 of Flux's 24
heads the kernel runs for about 55 µs, so that Python, not the GPU, sets the pace of the call.

The first call of a signature runs the public function while watching its kernel launch; later calls
allocate the outputs as it did and launch the same compiled kernel with the same arguments, the new
tensors in place of the recorded ones. A launch is bound only when the recording proves the call was
exactly that: one launch of one compiled kernel, whose first five arguments are this call's q, k, v (not
copies), the out and lse the function returned, and whose other arguments are plain values (no tensor:
nothing else was allocated or computed for the call, such as split-KV partials, a scheduler semaphore or
block-sparse tables). Anything else, including FA4 internals not as this module knows them (4.0.0b36:
``interface._flash_attn_fwd.compile_cache[key](*args)``), keeps the signature on the public function.
Calls with tensors that require gradients always take the public function (FA4 records its autograd
context there). ``USP_ATTN_FA4_LAUNCH=public`` keeps every call on the public function (read at the first call
of each signature; ``bound``, the default, binds).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import NamedTuple

import torch

__all__ = ["launch", "bound_signatures", "clear", "binding_enabled", "LAUNCH_ENV"]

#: signatures kept; past this the table starts again (a process sees a handful of shapes)
MAX_SIGNATURES = 256
#: ``bound`` (default) or ``public``: whether FA4's launch may be bound
LAUNCH_ENV = "USP_ATTN_FA4_LAUNCH"

_PLAIN = (type(None), bool, int, float, str)
_UNKNOWN = object()
_lock = threading.Lock()
_bound: dict[tuple, "_Launch | None"] = {}


class _Launch(NamedTuple):
    kernel: object
    tail: tuple  # the recorded arguments after (q, k, v, out, lse)
    out_shape: tuple
    out_dtype: torch.dtype
    lse_shape: tuple | None


def launch(fn, q, k, v, *, softmax_scale, causal: bool, return_lse: bool):
    """``fn(q, k, v, softmax_scale=, causal=, return_lse=) -> (out, lse)`` (FA4's ``flash_attn_func``),
    through its bound launch when the signature has one. ``q [B, S_q, H, D]``, ``k, v [B, S_k, H_kv, D]``
    fp16/bf16 on one CUDA device, laid out as the kernel reads them. Returns ``(out, lse)``: ``out`` like
    ``q``, ``lse [B, H, S_q]`` fp32 or ``None`` without ``return_lse``."""
    if q.requires_grad or k.requires_grad or v.requires_grad:
        return fn(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=return_lse)
    key = (fn, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
           q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16, softmax_scale, causal, return_lse)
    bound = _bound.get(key, _UNKNOWN)
    if bound is _UNKNOWN:
        return _record(fn, key, q, k, v, softmax_scale, causal, return_lse)
    if bound is None:
        return fn(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=return_lse)
    out = torch.empty(bound.out_shape, dtype=bound.out_dtype, device=q.device)
    lse = None if bound.lse_shape is None else torch.empty(bound.lse_shape, dtype=torch.float32, device=q.device)
    bound.kernel(q, k, v, out, lse, *bound.tail)
    return out, lse


def bound_signatures() -> tuple[int, int]:
    """``(bound, kept on the public function)``: signatures seen so far (for tests and reports)."""
    entries = list(_bound.values())
    return sum(b is not None for b in entries), sum(b is None for b in entries)


def clear() -> None:
    """Forget every binding (the next call of each signature records again)."""
    _bound.clear()


class _Watching:
    """Stands in for FA4's compile cache while one call runs: every kernel it hands out reports its
    launch arguments to ``seen`` before launching."""

    def __init__(self, cache, seen: list) -> None:
        self._cache, self._seen = cache, seen

    def __contains__(self, key) -> bool:
        return key in self._cache

    def __setitem__(self, key, value) -> None:
        self._cache[key] = value

    def __getitem__(self, key):
        kernel = self._cache[key]

        def watched(*args, **kwargs):
            self._seen.append((kernel, args, kwargs))
            return kernel(*args, **kwargs)

        return watched

    def __getattr__(self, name):
        return getattr(self._cache, name)


def binding_enabled() -> bool:
    """What :data:`LAUNCH_ENV` says; any other value than ``bound``/``public`` (or unset) is an error."""
    value = os.environ.get(LAUNCH_ENV, "").strip().lower()
    if value not in ("", "bound", "public"):
        raise ValueError(f"{LAUNCH_ENV}={os.environ[LAUNCH_ENV]!r}: expected 'bound' (the default) or 'public'")
    return value != "public"


def _record(fn, key, q, k, v, softmax_scale, causal, return_lse):
    forward = getattr(sys.modules.get(getattr(fn, "__module__", "") or ""), "_flash_attn_fwd", None)
    cache = getattr(forward, "compile_cache", None) if binding_enabled() else None
    if cache is None:
        _remember(key, None)
        return fn(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=return_lse)
    seen: list = []
    with _lock:  # the compile cache is the module's: one watcher at a time
        forward.compile_cache = _Watching(cache, seen)
        try:
            out, lse = fn(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=return_lse)
        finally:
            forward.compile_cache = cache
    _remember(key, _launch_of(seen, q, k, v, out, lse))
    return out, lse


def _launch_of(seen, q, k, v, out, lse) -> _Launch | None:
    """The recorded launch if it is exactly the call (see the module doc), else None."""
    if len(seen) != 1:
        return None
    kernel, args, kwargs = seen[0]
    if kwargs or len(args) < 5 or not isinstance(out, torch.Tensor) or not out.is_contiguous():
        return None
    if not all(_same(a, t) for a, t in zip(args[:4], (q, k, v, out))):
        return None
    if lse is None:
        if args[4] is not None:
            return None
    elif not (lse.is_contiguous() and lse.dtype == torch.float32 and _same(args[4], lse)):
        return None
    tail = tuple(args[5:])
    if not all(_plain(a) for a in tail):
        return None
    return _Launch(kernel, tail, tuple(out.shape), out.dtype, None if lse is None else tuple(lse.shape))


def _same(a, t: torch.Tensor) -> bool:
    return (isinstance(a, torch.Tensor) and a.data_ptr() == t.data_ptr() and a.shape == t.shape
            and a.stride() == t.stride() and a.dtype == t.dtype)


def _plain(a) -> bool:
    if isinstance(a, (tuple, list)):  # AuxData(None, None) is a NamedTuple
        return all(_plain(x) for x in a)
    return isinstance(a, _PLAIN)


def _remember(key, bound) -> None:
    if len(_bound) >= MAX_SIGNATURES:
        _bound.clear()
    _bound[key] = bound
