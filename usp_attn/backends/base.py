"""The contract every local attention kernel implements.

All backends take and return the ``[B, S, H, D]`` layout (batch, sequence, heads,
head dim) that DiT blocks produce, so layers never reshape per backend. A backend
declares what it can do; the selector reads those declarations, never the code.

Shapes and dtypes of :meth:`AttentionBackend.forward`:
    q: ``[B, S_q, H, D]``; k, v: ``[B, S_k, H_kv, D]``; all the same dtype and device.
    attn_mask: ``None`` or a tensor broadcastable to ``[B, H, S_q, S_k]``: bool
        (True = attend) or additive float in q's dtype (see :mod:`usp_attn.masks`).
    returns: out ``[B, S_q, H, D]`` in q's dtype, and with ``return_lse=True`` also the
        natural-log log-sum-exp ``[B, H, S_q]`` in float32 (``-inf`` for rows whose
        keys are all masked; their output is 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from usp_attn.backends.enum import AttentionBackendEnum

if TYPE_CHECKING:  # platforms import nothing from here; this is for annotations only
    from usp_attn.platforms import Platform

__all__ = ["AttentionBackend", "HALF_DTYPES", "FLOAT_DTYPES"]

HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


class AttentionBackend:
    """Base class: capability declarations plus one forward signature.

    Subclasses set the class attributes and implement :meth:`machine_reason` and
    :meth:`forward`. Instances are bound to one :class:`~usp_attn.platforms.Platform`
    and optionally one concrete *kernel* of the backend (a FlashAttention generation,
    an aten SDPA sub-kernel; see :meth:`kernels`), and are stateless otherwise.
    """

    name: ClassVar[AttentionBackendEnum]
    #: platform kinds (``PlatformKind`` values) the kernel can run on
    platform_kinds: ClassVar[frozenset[str]] = frozenset()
    dtypes: ClassVar[frozenset[torch.dtype]] = HALF_DTYPES
    supports_gqa: ClassVar[bool] = False
    supports_causal: ClassVar[bool] = True
    supports_mask: ClassVar[bool] = False
    #: optional package that must be importable, if any (checked through the platform)
    package: ClassVar[str | None] = None

    def __init__(self, platform: "Platform", kernel: str | None = None) -> None:
        self.platform = platform
        self.kernel = kernel

    # ---- declarations the selector reads -------------------------------------------------
    @classmethod
    def machine_reason(cls, platform: "Platform") -> str | None:
        """Why this kernel cannot run on ``platform`` at all, or ``None`` if it can."""
        if platform.kind.value not in cls.platform_kinds:
            kinds = "/".join(sorted(k.upper() for k in cls.platform_kinds))
            return f"{cls.name} needs {kinds}, this machine is {platform.kind.value.upper()}"
        if cls.package and not platform.has_package(cls.package):
            return f"{cls.name} needs the '{cls.package}' package, which is not installed"
        return None

    @classmethod
    def head_size_reason(cls, platform: "Platform", head_size: int) -> str | None:
        return None

    @classmethod
    def supports_lse(cls, platform: "Platform") -> bool:
        """Whether ``forward(..., return_lse=True)`` is available on ``platform``."""
        return False

    @classmethod
    def unsupported_reason(
        cls,
        platform: "Platform",
        head_size: int | None = None,
        dtype: torch.dtype | None = None,
        *,
        need_lse: bool = False,
        need_mask: bool = False,
    ) -> str | None:
        """Why this kernel cannot serve a layer with these properties, or ``None``."""
        reason = cls.machine_reason(platform)
        if reason:
            return reason
        if dtype is not None and dtype not in cls.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in cls.dtypes))
            return f"{cls.name} does not support dtype {str(dtype).replace('torch.', '')} (supports {names})"
        if head_size is not None:
            reason = cls.head_size_reason(platform, head_size)
            if reason:
                return reason
        if need_lse and not cls.supports_lse(platform):
            return f"{cls.name} cannot return the log-sum-exp that ring attention needs"
        if need_mask and not cls.supports_mask:
            return f"{cls.name} does not support attention masks"
        return None

    @classmethod
    def kernels(cls, platform: "Platform", head_size: int, dtype: torch.dtype, *, need_mask: bool = False
                ) -> tuple[str, ...]:
        """The concrete exact kernels this backend can run for these properties, preferred
        first; what a measured automatic choice times. Empty: nothing to choose between."""
        return ()

    @classmethod
    def default_kernel(cls, platform: "Platform", head_size: int) -> str | None:
        """The kernel an instance for ``head_size`` binds to without a measured choice
        (``None``: decided per call)."""
        return None

    # ---- the kernel ------------------------------------------------------------------------
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        softmax_scale: float | None = None,
        attn_mask: torch.Tensor | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.platform.describe()})"


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, S, H_kv, D]`` -> ``[B, S, num_heads, D]``: query head h reads kv head h // (H / H_kv)."""
    b, s, h_kv, d = x.shape
    if h_kv == num_heads:
        return x
    rep = num_heads // h_kv
    return x[:, :, :, None, :].expand(b, s, h_kv, rep, d).reshape(b, s, num_heads, d)


def default_scale(head_size: int, softmax_scale: float | None) -> float:
    return head_size**-0.5 if softmax_scale is None else float(softmax_scale)
