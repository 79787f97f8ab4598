"""The attention candidates the kernels part times: one entry each (tests/gpu/test_gpu_candidates.py
checks every one against an fp64 reference, tests/unit/test_benchmark_suite.py their CUDA calls on meta
tensors).

A candidate is a raw kernel or a usp_attn layer. ``cand.bind(heads, head_size, scale=, causal=)``
gives ``call(q, k, v)`` on q ``[B, S_q, H, D]`` and k, v ``[B, S_k, H, D]`` (any strides with a
contiguous last dim; the caller chooses the memory layout) returning out ``[B, S_q, H, D]``,
or ``(out, lse)`` with the LSE ``[B, H, S_q]`` fp32 when ``returns_lse``. The aten ops are the
registered operators ``usp_attn``'s ``torch_sdpa`` backend calls (each returns the log-sum-exp).

To add a candidate, write its call and append one line to :data:`CANDIDATES`, e.g.
``raw("fa4 (flash_attn.cute)", _flash_generation("flash_attn.cute", "return_lse"), False, ...)``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
from typing import Callable

import torch

from usp_attn import AttentionBackendEnum, LocalAttention, global_force_attn_backend_context_manager
from usp_attn.backends import BACKEND_CLASSES
from usp_attn.backends.sdpa import cuda_subkernel
from usp_attn.platforms import current_platform

__all__ = ["Candidate", "CANDIDATES", "raw", "layer", "by_name", "raw_kernel_of", "package_version"]

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
    # caller's k IN PLACE (its smooth_k default). Benchmarks pass k they own.
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=causal, sm_scale=scale)


def _flash_generation(module: str, lse_kwarg: str) -> Callable:
    """``module.flash_attn_func`` on ``[B, S, H, D]``: FA4 (``flash_attn.cute``, ``return_lse``), FA3
    (``flash_attn_interface``; the third-party ``fa3_fwd_interface`` alike) and FA2 (``flash_attn``)
    (``return_attn_probs``). Each returns ``(out, lse)`` when asked for the LSE, FA3 betas always."""

    def call(q, k, v, *, scale, causal, lse):
        fn = importlib.import_module(module).flash_attn_func
        kwargs = {lse_kwarg: True} if lse and lse_kwarg in inspect.signature(fn).parameters else {}
        res = fn(q, k, v, softmax_scale=scale, causal=causal, **kwargs)
        out = res[0] if isinstance(res, tuple) else res
        return (out, res[1]) if lse else out

    return call


def _needs_hopper(module: str) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        missing = _needs(module, "flash_attn_func")(device)
        if missing or torch.cuda.get_device_capability(device)[0] == 9:
            return missing
        return f"{module} runs on Hopper (SM90) only"

    return reason


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


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to compute attention (see the module doc)."""

    name: str
    bind: Callable[..., Callable]  # (heads, head_size, *, scale, causal) -> call(q, k, v)
    returns_lse: bool
    availability: Callable[[torch.device], str | None]
    exact: bool = True  # False: lossy (Sage quantises Q, K to INT8); never "the fastest exact kernel"
    layer: bool = False  # a usp_attn layer, rated against the fastest exact raw kernel (P1)
    meta_checkable: bool = False  # aten ops accept meta tensors: a CPU test checks these calls
    mutates_k: bool = False  # writes to its k argument (Sage 1's smooth_k): give it a k of its own

    def reason(self, device: torch.device | str) -> str | None:
        """Why this candidate cannot run on ``device``, or None."""
        return self.availability(torch.device(device))


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
    raw("fa4 (flash_attn.cute)", _flash_generation("flash_attn.cute", "return_lse"), False,
        _needs("flash_attn.cute", "flash_attn_func")),
    raw("fa4+lse", _flash_generation("flash_attn.cute", "return_lse"), True, _needs("flash_attn.cute", "flash_attn_func")),
    raw("fa3 (flash_attn_interface)", _flash_generation("flash_attn_interface", "return_attn_probs"), True,
        _needs_hopper("flash_attn_interface")),
    # third-party FA3 forward build (PyPI fa3-fwd): a speed reference for FA3, not a usp_attn backend
    raw("fa3-fwd (reference)", _flash_generation("fa3_fwd_interface", "return_attn_probs"), True,
        _needs_hopper("fa3_fwd_interface")),
    raw("fa2 (flash_attn)", _flash_generation("flash_attn", "return_attn_probs"), True,
        _needs("flash_attn", "flash_attn_func")),
    raw("cpu flash (aten)", _aten_op("cpu flash"), True, lambda d: None if d.type == "cpu" else "CPU-only kernel"),
    layer("LocalAttention (auto)"),
    *(layer(f"LocalAttention[{b}]", b) for b in AttentionBackendEnum),
)


def by_name(name: str) -> Candidate:
    return next(c for c in CANDIDATES if c.name == name)


#: (backend, kernel, with LSE) -> the raw candidate that is that kernel
_RAW_OF = {
    ("torch_sdpa", "cudnn"): ("cudnn", "cudnn+lse"), ("torch_sdpa", "flash"): ("flash (aten)", "flash (aten)"),
    ("torch_sdpa", "efficient"): ("efficient", "efficient+lse"), ("torch_sdpa", "cpu"): ("cpu flash (aten)",) * 2,
    ("fa", "fa4"): ("fa4 (flash_attn.cute)", "fa4+lse"), ("fa", "fa3"): ("fa3 (flash_attn_interface)",) * 2,
    ("fa", "fa2"): ("fa2 (flash_attn)",) * 2, ("sage_attn", None): ("sage1 (triton)",) * 2,
}


def raw_kernel_of(attn: LocalAttention, q, k, v, *, need_lse: bool = False) -> tuple[Candidate | None, str]:
    """The raw candidate ``attn`` runs for a plain call on these ``[B, S, H, D]`` tensors (its automatic
    choice: measured on CUDA), and a description such as ``torch_sdpa -> cudnn``."""
    sel, impl = attn.kernel_for(q, k, v, need_lse=need_lse)
    kernel = sel.kernel
    if kernel is None and sel.backend == AttentionBackendEnum.TORCH_SDPA:
        kernel = (cuda_subkernel(current_platform().capability, q.dtype, q.shape[-1], False)
                  if q.device.type == "cuda" else "cpu")
    elif kernel is None and sel.backend == AttentionBackendEnum.FA:
        kernel = type(impl).default_kernel(current_platform(), q.shape[-1])
    names = _RAW_OF.get((str(sel.backend), kernel))
    return (by_name(names[need_lse]) if names else None), f"{sel.backend} -> {kernel or 'default'} ({sel.source})"
