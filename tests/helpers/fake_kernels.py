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
import typing

import torch

from tests.helpers.reference import reference_attention

__all__ = [
    "install",
    "check_kernel_layout",
    "fake_flash_attn2",
    "fake_flash_attn3",
    "fake_flash_attn3_beta",
    "fake_flash_attn4",
    "fake_sageattention",
    "fake_sageattn3",
    "fake_aiter",
    "fake_flash_attn2_backward",
    "add_flash_attn3_backward",
    "fake_flash_attn4_backward",
    "fake_aiter_backward",
]


def install(monkeypatch, module: types.ModuleType) -> types.ModuleType:
    """Make ``import <module.__name__>`` return ``module`` for the rest of the test."""
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.calls = []  # list of dicts: the keyword arguments of each call
    return mod


def check_kernel_layout(**tensors) -> None:
    """What the real kernels need of their inputs' memory and do not check themselves: a
    unit-stride last dimension (FA2/FA4 read it as such; aten's CUDA ops raise) and 16-byte
    aligned pointers and strides (FA4's ``assumed_align=16``, the 128-bit loads of all of them)."""
    for name, t in tensors.items():
        assert t.stride(-1) == 1, f"{name}: the last dimension must be contiguous, strides {t.stride()}"
        step = 16 // t.element_size()
        if t.shape[-1] % step == 0:  # else the kernels refuse the head size anyway
            strides = [s for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1]
            aligned = t.data_ptr() % 16 == 0 and all(s % step == 0 for s in strides)
            assert aligned, f"{name}: not 16-byte aligned (pointer {t.data_ptr()}, strides {t.stride()})"


def _attend(q, k, v, scale, causal):
    """[B, S, H, D] in; out in q's dtype, lse [B, H, S_q] float32 (what the real kernels return)."""
    check_kernel_layout(q=q, k=k, v=v)
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


def fake_flash_attn4(launch_path: str | None = None) -> types.ModuleType:
    """``flash_attn.cute.flash_attn_func`` of flash-attn-4 (4.0.0b36, interface.py): returns
    ``(out, lse)`` with ``lse`` fp32 ``[B, H, S_q]`` when ``return_lse=True``, else ``(out, None)``.

    ``launch_path``: also the way the real function gets to its kernel, for the launch binding
    (``usp_attn.backends.flash_bind``): ``flash_attn_func`` lives in ``flash_attn.cute.interface``
    (``module.interface``; install both) and calls ``_flash_attn_fwd``, which allocates
    ``out`` (and ``lse`` when asked for or under autograd), looks the compiled kernel up in
    ``_flash_attn_fwd.compile_cache`` by a key of what it depends on, and launches it as the SM90
    path does: ``kernel(q, k, v, out, lse, softmax_scale, cu_seqlens_q, cu_seqlens_k, seqused_q,
    seqused_k, page_table, window_size_left, window_size_right, learnable_sink, block_sparse,
    AuxData(aux_tensors, aux_scalars), cu_total_m_blocks, cu_total_splits_m_blocks)``. ``"sm90"`` is
    that path; ``"split"`` launches into fp32 partials and combines them afterwards (FA4's split-KV);
    ``"semaphore"`` passes a per-call scheduler tensor among the arguments. ``interface.launches``
    counts the kernel launches, ``interface.compiles`` the kernels compiled."""
    mod = _module("flash_attn.cute")
    if launch_path is not None:
        return _with_launch_path(mod, launch_path)

    def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
                        window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                        deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None, aux_tensors=None,
                        aux_scalars=None, block_sparse_tensors=None, block_sparse_tensors_bwd=None,
                        return_lse=False, gather_bwd_recompute_p=False, gather_bwd_token_chunk=None):
        mod.calls.append(dict(softmax_scale=softmax_scale, causal=causal, return_lse=return_lse,
                              block_sparse=block_sparse_tensors is not None, mask_mod=mask_mod is not None))
        if block_sparse_tensors is not None:
            out, lse = _block_sparse_attend(q, k, v, softmax_scale, block_sparse_tensors, mask_mod, aux_tensors)
        else:
            out, lse = _attend(q, k, v, softmax_scale, causal)
        return out, (lse if return_lse else None)

    mod.flash_attn_func = flash_attn_func
    sparsity = _module("flash_attn.cute.block_sparsity")
    sparsity.BlockSparseTensorsTorch = BlockSparseTensorsTorch
    mod.block_sparsity = sparsity
    return mod


