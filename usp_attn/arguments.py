"""Argument checks: the one place every layer and ``init_sequence_parallel`` check what they are given.

Every message names the argument, the value received and what would be valid, so a bad call
fails clearly and locally (before any collective in the distributed layers, where the guard
then raises the same error on every rank). Mask forms are checked in :mod:`usp_attn.masks`.

Replicated rows. Row layout of one rank's tensors (``s_r`` = its shard of the sequence):

    q     [ pre | shard s_r | suf ]
    k, v  [ kv_pre | pre | shard s_r | suf | kv_suf ]

``pre``/``suf`` (``num_replicated_prefix/suffix``) are tokens replicated on every rank in q
AND k/v (text in MM-DiT joint attention): they attend and are attended. ``kv_pre``/``kv_suf``
(``num_replicated_kv_prefix/suffix``) are replicated keys/values without queries (xDiT's joint
K/V, sglang's ``num_replicated_kv_prefix``): attended by every query, no output rows. The two
kinds combine: the key/value-only rows are the outermost. Attention is a sum over keys, so the
order of replicated keys does not change the result; every replicated key is attended exactly
once (locally, never passed around the ring). Causal attention has no position for replicated
rows, so it refuses both kinds.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os

import torch
import torch.distributed as dist

from usp_attn.backends.enum import AttentionBackendEnum, parse_attention_backend

__all__ = [
    "DEFAULT_TIMEOUT",
    "VALIDATE_ENV",
    "ReplicatedRows",
    "check_bool",
    "check_flag",
    "check_group_device",
    "check_head_config",
    "check_int",
    "check_load_balance",
    "check_positive_int",
    "check_qkv",
    "check_return_lse",
    "check_seq_len",
    "check_shard_length",
    "check_zigzag_sizes",
    "check_supported_backends",
    "check_timeout",
    "validate_from_env",
]

#: Device types the attention kernels run on (ROCm tensors are "cuda" in torch).
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_int(name: str, value, *, minimum: int = 1) -> int:
    """An exact int (``True`` is not 1) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def check_positive_int(name: str, value) -> int:
    return check_int(name, value, minimum=1)


def check_supported_backends(value) -> tuple[AttentionBackendEnum, ...] | None:
    """``supported_attention_backends``: ``None`` (all) or an iterable of members/names.

    Names are parsed now, so a typo fails when the layer is built, not at its first call.
    """
    if value is None:
        return None
    if isinstance(value, (str, AttentionBackendEnum)):
        raise TypeError(
            f"supported_attention_backends must be an iterable of backends (e.g. ['fa', 'torch_sdpa']) "
            f"or None, got the single value {value!r}"
        )
    parsed = tuple(parse_attention_backend(b) for b in value)
    if any(b is None for b in parsed):
        raise ValueError(
            f"supported_attention_backends lists backends a layer may use; 'auto'/None/'' is not one, "
            f"got {list(value)!r}"
        )
    if not parsed:
        raise ValueError("supported_attention_backends must not be empty (use None for all backends)")
    return parsed


def check_head_config(num_heads, head_size, num_kv_heads, softmax_scale) -> tuple[int, int, int, float]:
    """Validate the constructor arguments shared by all layers; returns normalised values."""
    num_heads = check_positive_int("num_heads", num_heads)
    head_size = check_positive_int("head_size", head_size)
    num_kv_heads = num_heads if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}) for GQA/MQA"
        )
    if softmax_scale is None:
        softmax_scale = head_size**-0.5
    elif (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
          or not math.isfinite(softmax_scale) or not softmax_scale > 0):
        # inf or nan would turn every output row into NaN.
        raise ValueError(f"softmax_scale must be a finite float > 0 or None, got {softmax_scale!r}")
    return num_heads, head_size, num_kv_heads, float(softmax_scale)


