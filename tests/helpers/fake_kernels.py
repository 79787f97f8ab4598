"""Pure-torch stand-ins for the optional kernel packages (flash-attn 2/3/4, SageAttention 1/2/3,
aiter), for tests on machines that cannot run the real ones.

They are kernel stand-ins, not mocks of our code: each computes real attention with the fp64
reference (so a test checks the math of the backend wrapping it: scale, layout, LSE
correction), mimics the calling convention and side effects of the real package that
matter to us (SageAttention 1 subtracts the key mean from the caller's K *in place*), and
records every call's keyword arguments in ``module.calls``.

Install one for a test with ``monkeypatch.setitem(sys.modules, module.__name__, module)``
(see :func:`install`); ``importlib.import_module`` then returns it.
"""

from __future__ import annotations

import sys
import types

import torch

from tests.helpers.reference import reference_attention

__all__ = [
    "install",
    "fake_flash_attn2",
    "fake_flash_attn3",
    "fake_flash_attn3_beta",
    "fake_flash_attn4",
    "fake_sageattention",
    "fake_sageattn3",
    "fake_aiter",
]


def install(monkeypatch, module: types.ModuleType) -> types.ModuleType:
    """Make ``import <module.__name__>`` return ``module`` for the rest of the test."""
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.calls = []  # list of dicts: the keyword arguments of each call
    return mod


def _attend(q, k, v, scale, causal):
    """[B, S, H, D] in; out in q's dtype, lse [B, H, S_q] float32 (what the real kernels return)."""
    out, lse = reference_attention(q, k, v, scale=scale, causal=causal, return_lse=True)
    return out.to(q.dtype), lse.to(torch.float32)


def fake_flash_attn2() -> types.ModuleType:
    """``flash_attn.flash_attn_func`` (flash-attn 2.8): ``out``, or ``(out, lse, S_dmask)`` with
    ``return_attn_probs=True``."""
    mod = _module("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        mod.calls.append(dict(softmax_scale=softmax_scale, causal=causal, return_attn_probs=return_attn_probs))
        out, lse = _attend(q, k, v, softmax_scale, causal)
        return (out, lse, None) if return_attn_probs else out

    mod.flash_attn_func = flash_attn_func
    return mod


def fake_flash_attn3() -> types.ModuleType:
    """``flash_attn_interface.flash_attn_func`` of today's FA3 (flash-attention ``hopper/``;
    the third-party ``fa3_fwd_interface`` has the same signature): ``out``, or ``(out, lse)``
    with ``return_attn_probs=True``."""
    mod = _module("flash_attn_interface")

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
        mod.calls.append(dict(softmax_scale=softmax_scale, causal=causal, return_attn_probs=return_attn_probs))
        out, lse = _attend(q, k, v, softmax_scale, causal)
        return (out, lse) if return_attn_probs else out

    mod.flash_attn_func = flash_attn_func
    return mod


def fake_flash_attn3_beta() -> types.ModuleType:
    """The FA3 beta releases' ``flash_attn_interface.flash_attn_func``: no ``return_attn_probs``
    argument; always returns ``(out, lse)``."""
    mod = _module("flash_attn_interface")

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), deterministic=False):
        mod.calls.append(dict(softmax_scale=softmax_scale, causal=causal))
        return _attend(q, k, v, softmax_scale, causal)

    mod.flash_attn_func = flash_attn_func
    return mod


def fake_flash_attn4() -> types.ModuleType:
    """``flash_attn.cute.flash_attn_func`` of flash-attn-4 (4.0.0b36, interface.py): returns
    ``(out, lse)`` with ``lse`` fp32 ``[B, H, S_q]`` when ``return_lse=True``, else ``(out, None)``."""
    mod = _module("flash_attn.cute")

    def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
                        window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                        deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None, aux_tensors=None,
                        aux_scalars=None, block_sparse_tensors=None, block_sparse_tensors_bwd=None,
                        return_lse=False, gather_bwd_recompute_p=False, gather_bwd_token_chunk=None):
        mod.calls.append(dict(softmax_scale=softmax_scale, causal=causal, return_lse=return_lse))
        out, lse = _attend(q, k, v, softmax_scale, causal)
        return out, (lse if return_lse else None)

    mod.flash_attn_func = flash_attn_func
    return mod


def fake_sageattention(major: int) -> types.ModuleType:
    """``sageattention.sageattn`` of SageAttention ``major`` (1 or 2).

    v1: ``smooth_k=True`` does ``k -= k.mean(seq)`` **on the caller's tensor**; unknown
    keywords (``return_lse``) are swallowed and only ``out`` is returned.
    v2: smooths a copy; ``return_lse=True`` returns ``(out, lse)`` where lse is that of the
    keys it attended (corrected back to the true keys when it smoothed them itself).
    """
    mod = _module("sageattention")
    mod.__version__ = f"{major}.0.0"

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kw):
        mod.calls.append(dict(tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                              smooth_k=smooth_k, **kw))
        seq_dim = 1 if tensor_layout == "NHD" else 2
        to_nhd = (lambda t: t) if tensor_layout == "NHD" else (lambda t: t.transpose(1, 2))
        k_attended = k
        mean = None
        if smooth_k:
            mean = k.mean(dim=seq_dim, keepdim=True)
            if major == 1:
                k -= mean  # the in-place side effect SageAttention 1 really has
                k_attended = k
            else:
                k_attended = k - mean
        out, lse = _attend(to_nhd(q), to_nhd(k_attended), to_nhd(v), sm_scale, is_causal)
        out = out if tensor_layout == "NHD" else out.transpose(1, 2)
        if major >= 2 and kw.get("return_lse"):
            if mean is not None:  # v2 corrects its LSE for the smoothing it did
                scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
                q_nhd, m = to_nhd(q).float(), to_nhd(mean).float()[:, 0]  # m: [B, H, D]
                lse = lse + torch.einsum("bshd,bhd->bhs", q_nhd, m) * scale
            return out, lse
        return out

    mod.sageattn = sageattn
    return mod


def fake_sageattn3() -> types.ModuleType:
    """``sageattn3.sageattn3_blackwell(q, k, v, is_causal)``: [B, H, S, D], no scale argument
    (always ``D ** -0.5``), no LSE."""
    mod = _module("sageattn3")

    def sageattn3_blackwell(q, k, v, is_causal=False, **kw):
        mod.calls.append(dict(is_causal=is_causal, **kw))
        out, _ = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, is_causal)
        return out.transpose(1, 2)

    mod.sageattn3_blackwell = sageattn3_blackwell
    return mod


def fake_aiter() -> types.ModuleType:
    """``aiter.flash_attn_func``: [B, S, H, D]; ``(out, lse)`` with ``return_lse=True``."""
    mod = _module("aiter")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_lse=False, **kw):
        mod.calls.append(dict(softmax_scale=softmax_scale, causal=causal, return_lse=return_lse, **kw))
        out, lse = _attend(q, k, v, softmax_scale, causal)
        return (out, lse) if return_lse else out

    mod.flash_attn_func = flash_attn_func
    return mod
