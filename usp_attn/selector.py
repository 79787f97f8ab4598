"""Which local kernel runs: forced backend > ``--attention-backend`` > automatic choice.

Automatic choice, static rule (per platform, then per layer's dtype, head size and
number of keys per call):

    CUDA  fa   if SM80+, fp16/bf16, and a FlashAttention generation that beats cuDNN
               here is installed: FA4/FA3 on Hopper for calls of at least
               fa_min_keys_hopper(D) keys (2048 for D <= 64, else 3072; cuDNN wins
               below), FA4 on Blackwell, FA2 on SM8x.
               (FA2 on Hopper loses to cuDNN SDPA by ~1.6x: 350 vs 569 TFLOP/s measured on an H100.)
          torch_sdpa otherwise (it runs cuDNN attention on Hopper).

On CUDA the layers refine the automatic choice by measurement
(:mod:`usp_attn.measured_choice`); this static rule is what runs when measuring is off
or impossible (inside torch.compile tracing, CUDA graph capture, masked calls).
    ROCm  fa if the ROCm flash_attn build is installed, else torch_sdpa. aiter only on request.
    MPS   torch_sdpa.
    CPU   torch_sdpa.

An explicit backend that cannot serve a layer falls back along :data:`FALLBACK_CHAIN`
with one WARNING naming the reason; ``strict=True`` raises
:class:`AttentionBackendUnavailableError` instead.

In a process group, :func:`usp_attn.distributed.agreement.agree_on_backend` installs a
:class:`GroupAgreement`: then rank 0's request and platform, and the set of backends
available on *every* rank, drive this same deterministic function, so all ranks
resolve every layer identically without a per-layer collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Iterable, Iterator

import torch

from usp_attn.backends import BACKEND_CLASSES, AttentionBackend, AttentionBackendEnum, make_backend
from usp_attn.backends.enum import parse_attention_backend
from usp_attn.backends.flash import flash_generation
from usp_attn.logs import log_once
from usp_attn.platforms import Platform, PlatformKind, current_platform
from usp_attn.settings import SETTINGS

__all__ = [
    "AttentionBackendUnavailableError",
    "BackendSelection",
    "GroupAgreement",
    "FALLBACK_CHAIN",
    "auto_preference",
    "fa_min_keys_hopper",
    "get_attn_backend",
    "global_force_attn_backend",
    "global_force_attn_backend_context_manager",
    "get_global_forced_attn_backend",
    "set_cli_attention_backend",
    "get_cli_attention_backend",
    "set_group_agreement",
    "get_group_agreement",
    "set_strict_backend",
    "settings_version",
    "settings_changed",
    "clear_selection_cache",
]

logger = logging.getLogger("usp_attn")

B = AttentionBackendEnum

#: Static rule on Hopper: FA4/FA3 beat cuDNN attention from this many keys per call, by head
#: size: ``(largest head size, keys)``. Measured on H200, bf16, the calls back to back as in a
#: model (BENCHMARKS.md, "static rule"): FA4 / cuDNN time ratio D=64 (H=48) 0.45 at 1024 keys,
#: 1.11 at 2048; D=128 (H=24) 0.96 at 2048, 1.05 at 3072, 1.07-1.10 from 4096.
FA_MIN_KEYS_HOPPER: tuple[tuple[int, int], ...] = ((64, 2048), (256, 3072))


def fa_min_keys_hopper(head_size: int) -> int:
    """Keys per call from which the static rule prefers FA4/FA3 over cuDNN on Hopper."""
    return next((keys for largest, keys in FA_MIN_KEYS_HOPPER if head_size <= largest), FA_MIN_KEYS_HOPPER[-1][1])

#: Where an explicit request goes when it cannot run, in order. torch_sdpa runs everywhere.
FALLBACK_CHAIN: dict[AttentionBackendEnum, tuple[AttentionBackendEnum, ...]] = {
    B.SAGE_ATTN_3: (B.SAGE_ATTN, B.FA, B.TORCH_SDPA),
    B.SAGE_ATTN: (B.FA, B.TORCH_SDPA),
    B.AITER: (B.FA, B.TORCH_SDPA),
    B.FA: (B.TORCH_SDPA,),
    B.TORCH_SDPA: (),
}


class AttentionBackendUnavailableError(RuntimeError):
    """A backend was required (strict mode, or nothing else fits) but cannot run."""


@dataclasses.dataclass(frozen=True)
class GroupAgreement:
    """The backend decision shared by every rank of a process group (see module doc).

    Attributes:
        backend: the group-level pick (for the platform, before per-layer dtype/head size).
        requested: rank 0's explicit request, ``None`` for automatic selection.
        source: ``"forced"``, ``"cli"`` or ``"auto"``: where rank 0's request came from.
        platform: rank 0's platform; per-layer rules are evaluated against it.
        available: backends that can run on every rank.
        unavailable: ``(backend, rank, reason)`` for each other backend (first failing rank).
        world_size: number of ranks that agreed.
        platforms: every rank's platform, by group rank. Per-layer rules (head size, dtype,
            LSE) are checked against each of them too, since e.g. FA4 on one rank takes fewer
            head sizes than FA3 on rank 0; still a pure function of broadcast data.
    """

    backend: AttentionBackendEnum
    requested: AttentionBackendEnum | None
    source: str
    platform: Platform
    available: tuple[AttentionBackendEnum, ...]
    unavailable: tuple[tuple[AttentionBackendEnum, int, str], ...]
    world_size: int
    platforms: tuple[Platform, ...] = ()

    def reason_unavailable(self, backend: AttentionBackendEnum) -> str | None:
        for b, rank, reason in self.unavailable:
            if b == backend:
                return f"unavailable on rank {rank}: {reason}"
        return None


@dataclasses.dataclass(frozen=True)
class BackendSelection:
    """What :func:`get_attn_backend` decided, in machine-readable form.

    Attributes:
        backend: the backend that will run.
        requested: the explicit request (``None`` = automatic).
        source: ``"forced"``, ``"cli"``, ``"group"`` (rank 0's request) or ``"auto"``.
        platform: the platform the rules were evaluated against.
        head_size, dtype: the layer properties the choice was made for.
        rejected: ``(backend, reason)`` for every candidate passed over, in order.
        fell_back: True when an explicit request could not be honoured.
        kernel: the concrete kernel (``"fa4"``, ``"cudnn"``, ...) when one was chosen for
            this selection; ``None``: the backend's default for the head size.
        timings: ``(kernel, median ms or None if it failed)`` of the measurement that
            chose ``kernel`` (source ``"measured"``), fastest first.
        local_platform: under a group agreement, this rank's own platform, which
            :attr:`impl` binds to (e.g. FA2 here while rank 0 has FA3). Not part of
            equality, so selections compare equal across ranks.
    """

    backend: AttentionBackendEnum
    requested: AttentionBackendEnum | None
    source: str
    platform: Platform
    head_size: int | None
    dtype: torch.dtype | None
    rejected: tuple[tuple[AttentionBackendEnum, str], ...] = ()
    fell_back: bool = False
    kernel: str | None = None
    timings: tuple[tuple[str, float | None], ...] = ()
    local_platform: Platform | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def impl(self) -> AttentionBackend:
        """The kernel object to call (bound to this rank's platform)."""
        platform = self.local_platform or self.platform
        kernel = self.kernel
        if kernel is None and self.head_size is not None:
            kernel = BACKEND_CLASSES[self.backend].default_kernel(platform, self.head_size)
        return make_backend(self.backend, platform, kernel)

    def to_dict(self) -> dict:
        return {
            "backend": str(self.backend),
            "requested": str(self.requested) if self.requested else None,
            "source": self.source,
            "platform": self.platform.describe(),
            "head_size": self.head_size,
            "dtype": str(self.dtype).replace("torch.", "") if self.dtype else None,
            "rejected": [{"backend": str(b), "reason": r} for b, r in self.rejected],
            "fell_back": self.fell_back,
            "kernel": self.kernel or self.impl.kernel,
            "timings_ms": [{"kernel": k, "ms": ms} for k, ms in self.timings],
        }


# ---- process-wide settings (kept in usp_attn.settings.SETTINGS) ---------------------------
def settings_changed() -> None:
    """Tell the layers that something that can change a selection changed (they re-select)."""
    SETTINGS.changed()


def settings_version() -> int:
    """Changes whenever anything that can change a selection changes (layers cache on it)."""
    return SETTINGS.version


def global_force_attn_backend(backend: AttentionBackendEnum | str | None) -> None:
    """Force every layer resolved from now on to ``backend`` (``None`` clears). Beats the CLI."""
    SETTINGS.forced = parse_attention_backend(backend)
    SETTINGS.changed()


def get_global_forced_attn_backend() -> AttentionBackendEnum | None:
    return SETTINGS.forced


@contextlib.contextmanager
def global_force_attn_backend_context_manager(
    backend: AttentionBackendEnum | str | None,
) -> Iterator[AttentionBackendEnum | None]:
    """Force ``backend`` inside the block; the previous forced value is restored on exit.

    Takes effect even for (head size, dtype) pairs resolved before: the forced value is
    part of the selection cache key.
    """
    previous = SETTINGS.forced
    global_force_attn_backend(backend)
    try:
        yield SETTINGS.forced
    finally:
        global_force_attn_backend(previous)


def set_cli_attention_backend(backend: AttentionBackendEnum | str | None) -> None:
    """Record the ``--attention-backend`` value (normally done by :class:`AttentionConfig`)."""
    SETTINGS.cli = parse_attention_backend(backend)
    SETTINGS.changed()


def get_cli_attention_backend() -> AttentionBackendEnum | None:
    return SETTINGS.cli


def set_strict_backend(strict: bool) -> None:
    """Process default for ``strict``: an explicit backend that cannot run raises instead of falling back."""
    SETTINGS.strict = bool(strict)
    SETTINGS.changed()


def set_group_agreement(agreement: GroupAgreement | None, local_platform: Platform | None = None) -> None:
    """Install (or clear) the group's agreement; ``local_platform``: the platform this rank
    reported (kernels bind to it), default: the current platform."""
    SETTINGS.agreement = agreement
    SETTINGS.agreement_local_platform = local_platform
    # The force active now was this rank's request, already overruled by rank 0 if it differed.
    SETTINGS.forced_at_agreement = SETTINGS.forced
    SETTINGS.changed()


def get_group_agreement() -> GroupAgreement | None:
    return SETTINGS.agreement


def local_request() -> tuple[AttentionBackendEnum | None, str]:
    """This process's explicit request and where it came from (forced beats CLI)."""
    if SETTINGS.forced is not None:
        return SETTINGS.forced, "forced"
    if SETTINGS.cli is not None:
        return SETTINGS.cli, "cli"
    return None, "auto"


# ---- the rules ---------------------------------------------------------------------------
def auto_preference(
    platform: Platform, dtype: torch.dtype | None = None, num_keys: int | None = None, head_size: int = 128
) -> tuple[AttentionBackendEnum, ...]:
    """Backends the static automatic rule tries on ``platform``, best first.

    ``dtype=None``: any; ``num_keys``: keys per kernel call (``None``: long).
    """
    half = dtype is None or dtype in (torch.float16, torch.bfloat16)
    if platform.kind == PlatformKind.CUDA and half:
        gen = flash_generation(platform)
        cap = platform.capability or (0, 0)
        if gen in ("fa3", "fa4") and cap[0] == 9:
            fa_wins = num_keys is None or num_keys >= fa_min_keys_hopper(head_size)
        else:
            fa_wins = gen in ("fa3", "fa4") or (gen == "fa2" and cap[0] == 8)
        if fa_wins:
            return (B.FA, B.TORCH_SDPA)
        return (B.TORCH_SDPA, B.FA) if gen in ("fa3", "fa4") else (B.TORCH_SDPA,)
    if platform.kind == PlatformKind.ROCM and half:
        return (B.FA, B.TORCH_SDPA)
    return (B.TORCH_SDPA,)


def get_attn_backend(
    head_size: int,
    dtype: torch.dtype,
    supported_attention_backends: Iterable[AttentionBackendEnum | str] | None = None,
    *,
    platform: Platform | None = None,
    need_lse: bool = False,
    need_mask: bool = False,
    strict: bool | None = None,
    num_keys: int | None = None,
    need_block_sparse: bool = False,
) -> BackendSelection:
    """Choose the backend for a layer with this head size and (real tensor) dtype (static rules).

    Args:
        head_size: D of q/k/v.
        dtype: the dtype of the tensors the layer will see.
        supported_attention_backends: backends this layer can use (``None`` = all); members outside
            the automatic order or fallback chain are tried after it, in enum order.
        platform: evaluate against this platform instead of the current/agreed one.
        need_lse: the caller needs ``return_lse`` (ring attention).
        need_mask: the caller passes an attention mask.
        strict: raise instead of falling back from an explicit request
            (default: :func:`set_strict_backend`'s value).
        num_keys: keys per kernel call, for the automatic rule on Hopper (``None``: long).
        need_block_sparse: the caller runs a sparse pattern's kept blocks only
            (:meth:`AttentionBackend.forward_block_sparse`).

    Returns:
        A :class:`BackendSelection`; ``.backend`` is the enum, ``.impl`` the kernel.

    Raises:
        AttentionBackendUnavailableError: strict mode and the request cannot run, or
            no backend at all satisfies the layer.
    """
    supported = None
    if supported_attention_backends is not None:
        supported = frozenset(parse_attention_backend(b) for b in supported_attention_backends) - {None}
    agreement = SETTINGS.agreement
    if agreement is not None:
        if SETTINGS.forced is not None and SETTINGS.forced != SETTINGS.forced_at_agreement:
            # Forced after the agreement (e.g. the context manager around a component, entered
            # on every rank alike): honoured, still limited to what every rank can run.
            requested, source = SETTINGS.forced, "forced"
        else:
            # A request made before the agreement was this rank's vote; rank 0's request won.
            requested, source = agreement.requested, ("group" if agreement.requested else "auto")
    else:
        requested, source = local_request()
    explicit_platform = platform is not None
    if platform is None:
        platform = agreement.platform if agreement is not None else current_platform()
    long_call = None if num_keys is None else num_keys >= fa_min_keys_hopper(int(head_size))  # all the rule needs
    selection = _select(
        int(head_size), dtype, supported, platform, need_lse, need_mask,
        SETTINGS.strict if strict is None else bool(strict), requested, source, agreement, long_call,
        need_block_sparse,
    )
    if agreement is not None and not explicit_platform:
        local = SETTINGS.agreement_local_platform or current_platform()
        if local != selection.platform:
            selection = dataclasses.replace(selection, local_platform=local)
    return selection


@functools.lru_cache(maxsize=1024)
def _select(head_size, dtype, supported, platform, need_lse, need_mask, strict, requested, source, agreement,
            long_call=None, need_block_sparse=False):
    if requested is not None:
        candidates = (requested,) + FALLBACK_CHAIN[requested]
    else:
        num_keys = None if long_call in (None, True) else 0
        candidates = auto_preference(platform, dtype, num_keys, head_size)
        if B.TORCH_SDPA not in candidates:
            candidates += (B.TORCH_SDPA,)
    if supported is not None:
        # A layer that names backends outside the usual order still gets one of them.
        candidates += tuple(b for b in AttentionBackendEnum if b in supported and b not in candidates)
    rejected: list[tuple[AttentionBackendEnum, str]] = []
    chosen = None
    for cand in candidates:
        reason = _reject_reason(cand, platform, head_size, dtype, supported, need_lse, need_mask, agreement,
                                need_block_sparse)
        if reason is None:
            chosen = cand
            break
        rejected.append((cand, reason))
    fell_back = requested is not None and chosen != requested
    if chosen is None or (fell_back and strict):
        why = "; ".join(f"{b}: {r}" for b, r in rejected)
        what = f"attention backend '{requested}' cannot run" if requested else "no attention backend can run"
        raise AttentionBackendUnavailableError(
            f"{what} for head_size={head_size}, dtype={dtype} on {platform.describe()}: {why}"
        )
    selection = BackendSelection(chosen, requested, source, platform, head_size, dtype, tuple(rejected), fell_back)
    if fell_back:
        first_reason = rejected[0][1]
        # Name every step of the chain, not just the first: each one is a reason the user may fix.
        also = "; ".join(f"{b}: {r}" for b, r in rejected[1:])
        log_once(
            logging.WARNING,
            f"usp_attn: requested attention backend '{requested}' cannot run ({first_reason}); "
            f"falling back to '{chosen}'" + (f" (also passed over: {also})" if also else ""),
        )
    elif rejected:
        log_once(logging.INFO, f"usp_attn: auto-selected '{chosen}' ({'; '.join(f'{b}: {r}' for b, r in rejected)})")
    return selection


def _reject_reason(cand, platform, head_size, dtype, supported, need_lse, need_mask, agreement,
                   need_block_sparse=False) -> str | None:
    if supported is not None and cand not in supported:
        return f"{cand} is not in this layer's supported_attention_backends"
    if agreement is not None and cand not in agreement.available:
        return agreement.reason_unavailable(cand) or f"{cand} is not available on every rank"
    cls = BACKEND_CLASSES[cand]
    needs = {"need_lse": need_lse, "need_mask": need_mask, "need_block_sparse": need_block_sparse}
    reason = cls.unsupported_reason(platform, head_size, dtype, **needs)
    if reason is None and agreement is not None:
        for rank, other in enumerate(agreement.platforms):
            if other != platform:
                reason = cls.unsupported_reason(other, head_size, dtype, **needs)
                if reason is not None:
                    return f"unavailable on rank {rank}: {reason}"
    return reason


def clear_selection_cache() -> None:
    """Forget cached selections and logged messages (tests; after installing a package)."""
    _select.cache_clear()
    SETTINGS.logged.clear()
    SETTINGS.changed()
