"""Backward kernels of the FlashAttention generations and aiter, called the way each package
calls them itself (read from their sources; none is imported before first use).

    FA2   flash_attn.flash_attn_interface._flash_attn_backward(dout, q, k, v, out, softmax_lse,
              dq, dk, dv, dropout_p, softmax_scale, causal, <window>, softcap, alibi_slopes,
              deterministic, rng_state=None)            fills dq/dk/dv; <window> is
              window_size=(-1, -1) up to 2.6, window_size_left/right=-1 from 2.7
    FA3   flash_attn_interface._flash_attn_backward(dout, q, k, v, out, softmax_lse, ...,
              dq, dk, dv, softmax_scale, causal | is_causal, ...)   fills dq/dk/dv; the
              varlen arguments in between have no defaults in some releases
    FA4   flash_attn.cute.interface._flash_attn_bwd(q, k, v, out, dout, lse,
              softmax_scale=, causal=) -> (dq, dk, dv)
    aiter aiter.ops.mha._flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv,
              dbias, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
              bias, alibi_slopes, deterministic, ...)   fills dq/dk/dv

All take ``[B, S, H, D]``, GQA kv heads as they are (``dk``/``dv`` come back per kv head)
and the ``[B, H, S_q]`` float32 LSE their forward returned. Arguments are passed by
keyword, chosen from the function's own signature, so the releases above all work.
"""

from __future__ import annotations

import importlib
import inspect

import torch

__all__ = ["flash_backward", "aiter_backward"]

_FA_BACKWARD = {
    "fa2": ("flash_attn.flash_attn_interface", "_flash_attn_backward"),
    "fa3": ("flash_attn_interface", "_flash_attn_backward"),
    "fa4": ("flash_attn.cute.interface", "_flash_attn_bwd"),
}


def _function(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def _parameters(fn) -> dict[str, inspect.Parameter]:
    # torch.library.custom_op wraps the Python function; its own signature is (*args, **kwargs).
    return dict(inspect.signature(getattr(fn, "_init_fn", fn)).parameters)


def _buffers(*tensors):
    """Contiguous gradient buffers shaped like the inputs (the kernels write them densely)."""
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors)


def _call_filling(fn, known: dict) -> None:
    """Call a backward that writes into ``dq``/``dk``/``dv`` buffers: every parameter it has
    that we know is passed by name; parameters without a default that we do not know
    (varlen offsets, optional extras) are passed as None."""
    kwargs = {}
    for name, param in _parameters(fn).items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in known:
            kwargs[name] = known[name]
        elif param.default is inspect.Parameter.empty:
            kwargs[name] = None
    fn(**kwargs)


def flash_backward(generation, q, k, v, out, dout, lse, *, causal, scale):
    """``dq, dk, dv`` of one block from FlashAttention ``generation`` (``fa2``/``fa3``/``fa4``)."""
    fn = _function(*_FA_BACKWARD[generation])
    if generation == "fa4":
        dq, dk, dv = fn(q, k, v, out, dout, lse, softmax_scale=scale, causal=causal)[:3]
        return dq, dk, dv
    dq, dk, dv = _buffers(q, k, v)
    known = dict(
        dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv, dropout_p=0.0,
        softmax_scale=scale, causal=causal, is_causal=causal, window_size=(-1, -1), window_size_left=-1,
        window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None,
    )
    _call_filling(fn, known)
    return dq, dk, dv


def aiter_backward(q, k, v, out, dout, lse, *, causal, scale):
    """``dq, dk, dv`` of one block from aiter's FlashAttention backward (ROCm)."""
    fn = _function("aiter.ops.mha", "_flash_attn_backward")
    dq, dk, dv = _buffers(q, k, v)
    known = dict(
        dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv, dbias=None, bias=None,
        dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1,
        alibi_slopes=None, deterministic=False, rng_state=None,
    )
    _call_filling(fn, known)
    return dq, dk, dv
