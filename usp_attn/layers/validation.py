"""Argument checks shared by the attention layers. Every message names the argument,
the value received and what would be valid, so a bad call fails clearly and locally
(before any collective in the distributed layers)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from usp_attn.backends.enum import AttentionBackendEnum, parse_attention_backend

__all__ = ["check_positive_int", "check_head_config", "check_qkv", "check_supported_backends", "check_group_device",
           "check_return_lse"]

#: Device types the attention kernels run on (ROCm tensors are "cuda" in torch).
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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


def check_return_lse(value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"return_lse must be True or False, got {value!r}")


def check_group_device(q: torch.Tensor, group) -> None:
    """q's device must be one the process group's backend moves: NCCL needs CUDA tensors,
    gloo (as used here: all-to-all, send/recv) CPU tensors."""
    backend = str(dist.get_backend(group))
    if backend == "nccl" and q.device.type != "cuda":
        raise ValueError(f"q is on {q.device}, but the sequence-parallel group uses NCCL, which needs CUDA tensors")
    if backend == "gloo" and q.device.type != "cpu":
        raise ValueError(f"q is on {q.device}, but the sequence-parallel group uses gloo, which needs CPU tensors")