class AuxData(typing.NamedTuple):
    """flash-attn-4's ``flash_attn.cute.utils.AuxData`` (4.0.0b36)."""

    tensors: tuple | list | None = None
    scalars: tuple | None = None


def _with_launch_path(mod: types.ModuleType, path: str) -> types.ModuleType:
    interface = _module("flash_attn.cute.interface")
    interface.launches = 0
    interface.compiles = 0

    def compile_kernel(causal: bool):
        def kernel(q, k, v, out, lse, softmax_scale, *rest):  # what is compiled in stays out of the arguments
            interface.launches += 1
            assert len(rest) == 12 and all(a is None for a in rest[:9]) and rest[9] == AuxData(None, None), rest
            assert rest[10] is None or path == "semaphore"
            o, l_ = _attend(q, k, v, softmax_scale, causal)
            out.copy_(o.to(out.dtype))
            if lse is not None:
                lse.copy_(l_)

        interface.compiles += 1
        return kernel

    def _flash_attn_fwd(q, k, v, softmax_scale=None, causal=False, return_lse=False):
        b, s, h, _ = q.shape
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        grad = any(t.requires_grad for t in (q, k, v))
        out = torch.empty(b, s, h, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device) if return_lse or grad else None
        key = (q.dtype, q.shape[-1], causal, lse is None)
        if key not in _flash_attn_fwd.compile_cache:
            _flash_attn_fwd.compile_cache[key] = compile_kernel(causal)
        target = torch.empty(out.shape, dtype=torch.float32, device=q.device) if path == "split" else out
        semaphore = torch.zeros(1, dtype=torch.int32, device=q.device) if path == "semaphore" else None
        _flash_attn_fwd.compile_cache[key](q.detach(), k.detach(), v.detach(), target, lse, scale, None, None, None,
                                           None, None, None, None, None, None, AuxData(None, None), semaphore, None)
        if path == "split":
            out.copy_(target)
        return out, lse

    _flash_attn_fwd.compile_cache = {}

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False, **unused):
        mod.calls.append(dict(softmax_scale=softmax_scale, causal=causal, return_lse=return_lse, block_sparse=False,
                              mask_mod=False))
        return _flash_attn_fwd(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=return_lse)

    flash_attn_func.__module__ = interface.__name__
    interface._flash_attn_fwd, interface.flash_attn_func = _flash_attn_fwd, flash_attn_func
    mod.flash_attn_func, mod.interface = flash_attn_func, interface
    return mod


class BlockSparseTensorsTorch(typing.NamedTuple):
    """flash-attn-4's ``flash_attn.cute.block_sparsity.BlockSparseTensorsTorch`` (4.0.0b36): the same fields."""

    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor | None = None
    full_block_idx: torch.Tensor | None = None
    cu_total_m_blocks: torch.Tensor | None = None
    cu_block_idx_offsets: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None
    dq_write_order: torch.Tensor | None = None
    dq_write_order_full: torch.Tensor | None = None
    spt: bool | None = None


