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

import functools
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

    def __init_subclass__(cls, **kwargs) -> None:
        # Callers hand over views of any strides (x[..., ::2], permutes, expands); the kernels
        # read raw pointers and strides and give garbage or raw errors for some of them. Every
        # subclass's kernel entry points get their tensors through kernel_layout() here, once,
        # so no kernel wrapper can forget it.
        super().__init_subclass__(**kwargs)
        for name, wrap in (("forward", _forward_in_kernel_layout), ("backward", _backward_in_kernel_layout),
                           ("forward_block_sparse", _forward_in_kernel_layout)):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_in_kernel_layout", False):
                setattr(cls, name, wrap(method))

    # ---- the memory layout the kernel reads --------------------------------------------------
    def kernel_layout(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself if the kernel reads its strides correctly, else a dense copy of it.

        The GPU kernels (FlashAttention 2/3/4, aiter, SageAttention) need a unit-stride last
        dimension and, as FA4 assumes outright and the others' 16-byte vector loads need, a
        16-byte aligned data pointer and strides. Backends whose kernels need less override this.
        """
        if t.stride(-1) != 1 or not aligned_16(t):
            return dense_copy(t)
        return t

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
    def block_sparse_reason(cls, platform: "Platform") -> str | None:
        """Why :meth:`forward_block_sparse` cannot run on ``platform``, or ``None``."""
        return f"{cls.name} has no block-sparse kernel"

    def forward_block_sparse(self, q, k, v, plan, *, softmax_scale=None):
        """Attention over the kept 128 x 128 blocks of ``plan`` (a
        :class:`usp_attn.sparse.attend.BlockPlan`) only. q ``[B, S_q, H, D]``, k/v ``[B, S_k,
        H_kv, D]``; returns ``(out [B, S_q, H, D], lse [B, H, S_q] float32)``."""
        raise NotImplementedError(self.block_sparse_reason(self.platform))

    @classmethod
    def unsupported_reason(
        cls,
        platform: "Platform",
        head_size: int | None = None,
        dtype: torch.dtype | None = None,
        *,
        need_lse: bool = False,
        need_mask: bool = False,
        need_block_sparse: bool = False,
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
        if need_block_sparse:
            return cls.block_sparse_reason(platform)
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

    # ---- gradients -----------------------------------------------------------------------
    @classmethod
    def supports_backward(cls, platform: "Platform", kernel: str | None = None) -> bool:
        """Whether :meth:`backward` is available on ``platform`` for ``kernel`` (``None``: the
        backend's default kernel there), i.e. whether gradients can flow through this backend."""
        return False

    def backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        dout: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool = False,
        softmax_scale: float | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of one attention block, given the output and log-sum-exp of the WHOLE row.

        With ``out``/``lse`` of the full attention (all key blocks merged), the probabilities
        ``P = exp(scale * q k^T - lse)`` of this block are exact, so the result is this block's
        exact share: ``dq`` summed over all blocks is the full ``dq``; ``dk``/``dv`` are exact
        for this block's keys (flash-attention backward, as in ring-flash-attention and
        torch's context parallelism).

        Args:
            q: ``[B, S_q, H, D]``; k, v: ``[B, S_k, H_kv, D]`` (this block's keys).
            out, dout: ``[B, S_q, H, D]`` the full output and its gradient.
            lse: ``[B, H, S_q]`` float32 full log-sum-exp; ``-inf`` rows (no key anywhere)
                get zero gradients.
            causal, softmax_scale, attn_mask: as :meth:`forward` for this block.

        Returns:
            ``dq [B, S_q, H, D]``, ``dk, dv [B, S_k, H_kv, D]`` (summed over each kv head's
            query group), in the inputs' dtype.
        """
        raise NotImplementedError(f"{self.name} has no backward kernel")


def _forward_in_kernel_layout(forward):
    @functools.wraps(forward)
    def wrapper(self, q, k, v, *args, **kwargs):
        return forward(self, self.kernel_layout(q), self.kernel_layout(k), self.kernel_layout(v), *args, **kwargs)

    wrapper._in_kernel_layout = True
    return wrapper


def _backward_in_kernel_layout(backward):
    @functools.wraps(backward)
    def wrapper(self, q, k, v, out, dout, *args, **kwargs):
        layout = self.kernel_layout
        # dout comes from autograd as whatever the loss made it: `out.sum()` gives a stride-0 expand
        return backward(self, layout(q), layout(k), layout(v), layout(out), layout(dout), *args, **kwargs)

    wrapper._in_kernel_layout = True
    return wrapper


def dense_copy(t: torch.Tensor) -> torch.Tensor:
    """A fresh row-major copy: unit-stride last dimension (also when it has size 1, where
    ``contiguous()`` keeps any stride) and an allocator-aligned pointer."""
    return t.clone(memory_format=torch.contiguous_format)


def aligned_16(t: torch.Tensor) -> bool:
    """Whether ``t``'s data pointer and the strides of its non-trivial leading dimensions are
    16-byte aligned. Rows whose length is not a multiple of 16 bytes can never be, and kernels
    that need alignment refuse such head sizes anyway: those count as aligned, else every call
    would copy for nothing."""
    # The usual case first, in about a microsecond (this runs for q, k and v of every kernel
    # call): a contiguous tensor's strides are multiples of its row, so only the pointer is left.
    if t.is_contiguous() and (torch.compiler.is_compiling() or t.data_ptr() % 16 == 0):
        return True
    step = max(16 // t.element_size(), 1)
    if t.shape[-1] % step:
        return True
    if any(s % step for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
        return False
    # fake tensors under torch.compile have no address; the kernel op re-checks with real ones
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, S, H_kv, D]`` -> ``[B, S, num_heads, D]``: query head h reads kv head h // (H / H_kv)."""
    b, s, h_kv, d = x.shape
    if h_kv == num_heads:
        return x
    rep = num_heads // h_kv
    return x[:, :, :, None, :].expand(b, s, h_kv, rep, d).reshape(b, s, num_heads, d)


def default_scale(head_size: int, softmax_scale: float | None) -> float:
    return head_size**-0.5 if softmax_scale is None else float(softmax_scale)


def sum_kv_heads(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Adjoint of :func:`expand_kv_heads`: ``[B, S, H, D]`` -> ``[B, S, num_kv_heads, D]``,
    summing the gradients of the query heads that read each kv head."""
    b, s, h, d = x.shape
    if h == num_kv_heads:
        return x
    return x.view(b, s, num_kv_heads, h // num_kv_heads, d).sum(dim=3)


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """``lse [B, H, S]`` with ``-inf`` (rows with no attendable key) replaced by ``+inf``, so a
    backward kernel's ``exp(score - lse)`` is 0 there instead of NaN; contiguous, float32
    (float64 stays float64)."""
    lse = lse if lse.dtype == torch.float64 else lse.float()
    return torch.where(torch.isneginf(lse), torch.full((), float("inf"), device=lse.device), lse).contiguous()
