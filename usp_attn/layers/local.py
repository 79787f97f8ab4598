"""``LocalAttention``: attention on one device through whichever backend the selector picks."""

from __future__ import annotations

import logging

import torch
from torch import nn

from usp_attn.backends import AttentionBackendEnum, expand_kv_heads
from usp_attn.layers.attention_grad import attend_with_grad, grad_required
from usp_attn.layers.validation import check_head_config, check_qkv, check_supported_backends
from usp_attn.masks import normalize_mask
from usp_attn.platforms import current_platform
from usp_attn.selector import BackendSelection, get_attn_backend, log_once, settings_version

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
        Returns ``[B, S_q, H, D]`` in q's dtype.

    The backend is chosen from the real dtype of the tensors at forward time (cached
    until a selection setting changes, e.g. inside
    :func:`~usp_attn.global_force_attn_backend_context_manager`). A masked call on a
    backend without mask support runs on one that has it, logged once. ``.backend``
    is the backend of the last call (before any call: the pick for the default dtype).
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        num_kv_heads: int | None = None,
        softmax_scale: float | None = None,
        causal: bool = False,
        supported_attention_backends=None,
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

    # ---- selection -----------------------------------------------------------------------
    def selection(self, dtype: torch.dtype, *, need_mask: bool = False, need_lse: bool = False) -> BackendSelection:
        """The (cached) :class:`BackendSelection` for inputs of ``dtype``."""
        return self._resolve(dtype, need_mask, need_lse)[0]

    def _resolve(self, dtype, need_mask, need_lse):
        key = (dtype, need_mask, need_lse, settings_version())
        entry = self._selections.get(key)
        if entry is None:
            if len(self._selections) > 64:  # settings changed many times: drop stale entries
                self._selections.clear()
            sel = self._select(dtype, need_mask, need_lse)
            entry = self._selections[key] = (sel, sel.impl)
        return entry

    def _select(self, dtype, need_mask, need_lse) -> BackendSelection:
        if not need_mask:
            return get_attn_backend(
                self.head_size, dtype, self.supported_attention_backends, need_lse=need_lse
            )
        plain = get_attn_backend(self.head_size, dtype, self.supported_attention_backends, need_lse=need_lse)
        if plain.impl.supports_mask:
            return plain
        # A masked call is not a reason to fail in strict mode: route it, say so once.
        masked = get_attn_backend(
            self.head_size, dtype, self.supported_attention_backends, need_lse=need_lse, need_mask=True, strict=False
        )
        log_once(
            logging.INFO,
            f"usp_attn: '{plain.backend}' has no mask support; masked attention calls run on '{masked.backend}'",
        )
        return masked

    @property
    def backend(self) -> AttentionBackendEnum:
        if self._last is not None:
            return self._last.backend
        return self.selection(torch.get_default_dtype()).backend

    # ---- compute -------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None):
        check_qkv(
            q, k, v, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_size=self.head_size, causal=self.causal,
        )
        mask = None
        if attn_mask is not None:
            mask = normalize_mask(
                attn_mask, batch=q.shape[0], num_heads=self.num_heads, s_q=q.shape[1], s_k=k.shape[1],
                dtype=q.dtype, device=q.device,
            )
        return self.attend(q, k, v, mask=mask, causal=self.causal)

    def attend(self, q, k, v, *, mask=None, causal=False, return_lse=False):
        """Run the kernel on already-validated inputs (``mask`` in normalised 4-D form).

        Used by the sequence-parallel layers for each block; returns ``out`` or
        ``(out, lse)`` with lse ``[B, H, S_q]`` float32.
        """
        sel, impl = self._resolve(q.dtype, mask is not None, return_lse)
        self._last = sel
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