def _block_sparse_attend(q, k, v, scale, blocks, mask_mod, aux_tensors):
    """What FA4 computes with block sparsity: only the listed key blocks of each query block; the
    full blocks whole, the mask blocks through ``mask_mod``. The stand-in cannot run a CuTe mask
    function, so it evaluates the one usp_attn passes by its documented meaning: aux tensors
    ``(q_tile [>= S_q], k_tile [>= S_k], table [H, T, T])``, keep iff ``table[h, q_tile[m], k_tile[n]]``."""
    check_kernel_layout(q=q, k=k, v=v)
    b, s_q, h, _ = q.shape
    s_k = k.shape[1]
    bq, bk = blocks.block_size
    for name in ("mask_block_cnt", "mask_block_idx", "full_block_cnt", "full_block_idx"):
        t = getattr(blocks, name)
        assert t.dtype == torch.int32 and t.shape[0] == b and t.shape[1] in (1, h), (name, t.shape, t.dtype)
    keep = torch.zeros(b, h, s_q, s_k, dtype=torch.bool)
    for kind, cnt, idx in (("full", blocks.full_block_cnt, blocks.full_block_idx),
                           ("mask", blocks.mask_block_cnt, blocks.mask_block_idx)):
        if kind == "mask" and int(cnt.sum()) and mask_mod is None:
            raise AssertionError("mask blocks without a mask_mod")
        for bi in range(b):
            for hi in range(h):
                hh = hi if cnt.shape[1] > 1 else 0
                for m in range(cnt.shape[2]):
                    rows = slice(m * bq, min(s_q, (m + 1) * bq))
                    for n in idx[bi, hh, m, : int(cnt[bi, hh, m])].tolist():
                        cols = slice(n * bk, min(s_k, (n + 1) * bk))
                        if kind == "full":
                            keep[bi, hi, rows, cols] = True
                        else:
                            q_tile, k_tile, table = aux_tensors
                            keep[bi, hi, rows, cols] = table[hi][q_tile[rows].long()][:, k_tile[cols].long()] != 0
    out, lse = reference_attention(q, k, v, scale=scale, mask=keep, return_lse=True)
    return out.to(q.dtype), lse.to(torch.float32)


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


# ---- backward kernels ------------------------------------------------------------------------
# Each stand-in takes what the real backward takes (names, buffers, the forward's LSE layout)
# and computes the block's exact gradients from the GIVEN out and lse, as the kernels do.


