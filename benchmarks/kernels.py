"""The raw attention kernels the benchmarks compare ``usp_attn``'s layers against.

Every kernel takes q ``[B, S_q, H, D]`` and k, v ``[B, S_k, H, D]`` (any strides with a
contiguous last dim; the caller chooses the memory layout) and returns out
``[B, S_q, H, D]``, plus the LSE ``[B, H, S_q]`` fp32 for kernels that compute it.
The aten ops are the same registered operators ``usp_attn``'s ``torch_sdpa``
backend calls (see REFERENCE.md §4 for their signatures).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
from typing import Callable

import torch

__all__ = ["RawKernel", "RAW_KERNELS", "kernel_by_name", "package_version"]

_aten = torch.ops.aten


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name`` (never imports it), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _bhsd(*xs):
    return [x.transpose(1, 2) for x in xs]


def _lse3(lse: torch.Tensor, s_q: int) -> torch.Tensor:
    if lse.dim() == 4:  # cuDNN: [B, H, S, 1]
        lse = lse.squeeze(-1)
    return lse[..., :s_q]  # efficient pads S to a multiple of 32


def _cudnn(q, k, v, *, scale, causal, lse):
    qt, kt, vt = _bhsd(q, k, v)
    res = _aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, lse, 0.0, causal, False, scale=scale)
    out = res[0].transpose(1, 2)
    return (out, _lse3(res[1], q.shape[1])) if lse else out


def _flash(q, k, v, *, scale, causal, lse):
    qt, kt, vt = _bhsd(q, k, v)
    res = _aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)
    out = res[0].transpose(1, 2)
    return (out, _lse3(res[1], q.shape[1])) if lse else out


def _efficient(q, k, v, *, scale, causal, lse):
    qt, kt, vt = _bhsd(q, k, v)
    res = _aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, lse, 0.0, causal, scale=scale)
    out = res[0].transpose(1, 2)
    return (out, _lse3(res[1], q.shape[1])) if lse else out


def _cpu_flash(q, k, v, *, scale, causal, lse):
    qt, kt, vt = _bhsd(q, k, v)
    out, lse_t = _aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal, scale=scale)
    out = out.transpose(1, 2)
    return (out, lse_t) if lse else out


def _sage1(q, k, v, *, scale, causal, lse):
    # SageAttention 1 with its defaults: smooth_k=True subtracts K's mean from the
    # caller's k IN PLACE (REFERENCE §4). Benchmarks pass k they own.
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=causal, sm_scale=scale)


def _flash_attn(q, k, v, *, scale, causal, lse):
    if importlib.util.find_spec("flash_attn_interface") is not None and torch.cuda.get_device_capability()[0] == 9:
        fn = importlib.import_module("flash_attn_interface").flash_attn_func  # FA3
        res = fn(q, k, v, softmax_scale=scale, causal=causal)
        out = res[0] if isinstance(res, tuple) else res
        return (out, res[1]) if lse else out
    fn = importlib.import_module("flash_attn").flash_attn_func  # FA2
    res = fn(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=lse)
    return (res[0], res[1]) if lse else res


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else f"needs a CUDA GPU (inputs are on {device.type})"


def _needs_cpu(device: torch.device) -> str | None:
    return None if device.type == "cpu" else "CPU-only kernel"


def _needs_sage(device: torch.device) -> str | None:
    if importlib.util.find_spec("sageattention") is None:
        return "sageattention is not installed"
    return _needs_cuda(device)


def _needs_flash_attn(device: torch.device) -> str | None:
    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("flash_attn_interface") is None:
        return "flash-attn (flash_attn / flash_attn_interface) is not installed"
    return _needs_cuda(device)


@dataclasses.dataclass(frozen=True)
class RawKernel:
    """One raw kernel: ``call(q, k, v, scale=, causal=) -> out`` (``lse=`` as declared)."""

    name: str
    fn: Callable
    returns_lse: bool
    availability: Callable[[torch.device], str | None]
    #: aten ops accept meta tensors: the CPU dry run checks these calls' signatures
    meta_checkable: bool = False
    #: whether ``call`` writes to its k argument (Sage 1's smooth_k)
    mutates_k: bool = False

    def reason(self, device: torch.device | str) -> str | None:
        """Why this kernel cannot run on ``device``, or None."""
        return self.availability(torch.device(device))

    def call(self, q, k, v, *, scale: float, causal: bool = False):
        return self.fn(q, k, v, scale=scale, causal=causal, lse=self.returns_lse)


RAW_KERNELS: tuple[RawKernel, ...] = (
    RawKernel("cudnn", _cudnn, False, _needs_cuda, meta_checkable=True),
    RawKernel("cudnn+lse", _cudnn, True, _needs_cuda, meta_checkable=True),
    RawKernel("flash (aten)", _flash, True, _needs_cuda, meta_checkable=True),
    RawKernel("efficient", _efficient, False, _needs_cuda, meta_checkable=True),
    RawKernel("efficient+lse", _efficient, True, _needs_cuda, meta_checkable=True),
    RawKernel("sage1 (triton)", _sage1, False, _needs_sage, mutates_k=True),
    RawKernel("flash-attn", _flash_attn, True, _needs_flash_attn),
    RawKernel("cpu flash (aten)", _cpu_flash, True, _needs_cpu),
)


def kernel_by_name(name: str) -> RawKernel:
    for kernel in RAW_KERNELS:
        if kernel.name == name:
            return kernel
    raise KeyError(f"unknown raw kernel {name!r}; known: {[k.name for k in RAW_KERNELS]}")
