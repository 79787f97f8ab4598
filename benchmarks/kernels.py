"""The attention candidates the kernels part times and the correctness part checks: one entry each.

A candidate is a raw kernel or a usp_attn layer. ``cand.bind(heads, head_size, scale=, causal=)``
gives ``call(q, k, v)`` on q ``[B, S_q, H, D]`` and k, v ``[B, S_k, H, D]`` (any strides with a
contiguous last dim; the caller chooses the memory layout) returning out ``[B, S_q, H, D]``,
or ``(out, lse)`` with the LSE ``[B, H, S_q]`` fp32 when ``returns_lse``. The aten ops are the
registered operators ``usp_attn``'s ``torch_sdpa`` backend calls (REFERENCE.md §4).

To add a candidate, write its call and append one line to :data:`CANDIDATES`, e.g.
``raw("fa4 (flash_attn.cute)", _fa4, True, _needs("flash_attn.cute", "flash_attn_func"))``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
from typing import Callable

import torch

from usp_attn import AttentionBackendEnum, LocalAttention, global_force_attn_backend_context_manager
from usp_attn.backends import BACKEND_CLASSES
from usp_attn.backends.sdpa import cuda_subkernel
from usp_attn.platforms import current_platform

__all__ = ["Candidate", "CANDIDATES", "raw", "layer", "by_name", "auto_raw_kernel", "package_version"]

_aten = torch.ops.aten


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name`` (never imports it), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _aten_op(op: str) -> Callable:
    """One of torch's aten attention ops on ``[B, S, H, D]`` views (the ops take ``[B, H, S, D]``);
    its LSE trimmed to ``[B, H, S_q]`` (cuDNN adds a last dim of 1, efficient pads S to a multiple of 32)."""

    def call(q, k, v, *, scale, causal, lse):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        if op == "cudnn":
            res = _aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, lse, 0.0, causal, False, scale=scale)
        elif op == "flash":
            res = _aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)
        elif op == "efficient":
            res = _aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, lse, 0.0, causal, scale=scale)
        else:
            res = _aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal, scale=scale)
        out = res[0].transpose(1, 2)
        if not lse:
            return out
        return out, (res[1].squeeze(-1) if res[1].dim() == 4 else res[1])[..., : q.shape[1]]

    return call


def _sage1(q, k, v, *, scale, causal, lse):
    # SageAttention 1 with its defaults: smooth_k=True subtracts K's mean from the
    # caller's k IN PLACE (REFERENCE §4). Benchmarks pass k they own.
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=causal, sm_scale=scale)


def _flash_attn(q, k, v, *, scale, causal, lse):
    if _needs("flash_attn_interface", "flash_attn_func")(q.device) is None and torch.cuda.get_device_capability()[0] == 9:
        fn = importlib.import_module("flash_attn_interface").flash_attn_func  # FA3
        res = fn(q, k, v, softmax_scale=scale, causal=causal)
        out = res[0] if isinstance(res, tuple) else res
        return (out, res[1]) if lse else out
    fn = importlib.import_module("flash_attn").flash_attn_func  # FA2
    res = fn(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=lse)
    return (res[0], res[1]) if lse else res


def _needs(module: str, attr: str | None = None, cuda: bool = True) -> Callable[[torch.device], str | None]:
    """Availability: ``module`` importable (and having ``attr``: a namespace package is not the
    package), and a CUDA device when ``cuda``."""

    def reason(device: torch.device) -> str | None:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if found and attr is not None:
            found = hasattr(importlib.import_module(module), attr)
        if not found:
            return f"{module}{'.' + attr if attr else ''} is not installed"
        return _needs_cuda(device) if cuda else None

    return reason


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else f"needs a CUDA GPU (inputs are on {device.type})"


def _needs_flash_attn(device: torch.device) -> str | None:
    fa2, fa3 = _needs("flash_attn", "flash_attn_func")(device), _needs("flash_attn_interface", "flash_attn_func")(device)
    return None if fa2 is None or fa3 is None else "flash-attn (flash_attn / flash_attn_interface) is not installed"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to compute attention (see the module doc)."""

    name: str
    bind: Callable[..., Callable]  # (heads, head_size, *, scale, causal) -> call(q, k, v)
    returns_lse: bool
    availability: Callable[[torch.device], str | None]
    exact: bool = True  # False: lossy (Sage quantises Q, K to INT8); never "the fastest exact kernel"
    layer: bool = False  # a usp_attn layer, rated against the fastest exact raw kernel (P1)
    meta_checkable: bool = False  # aten ops accept meta tensors: the CPU dry run checks these calls
    mutates_k: bool = False  # writes to its k argument (Sage 1's smooth_k): give it a k of its own

    def reason(self, device: torch.device | str) -> str | None:
        """Why this candidate cannot run on ``device``, or None."""
        return self.availability(torch.device(device))

    def call(self, q, k, v, *, scale: float, causal: bool = False):
        """One call on q, k, v ``[B, S, H, D]`` (builds the layer each time: for checks, not timing)."""
        return self.bind(q.shape[2], q.shape[3], scale=scale, causal=causal)(q, k, v)