def _block_backward(q, k, v, out, dout, lse, scale, causal):
    """fp64 flash-attention backward of one block; [B, S, H, D] in, grads in the inputs' dtype."""
    assert lse.dtype == torch.float32 and tuple(lse.shape) == (q.shape[0], q.shape[2], q.shape[1]), (
        f"softmax_lse must be float32 [B, H, S_q], got {lse.dtype} {tuple(lse.shape)}")
    check_kernel_layout(q=q, k=k, v=v, out=out, dout=dout)
    h, h_kv, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d**-0.5 if scale is None else scale
    qd, od, gd = (t.double().transpose(1, 2) for t in (q, out, dout))
    kd, vd = (t.double().repeat_interleave(h // h_kv, dim=2).transpose(1, 2) for t in (k, v))
    scores = qd @ kd.transpose(-1, -2) * scale
    if causal:
        s_q, s_k = scores.shape[-2:]
        scores = scores.masked_fill(torch.arange(s_k)[None, :] > torch.arange(s_q)[:, None], float("-inf"))
    probs = torch.exp(scores - lse.double()[..., None])
    dscores = probs * (gd @ vd.transpose(-1, -2) - (gd * od).sum(-1, keepdim=True))
    dq = (dscores @ kd * scale).transpose(1, 2)
    dk = (dscores.transpose(-1, -2) @ qd * scale).transpose(1, 2)
    dv = (probs.transpose(-1, -2) @ gd).transpose(1, 2)
    b, s_k = k.shape[:2]
    dk, dv = (t.reshape(b, s_k, h_kv, h // h_kv, d).sum(3) for t in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _fill(dq, dk, dv, grads):
    for buf, g in zip((dq, dk, dv), grads):
        assert buf.shape == g.shape and buf.dtype == g.dtype, (buf.shape, g.shape, buf.dtype, g.dtype)
        buf.copy_(g)


class _CustomOp:
    """Calls like a ``torch.library.custom_op`` object: ``(*args, **kwargs)`` signature, the
    Python function under ``_init_fn`` (flash-attn >= 2.4 registers its backward this way)."""

    def __init__(self, fn):
        self._init_fn = fn

    def __call__(self, *args, **kwargs):
        return self._init_fn(*args, **kwargs)


def fake_flash_attn2_backward(release: str = "2.8") -> types.ModuleType:
    """``flash_attn.flash_attn_interface._flash_attn_backward``: fills dq/dk/dv. ``release``
    ``"2.6"``: ``window_size=(l, r)``, a plain function; ``"2.8"``: ``window_size_left/right``,
    wrapped as a custom op."""
    mod = _module("flash_attn.flash_attn_interface")

    def body(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window, softcap,
             alibi_slopes, deterministic, rng_state):
        mod.calls.append(dict(backward=True, softmax_scale=softmax_scale, causal=causal, window=window))
        assert dropout_p == 0.0 and tuple(window) == (-1, -1) and softcap == 0.0 and alibi_slopes is None
        _fill(dq, dk, dv, _block_backward(q, k, v, out, dout, softmax_lse, softmax_scale, causal))
        return torch.empty(0)  # softmax_d

    if release == "2.6":
        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size, softcap, alibi_slopes, deterministic, rng_state=None):
            return body(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
                        softcap, alibi_slopes, deterministic, rng_state)
        mod._flash_attn_backward = _flash_attn_backward
    else:
        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                 rng_state=None):
            return body(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                        (window_size_left, window_size_right), softcap, alibi_slopes, deterministic, rng_state)
        mod._flash_attn_backward = _CustomOp(_flash_attn_backward)
    return mod


def add_flash_attn3_backward(mod: types.ModuleType, release: str = "2026") -> types.ModuleType:
    """Give a ``flash_attn_interface`` stand-in its ``_flash_attn_backward`` as ``release`` had it:
    ``"2024"`` (dq, dk, dv, softmax_scale, causal), ``"2025"`` (varlen arguments without
    defaults before dq, ``window_size`` tuple) or ``"2026"`` (all defaulted, ``is_causal``)."""

    def run(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, **extra):
        mod.calls.append(dict(backward=True, softmax_scale=softmax_scale, causal=causal, **extra))
        _fill(dq, dk, dv, _block_backward(q, k, v, out, dout, softmax_lse, softmax_scale, causal))

    if release == "2024":
        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal,
                                 deterministic=False):
            run(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
            return dq, dk, dv, torch.empty(0)
    elif release == "2025":
        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
                                 max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal,
                                 window_size=(-1, -1), softcap=0.0, deterministic=False, sm_margin=0):
            assert cu_seqlens_q is None and max_seqlen_q is None
            run(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, window_size=window_size)
            return dq, dk, dv, torch.empty(0)
    else:
        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None,
                                 sequed_q=None, sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None,
                                 dk=None, dv=None, softmax_scale=None, is_causal=False, window_size_left=-1,
                                 window_size_right=-1, softcap=0.0, deterministic=False, sm_margin=0):
            run(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, is_causal)
            return torch.empty(0)
        _flash_attn_backward = _CustomOp(_flash_attn_backward)
    mod._flash_attn_backward = _flash_attn_backward
    return mod


def fake_flash_attn4_backward() -> types.ModuleType:
    """``flash_attn.cute.interface._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None,
    causal=False, ...) -> (dq, dk, dv)``."""
    mod = _module("flash_attn.cute.interface")

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,
                        window_size_left=None, window_size_right=None, **kw):
        mod.calls.append(dict(backward=True, softmax_scale=softmax_scale, causal=causal, **kw))
        return _block_backward(q, k, v, out, dout, lse, softmax_scale, causal)

    mod._flash_attn_bwd = _flash_attn_bwd
    return mod


def fake_aiter_backward() -> types.ModuleType:
    """``aiter.ops.mha._flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dbias,
    dropout_p, softmax_scale, causal, window_size_left, window_size_right, bias, alibi_slopes,
    deterministic, rng_state=None, ...)``: fills dq/dk/dv."""
    mod = _module("aiter.ops.mha")

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dbias, dropout_p, softmax_scale, causal,
                             window_size_left, window_size_right, bias, alibi_slopes, deterministic, rng_state=None,
                             is_v3_atomic_fp32=True, how_v3_bf16_cvt=1):
        mod.calls.append(dict(backward=True, softmax_scale=softmax_scale, causal=causal))
        assert dbias is None and bias is None and (window_size_left, window_size_right) == (-1, -1)
        _fill(dq, dk, dv, _block_backward(q, k, v, out, dout, softmax_lse, softmax_scale, causal))
        return torch.empty(0)

    mod._flash_attn_backward = _flash_attn_backward
    return mod
