"""``LocalAttention``: attention on one device through whichever backend the selector picks."""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
from torch import nn

from usp_attn import measured_choice
from usp_attn.backends import AttentionBackendEnum, expand_kv_heads
from usp_attn.kernels import attend_with_grad, grad_required
from usp_attn.arguments import ReplicatedRows, check_head_config, check_qkv, check_return_lse, check_supported_backends
from usp_attn.masks import normalize_mask
from usp_attn.measured_choice import ShapeClass, exact_candidates, length_bucket
from usp_attn.platforms import current_platform
from usp_attn.logs import log_once
from usp_attn.sparse.attend import attend_sparse, check_sparsity
from usp_attn.sparse.gate import AccuracyGate, check_gate, judge, sample_rows
from usp_attn.selector import (
    AttentionBackendUnavailableError,
    BackendSelection,
    get_attn_backend,
    get_group_agreement,
    settings_version,
)

__all__ = ["LocalAttention"]


class LocalAttention(nn.Module):
    """Scaled dot-product attention on local tensors.

    Args:
        num_heads: H, query heads.
        head_size: D, per-head size of q, k and v.
        num_kv_heads: H_kv (default H); must divide H (GQA/MQA).
        softmax_scale: scale of q·k (default ``head_size ** -0.5``).
        causal: apply a causal mask (needs S_q == S_k).
        supported_attention_backends: backends this layer may use (default: all).

    Shapes (``forward``):
        q ``[B, S_q, H, D]``; k, v ``[B, S_k, H_kv, D]``; one floating dtype and device.
        attn_mask: optional, bool (True = attend) or additive float, shaped ``[B, S_k]``,
        ``[B, S_q, S_k]`` or ``[B, 1|H, S_q, S_k]``. Rows with no key to attend give 0.
        Returns ``[B, S_q, H, D]`` in q's dtype; with ``return_lse=True`` also the
        log-sum-exp ``[B, H, S_q]`` (float32; float64 for float64 inputs).

    The backend is chosen from the real dtype and shape of the tensors at forward time
    (cached per shape class until a selection setting changes, e.g. inside
    :func:`~usp_attn.global_force_attn_backend_context_manager`). With automatic
    selection on CUDA the first call of a new shape class times the exact kernels and
    keeps the fastest (:mod:`usp_attn.measured_choice`). A masked call on a backend
    without mask support runs on one that has it, logged once. ``.backend`` is the
    backend of the last call (before any call: the pick for the default dtype).
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        num_kv_heads: int | None = None,
        softmax_scale: float | None = None,
        causal: bool = False,
        supported_attention_backends=None,
        *,
        sparse_gate=None,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_size, self.num_kv_heads, self.softmax_scale = check_head_config(
            num_heads, head_size, num_kv_heads, softmax_scale
        )
        self.causal = bool(causal)
        self.supported_attention_backends = check_supported_backends(supported_attention_backends)
        self._selections: dict[tuple, tuple[BackendSelection, object]] = {}
        current_platform()  # detect now, eagerly: torch.compile cannot trace device probing
        self._last: BackendSelection | None = None
        self.sparse_gate = sparse_gate

    @property
    def sparse_gate(self) -> AccuracyGate | None:
        """The accuracy gate of sparse calls (:class:`usp_attn.sparse.AccuracyGate`; None: none): the first call
        of each shape class compares sampled rows with dense attention and runs dense above its max error.
        Settable: an ``AccuracyGate``, a float (its ``max_error``) or None; setting it forgets past verdicts."""
        return self.__dict__["_sparse_gate"]

    @sparse_gate.setter
    def sparse_gate(self, gate) -> None:
        self.__dict__["_sparse_gate"] = check_gate(gate)
        self.__dict__["_gate_verdicts"] = {}

    # ---- selection -----------------------------------------------------------------------
    def selection(self, dtype: torch.dtype, *, need_mask: bool = False, need_lse: bool = False) -> BackendSelection:
        """The static :class:`BackendSelection` for inputs of ``dtype`` (no shape, no measurement)."""
        return self._select(dtype, need_mask, need_lse, None)

    def kernel_for(self, q, k, v, *, causal=False, need_mask=False, need_lse=False, lengths=None, group=None):
        """``(BackendSelection, kernel object)`` for a call on these ``[B, S, H, D]`` tensors.

        Cached per shape class. ``lengths``: ``(S_q, S_k)`` to classify the call by instead
        of the tensors' own, and ``group``: the process group whose rank 0 measures and
        broadcasts. The sequence-parallel layers pass lengths that are identical on every
        rank of ``group``, which every rank then must call this with at the same time.
        """
        s_q, s_k = lengths if lengths is not None else (q.shape[1], k.shape[1])
        need_grad = grad_required(q, k, v)
        key = (q.dtype, need_mask, need_lse, bool(causal), q.shape[2], k.shape[2],
               length_bucket(s_q), length_bucket(s_k), need_grad, settings_version())
        entry = self._selections.get(key)
        if entry is None:
            if len(self._selections) > 64:  # settings changed many times: drop stale entries
                self._selections.clear()
            sel = self._select(q.dtype, need_mask, need_lse, s_k)
            sel = self._measure(sel, q, k, v, causal, need_mask, need_lse, s_q, s_k, group, need_grad)
            entry = self._selections[key] = (sel, sel.impl)
        return entry

    def _select(self, dtype, need_mask, need_lse, num_keys) -> BackendSelection:
        plain = get_attn_backend(
            self.head_size, dtype, self.supported_attention_backends, need_lse=need_lse, num_keys=num_keys
        )
        if not need_mask or plain.impl.supports_mask:
            return plain
        # A masked call is not a reason to fail in strict mode: route it, say so once.
        masked = get_attn_backend(
            self.head_size, dtype, self.supported_attention_backends, need_lse=need_lse, need_mask=True,
            strict=False, num_keys=num_keys,
        )
        log_once(
            logging.INFO,
            f"usp_attn: '{plain.backend}' has no mask support; masked attention calls run on '{masked.backend}'",
        )
        return masked

    def _measure(self, sel, q, k, v, causal, need_mask, need_lse, s_q, s_k, group, need_grad) -> BackendSelection:
        """Refine an automatic selection by timing the exact kernels (see measured_choice)."""
        if sel.requested is not None or need_mask or not measured_choice.measuring_possible(q):
            return sel
        agreement = get_group_agreement()
        if group is None and agreement is not None and agreement.world_size > 1:
            return sel  # a plain call in a group: the other ranks would not join the decision
        supported = self.supported_attention_backends

        def allowed(backend):
            return (supported is None or backend in supported) and (
                agreement is None or backend in agreement.available)

        platforms = (agreement.platforms if agreement is not None and agreement.platforms else ()) or (
            sel.local_platform or sel.platform,)
        candidates = exact_candidates(platforms, self.head_size, q.dtype, need_lse=need_lse, allowed=allowed,
                                      need_backward=need_grad)
        if len(candidates) < 2:
            return sel
        shape = ShapeClass.of(q.dtype, self.head_size, q.shape[2], k.shape[2], s_q, s_k, causal, need_lse,
                              need_grad)
        found = measured_choice.choose(shape, candidates, sel.local_platform or sel.platform, q, k, v,
                                       causal=causal, softmax_scale=self.softmax_scale, group=group)
        if found is None:
            return sel
        return dataclasses.replace(sel, backend=found.winner.backend, kernel=found.winner.kernel,
                                   timings=found.timings, source="measured")

    @property
    def backend(self) -> AttentionBackendEnum:
        if self._last is not None:
            return self._last.backend
        return self.selection(torch.get_default_dtype()).backend

    # ---- compute -------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                *, return_lse: bool = False, sparsity=None, replicated: ReplicatedRows | None = None):
        """Attention of ``q`` over ``k``/``v``; with ``return_lse`` also the log-sum-exp.

        Returns ``out [B, S_q, H, D]`` in q's dtype, or ``(out, lse)``: lse ``[B, H, S_q]``, the
        natural log of each query row's softmax denominator ``sum_j exp(scale * q.k_j + mask_j)``,
        float32 (float64 for float64 inputs), ``-inf`` on rows with no key to attend. Under
        autograd the LSE is differentiable (exact gradients through the kernel's backward).

        ``sparsity``: a sparse pattern (:mod:`usp_attn.sparse`; ``None`` = dense, the default),
        lossy and opt-in. Its grid is the rows between ``replicated.prefix`` and
        ``replicated.suffix`` (text rows, dense both ways; k/v may carry ``kv_prefix/kv_suffix``
        rows more); no ``attn_mask``, not causal. Under autograd it runs on the exact masked path
        (gradients exact; the block-sparse kernel is forward only).
        """
        check_return_lse(return_lse)
        if attn_mask is None and sparsity is None and replicated is None and not torch.compiler.is_compiling():
            return self._steady(q, k, v, return_lse)
        check_qkv(
            q, k, v, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_size=self.head_size, causal=self.causal,
        )
        if sparsity is not None or replicated is not None:
            return self._forward_sparse(q, k, v, attn_mask, sparsity, ReplicatedRows.of(replicated), return_lse)
        mask = None
        if attn_mask is not None:
            mask = normalize_mask(
                attn_mask, batch=q.shape[0], num_heads=self.num_heads, s_q=q.shape[1], s_k=k.shape[1],
                dtype=q.dtype, device=q.device,
            )
        return self.attend(q, k, v, mask=mask, causal=self.causal, return_lse=return_lse)

    def _steady(self, q, k, v, return_lse):
        """An unmasked dense call. The checks and the kernel lookup depend only on the tensors' shapes,
        dtypes and devices, the gradient flag, ``return_lse`` and the selection settings: a call that
        repeats the last one's skips them and runs the kernel bound then (host work per call matters
        once the kernel is short: Flux's 4608 tokens on an H200, Ulysses' 1/U of the heads)."""
        try:
            grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, grad,
                   return_lse, settings_version())
        except AttributeError:  # not tensors: the checks say what is wrong
            key = None
        steady = self.__dict__.get("_steady_call")
        if key is None or steady is None or steady[0] != key:
            check_qkv(q, k, v, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                      causal=self.causal)
            steady = (key, self.kernel_for(q, k, v, causal=self.causal, need_lse=return_lse))
            self.__dict__["_steady_call"] = steady  # nn.Module.__setattr__ costs microseconds per call
        return self.attend(q, k, v, causal=self.causal, return_lse=return_lse, kernel=steady[1])

    def _forward_sparse(self, q, k, v, attn_mask, sparsity, rows, return_lse):
        if sparsity is None:
            raise ValueError("replicated= describes the text rows around a sparse pattern's grid; pass sparsity= "
                             "too (dense attention needs no row description)")
        if attn_mask is not None:
            raise ValueError("attn_mask cannot be combined with sparsity= (the pattern is the mask)")
        grid = rows.check_rows(q.shape[1], k.shape[1], False)
        check_sparsity(sparsity, num_grid_tokens=grid, num_heads=self.num_heads, causal=self.causal,
                       where="LocalAttention")
        gate, key = self.sparse_gate, (tuple(q.shape), tuple(k.shape), q.dtype, sparsity, rows)
        verdict = None if gate is None else self._gate_verdicts.get(key)
        if verdict is not False:
            out, lse = attend_sparse(self._attend_lse, q, k, v, sparsity, q_text=(rows.prefix, rows.suffix),
                                     k_text=(rows.key_prefix, rows.key_suffix), q_range=(0, grid),
                                     k_range=(0, grid), heads=range(self.num_heads), scale=self.softmax_scale,
                                     block_kernel=self._block_kernel(q, k, v))
        if gate is not None and verdict is None:
            picked = sample_rows(rows.prefix, grid, gate, q.device)
            with torch.no_grad():
                dense = self._attend_lse(q[:, picked], k, v)[0]
            verdict = self._gate_verdicts[key] = judge(gate, out[:, picked], dense, None, str(sparsity))
        if verdict is False:  # the gate found the pattern too lossy for this shape class: dense, text rows too
            out, lse = self._attend_lse(q, k, v)
        return (out, lse) if return_lse else out

    def _attend_lse(self, q, k, v, *, mask=None, return_lse=True):
        return self.attend(q, k, v, mask=mask, return_lse=return_lse)

    def _block_kernel(self, q, k, v):
        """The block-sparse forward of the backend the selector picks with block sparsity
        required, or None (the exact masked path), for the grid part of a sparse call. Under
        autograd None: the block-sparse kernels have no backward here, the masked path's kernels do."""
        if grad_required(q, k, v):
            log_once(logging.INFO, "usp_attn: sparse attention with gradients runs on the exact masked path (the "
                                   "block-sparse kernel is forward only here)")
            return None
        try:
            sel = get_attn_backend(self.head_size, q.dtype, self.supported_attention_backends, need_lse=True,
                                   strict=False, need_block_sparse=True)
        except AttentionBackendUnavailableError as exc:
            log_once(logging.INFO, f"usp_attn: sparse patterns run on the exact masked path: {exc}")
            return None
        return functools.partial(sel.impl.forward_block_sparse, softmax_scale=self.softmax_scale)

    def attend(self, q, k, v, *, mask=None, causal=False, return_lse=False, kernel=None):
        """Run the kernel on already-validated inputs (``mask`` in normalised 4-D form).

        Used by the sequence-parallel layers for each block, with ``kernel`` (an entry of
        :meth:`kernel_for`) chosen once per layer call; returns ``out`` or ``(out, lse)``
        with lse ``[B, H, S_q]`` float32.
        """
        if q.shape[1] == 0 or k.shape[1] == 0:  # a rank's empty shard: some kernels die on it (see _no_rows_or_keys)
            return _no_rows_or_keys(q, k, v, return_lse)
        if kernel is None:
            kernel = self.kernel_for(q, k, v, causal=causal, need_mask=mask is not None, need_lse=return_lse)
        sel, impl = kernel
        self.__dict__["_last"] = sel  # nn.Module.__setattr__ costs microseconds per call
        if not impl.supports_gqa and k.shape[2] != q.shape[2]:
            k = expand_kv_heads(k, q.shape[2])
            v = expand_kv_heads(v, q.shape[2])
        if grad_required(q, k, v):  # training: the backend's own backward kernel
            return attend_with_grad(impl, q, k, v, mask=mask, causal=causal, scale=self.softmax_scale,
                                    return_lse=return_lse)
        return impl.forward(
            q, k, v, causal=causal, softmax_scale=self.softmax_scale, attn_mask=mask, return_lse=return_lse
        )

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, "
            f"softmax_scale={self.softmax_scale:.4g}, causal={self.causal}"
        )


def _no_rows_or_keys(q, k, v, return_lse):
    """Attention with no query rows or no keys, without a kernel: torch's CPU flash op dies of SIGFPE on zero
    query rows, and a rank whose shard holds no token of a segment asks for exactly that. Every row has no key
    to attend (output 0, LSE -inf); differentiable (zero gradients) so a training step's graph stays whole."""
    keys = expand_kv_heads(k, q.shape[2]).to(q.dtype)
    values = expand_kv_heads(v, q.shape[2]).to(q.dtype)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values)
    if not return_lse:
        return out
    return out, logits.to(torch.promote_types(q.dtype, torch.float32)).logsumexp(-1)