def raw(name: str, fn: Callable, returns_lse: bool, availability, **kw) -> Candidate:
    """A raw kernel ``fn(q, k, v, *, scale, causal, lse)``."""

    def bind(heads, head_size, *, scale, causal):
        return functools.partial(fn, scale=scale, causal=causal, lse=returns_lse)

    return Candidate(name, bind, returns_lse, availability, **kw)


def layer(name: str, backend: AttentionBackendEnum | None = None) -> Candidate:
    """``LocalAttention`` with automatic selection (rated against the fastest exact kernel, P1) or with
    ``backend`` forced (timed and checked, like a kernel; inexact, so never "the fastest exact kernel")."""

    def bind(heads, head_size, *, scale, causal):
        attn = LocalAttention(heads, head_size, softmax_scale=scale, causal=causal)
        if backend is None:
            return attn

        def forced(q, k, v):
            with global_force_attn_backend_context_manager(backend):
                out = attn(q, k, v)
            if attn.backend != backend:  # a fallback (dtype, head size): not what this row is about
                raise RuntimeError(f"fell back to {attn.backend}")
            return out

        return forced

    def availability(device):  # platform and package; dtype and head size show as a fallback when called
        return None if backend is None else BACKEND_CLASSES[backend].machine_reason(current_platform())

    return Candidate(name, bind, False, availability, exact=False, layer=backend is None)


CANDIDATES: tuple[Candidate, ...] = (
    raw("cudnn", _aten_op("cudnn"), False, _needs_cuda, meta_checkable=True),
    raw("cudnn+lse", _aten_op("cudnn"), True, _needs_cuda, meta_checkable=True),
    raw("flash (aten)", _aten_op("flash"), True, _needs_cuda, meta_checkable=True),
    raw("efficient", _aten_op("efficient"), False, _needs_cuda, meta_checkable=True),
    raw("efficient+lse", _aten_op("efficient"), True, _needs_cuda, meta_checkable=True),
    raw("sage1 (triton)", _sage1, False, _needs("sageattention"), exact=False, mutates_k=True),
    raw("flash-attn", _flash_attn, True, _needs_flash_attn),
    raw("cpu flash (aten)", _aten_op("cpu flash"), True, lambda d: None if d.type == "cpu" else "CPU-only kernel"),
    layer("LocalAttention (auto)"),
    *(layer(f"LocalAttention[{b}]", b) for b in AttentionBackendEnum),
)


def by_name(name: str) -> Candidate:
    return next(c for c in CANDIDATES if c.name == name)


def auto_raw_kernel(device: torch.device, dtype: torch.dtype, head_size: int) -> tuple[Candidate | None, str]:
    """The raw candidate automatic selection runs for a plain call (no mask, no LSE), and a
    description such as ``torch_sdpa -> cudnn``."""
    backend = LocalAttention(1, head_size).selection(dtype).backend
    if backend == AttentionBackendEnum.TORCH_SDPA:
        if device.type == "cuda":
            sub = cuda_subkernel(current_platform().capability, dtype, head_size, False)
            name = {"cudnn": "cudnn", "flash": "flash (aten)", "efficient": "efficient"}.get(sub)
        else:
            sub, name = "cpu sdpa", "cpu flash (aten)"
        return (by_name(name) if name else None), f"torch_sdpa -> {sub}"
    name = {AttentionBackendEnum.FA: "flash-attn", AttentionBackendEnum.SAGE_ATTN: "sage1 (triton)"}.get(backend)
    return (by_name(name) if name else None), str(backend)