def check_qkv(q, k, v, *, num_heads: int, num_kv_heads: int, head_size: int, causal: bool) -> None:
    """q ``[B, S_q, H, D]``, k/v ``[B, S_k, H_kv, D]``: same dtype (floating) and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, S, H, D], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if q.device.type not in SUPPORTED_DEVICE_TYPES:
        hint = " (meta tensors have no data to attend)" if q.device.type == "meta" else ""
        raise ValueError(
            f"q, k, v are on device {q.device}{hint}; attention runs on {', '.join(SUPPORTED_DEVICE_TYPES)} tensors"
        )
    if q.shape[2] != num_heads or q.shape[3] != head_size:
        raise ValueError(
            f"q has shape {list(q.shape)}; expected [B, S_q, {num_heads}, {head_size}] "
            f"(num_heads={num_heads}, head_size={head_size})"
        )
    for name, t in (("k", k), ("v", v)):
        if t.shape[2] != num_kv_heads or t.shape[3] != head_size:
            raise ValueError(
                f"{name} has shape {list(t.shape)}; expected [B, S_k, {num_kv_heads}, {head_size}] "
                f"(num_kv_heads={num_kv_heads}, head_size={head_size})"
            )
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} has batch size {t.shape[0]} but q has {q.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same sequence length, got {k.shape[1]} and {v.shape[1]}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"causal=True needs S_q == S_k, got S_q={q.shape[1]}, S_k={k.shape[1]} "
            "(the diagonal alignment of a rectangular causal mask is ambiguous)"
        )


def check_bool(name: str, value) -> bool:
    """``True`` or ``False`` exactly (not 0/1, not None)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_return_lse(value) -> None:
    check_bool("return_lse", value)


def check_seq_len(value) -> int | None:
    """``seq_len``: the global length of the sharded part, or None."""
    return None if value is None else check_int("seq_len", value, minimum=0)


def check_shard_length(state, total: int, balanced: bool, local_len: int, q_rows: int, rows) -> tuple[int, ...]:
    """Every SP rank's shard length for ``seq_len=total``; raises unless this rank's is ``local_len``."""
    sizes = state.sizes(total, balanced)
    if sizes[state.sp_rank] != local_len:
        layout = "zigzag (load_balance=True)" if balanced else "contiguous"
        raise ValueError(
            f"the local sequence shard has {local_len} tokens (q length {q_rows} minus {rows.prefix}+{rows.suffix} "
            f"replicated), but seq_len={total} over {state.world_size} ranks in the {layout} layout gives shards "
            f"{list(sizes)}; pass the global seq_len= (and load_balance=) or shard with usp_attn.shard_sequence"
        )
    return sizes


def check_zigzag_sizes(state, sizes: tuple[int, ...]) -> None:
    """``load_balance=True`` needs the ranks' shard lengths to be the zigzag layout of their sum."""
    expected = state.sizes(sum(sizes), True)
    if tuple(sizes) != expected:
        raise ValueError(
            f"load_balance=True, but the ranks' shard lengths {list(sizes)} are not the zigzag layout of "
            f"{sum(sizes)} tokens ({list(expected)}); shard with usp_attn.shard_sequence(x, load_balance=True)"
        )


def check_load_balance(value, *, none_means: str = "the layout recorded on the state") -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"load_balance must be True, False or None ({none_means}), got {value!r}")
    return value


def check_group_device(q: torch.Tensor, group) -> None:
    """q's device must be one the process group's backend moves: NCCL needs CUDA tensors,
    gloo (as used here: all-to-all, send/recv) CPU tensors."""
    backend = str(dist.get_backend(group))
    if backend == "nccl" and q.device.type != "cuda":
        raise ValueError(f"q is on {q.device}, but the sequence-parallel group uses NCCL, which needs CUDA tensors")
    if backend == "gloo" and q.device.type != "cpu":
        raise ValueError(f"q is on {q.device}, but the sequence-parallel group uses gloo, which needs CPU tensors")


# ---- init_sequence_parallel ----------------------------------------------------------------

#: Default of ``validate``: unset = check each layer's first call and every call whose
#: arguments changed; 1 = check every call; 0 = never (see usp_attn.distributed.guard).
VALIDATE_ENV = "USP_ATTN_VALIDATE"

#: Bound on every collective of the SP groups. Inference ranks run the same kernels in
#: lockstep, so a healthy peer is late by at most one layer's work plus first-call
#: compilation skew (seconds to a minute); 5 minutes still allows for that and for
#: uneven model loading before the first collective, and ends a job with a dead or
#: stuck rank well before torch's 10-minute NCCL / 30-minute gloo defaults would.
DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)


