"""Local attention kernels behind one enum. See :mod:`usp_attn.backends.base` for the contract."""

from __future__ import annotations

import functools

from usp_attn.backends.aiter import AiterBackend
from usp_attn.backends.base import AttentionBackend, expand_kv_heads
from usp_attn.backends.enum import AttentionBackendEnum, parse_attention_backend
from usp_attn.backends.flash import FlashAttentionBackend
from usp_attn.backends.sage import SageAttention3Backend, SageAttentionBackend
from usp_attn.backends.sdpa import TorchSDPABackend

__all__ = [
    "AttentionBackend",
    "AttentionBackendEnum",
    "BACKEND_CLASSES",
    "backend_class",
    "make_backend",
    "parse_attention_backend",
    "expand_kv_heads",
]

BACKEND_CLASSES: dict[AttentionBackendEnum, type[AttentionBackend]] = {
    AttentionBackendEnum.FA: FlashAttentionBackend,
    AttentionBackendEnum.TORCH_SDPA: TorchSDPABackend,
    AttentionBackendEnum.SAGE_ATTN: SageAttentionBackend,
    AttentionBackendEnum.SAGE_ATTN_3: SageAttention3Backend,
    AttentionBackendEnum.AITER: AiterBackend,
}


def backend_class(backend: AttentionBackendEnum) -> type[AttentionBackend]:
    return BACKEND_CLASSES[backend]


@functools.lru_cache(maxsize=None)
def make_backend(backend: AttentionBackendEnum, platform, kernel: str | None = None) -> AttentionBackend:
    """The (stateless, shared) kernel object for ``backend`` on ``platform``, bound to
    ``kernel`` (one of ``backend_class(backend).kernels(...)``; ``None``: its default)."""
    return BACKEND_CLASSES[backend](platform, kernel)