def check_timeout(value) -> datetime.timedelta:
    """``timeout``: ``None`` (:data:`DEFAULT_TIMEOUT`), positive finite seconds, or a positive timedelta."""
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, datetime.timedelta):
        if value <= datetime.timedelta(0):
            raise ValueError(f"timeout must be positive, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"timeout must be a number of seconds or a datetime.timedelta, got {type(value).__name__} {value!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {value!r}")
    try:
        return datetime.timedelta(seconds=value)
    except OverflowError:
        raise ValueError(f"timeout of {value!r} seconds is too large for a datetime.timedelta") from None


def check_flag(name: str, value) -> bool | None:
    """``strict`` / ``validate``: ``True``, ``False`` or ``None``."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or None, got {type(value).__name__} {value!r}")
    return value


def validate_from_env() -> bool | None:
    """The ``validate`` default from ``USP_ATTN_VALIDATE``: unset = None, 1 = True, 0 = False."""
    text = os.environ.get(VALIDATE_ENV, "").strip().lower()
    if text in ("", "auto", "default"):
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {VALIDATE_ENV}={text!r}: expected 1 (every call), 0 (off) or unset")


# ---- replicated rows -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReplicatedRows:
    """The replicated rows of one call: tokens identical on every rank (text), kept out of the
    sequence-parallel exchange and counted once (see the module doc for the row layout).

    Attributes:
        prefix, suffix: rows before / after the shard in q AND k/v (they attend and are attended).
        kv_prefix, kv_suffix: rows in k/v only (attended, no output rows), outermost.

    Pass one as ``USPAttention(...)(q, k, v, replicated=ReplicatedRows(prefix=512))``, or the same
    counts as the integer keywords ``num_replicated_prefix=...`` (shorthand).
    """

    prefix: int = 0
    suffix: int = 0
    kv_prefix: int = 0
    kv_suffix: int = 0

    @classmethod
    def of(cls, rows: "ReplicatedRows | None", prefix=0, suffix=0, kv_prefix=0, kv_suffix=0) -> "ReplicatedRows":
        """``rows`` if given (then the integer keywords must be 0), else one made of the counts."""
        if rows is None:
            return cls(prefix, suffix, kv_prefix, kv_suffix)
        if not isinstance(rows, cls):
            raise TypeError(f"replicated must be a usp_attn.ReplicatedRows or None, got {type(rows).__name__}")
        if prefix or suffix or kv_prefix or kv_suffix:
            raise ValueError("pass the replicated rows once: replicated=ReplicatedRows(...) or the "
                             "num_replicated_* keywords, not both")
        return rows

    @property
    def any(self) -> bool:
        return bool(self.prefix or self.suffix or self.kv_prefix or self.kv_suffix)

    @property
    def key_prefix(self) -> int:
        """k's rows before the shard."""
        return self.kv_prefix + self.prefix

    @property
    def key_suffix(self) -> int:
        """k's rows after the shard."""
        return self.suffix + self.kv_suffix

    def check_counts(self, causal: bool) -> None:
        names = ("num_replicated_prefix", "num_replicated_suffix", "num_replicated_kv_prefix",
                 "num_replicated_kv_suffix")
        # not dataclasses.astuple: it deep-copies, and this runs on every sequence-parallel call
        for name, n in zip(names, (self.prefix, self.suffix, self.kv_prefix, self.kv_suffix)):
            check_int(name, n, minimum=0)
        if causal and self.any:
            raise ValueError(
                "causal=True cannot be combined with replicated tokens (num_replicated_prefix/suffix, "
                "num_replicated_kv_prefix/suffix): they have no position in the causal order"
            )

    def check_rows(self, q_rows: int, k_rows: int | None, causal: bool) -> int:
        """Check the counts against q's and k's row counts (``k_rows=None``: k/v are complete, as
        in cross-attention); returns the shard length ``s_r``."""
        self.check_counts(causal)
        if self.prefix + self.suffix > q_rows:
            raise ValueError(
                f"num_replicated_prefix + num_replicated_suffix = {self.prefix + self.suffix} exceeds the local "
                f"sequence length {q_rows}"
            )
        shard = q_rows - self.prefix - self.suffix
        if k_rows is None:
            return shard
        expected = self.key_prefix + shard + self.key_suffix
        if k_rows != expected:
            if self.kv_prefix or self.kv_suffix:
                raise ValueError(
                    f"k/v have {k_rows} rows, but q's {q_rows} rows plus num_replicated_kv_prefix="
                    f"{self.kv_prefix} and num_replicated_kv_suffix={self.kv_suffix} make {expected}: k/v are "
                    "[kv_prefix | replicated prefix | shard | replicated suffix | kv_suffix], q the same without "
                    "the kv-only rows"
                )
            raise ValueError(
                f"q and k/v shards must have the same length under sequence parallelism, got {q_rows} and "
                f"{k_rows}; for replicated keys without queries pass num_replicated_kv_prefix/suffix, for "
                "cross-attention with full k/v use skip_sequence_parallel=True"
            )
        return shard
