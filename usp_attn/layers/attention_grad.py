"""Autograd through the attention kernels, with each backend's own backward kernel.

When autograd records (grad mode on and an input requires grad), one kernel call becomes
:class:`_KernelAttention`: the forward asks the kernel for ``(out, lse)`` and keeps
``q, k, v, out, lse``; the backward hands them to the backend's ``backward`` (flash-style:
the probabilities are recomputed from ``lse``, nothing of size ``S_q x S_k`` is kept).
Without gradients nothing here runs: the layers call the kernels exactly as before.

A backend without a backward kernel (SageAttention 1/2/3) is an error as soon as gradients
are required, naming the backends that have one; it is never replaced silently.
"""

from __future__ import annotations

import torch

from usp_attn.backends import BACKEND_CLASSES, AttentionBackend
from usp_attn.distributed.collectives_grad import grad_required
from usp_attn.selector import AttentionBackendUnavailableError

__all__ = ["grad_required", "check_backward", "attend_with_grad", "BlockKernels"]


def check_backward(impl: AttentionBackend) -> None:
    """Raise :class:`AttentionBackendUnavailableError` unless ``impl`` can compute gradients."""
    if impl.supports_backward(impl.platform, impl.kernel):
        return
    everywhere = [str(name) for name, cls in BACKEND_CLASSES.items() if cls.backward is not AttentionBackend.backward]
    here = [str(name) for name, cls in BACKEND_CLASSES.items() if cls.supports_backward(impl.platform)]
    raise AttentionBackendUnavailableError(
        f"gradients are required but attention backend '{impl.name}' has no backward kernel on "
        f"{impl.platform.describe()}. Backends with a backward: {', '.join(everywhere)} "
        f"(on this machine: {', '.join(here) or 'none'}). Choose one with --attention-backend or "
        "global_force_attn_backend(), or run this attention under torch.no_grad()"
    )


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, impl, causal, scale):
        out, lse = impl.forward(q, k, v, causal=causal, softmax_scale=scale, attn_mask=mask, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.kernel = (impl, causal, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        impl, causal, scale = ctx.kernel
        dq, dk, dv = impl.backward(q, k, v, out, dout, lse, causal=causal, softmax_scale=scale, attn_mask=mask)
        return dq, dk, dv, None, None, None, None


def attend_with_grad(impl, q, k, v, *, mask, causal, scale, return_lse=False):
    """``impl.forward`` recorded by autograd; same arguments and results (``lse`` gets no gradient).

    Shapes: q ``[B, S_q, H, D]``, k/v ``[B, S_k, H_kv, D]``, mask in the normalised 4-D form or
    None; returns out ``[B, S_q, H, D]`` (and lse ``[B, H, S_q]`` float32).
    """
    check_backward(impl)
    if mask is not None and mask.requires_grad:
        raise ValueError("attn_mask requires grad, but attention masks get no gradient here; pass attn_mask.detach()")
    out, lse = _KernelAttention.apply(q, k, v, mask, impl, causal, scale)
    return (out, lse) if return_lse else out


class BlockKernels:
    """Forward and backward of one key block for a :class:`~usp_attn.LocalAttention`, both
    with the kernel chosen for the layer call (an entry of ``LocalAttention.kernel_for``:
    ``(BackendSelection, AttentionBackend)``), so both directions run the same backend."""

    def __init__(self, local, kernel) -> None:
        self.local, self.kernel = local, kernel

    @property
    def impl(self) -> AttentionBackend:
        return self.kernel[1]

    def attend(self, q, k, v, *, mask=None, causal=False, return_lse=False):
        return self.local.attend(q, k, v, mask=mask, causal=causal, return_lse=return_lse, kernel=self.kernel)

    def backward(self, q, k, v, out, dout, lse, *, mask=None, causal=False):
        """One block's ``dq, dk, dv`` (see :meth:`AttentionBackend.backward`)."""
        return self.impl.backward(q, k, v, out, dout, lse, causal=causal, softmax_scale=self.local.softmax_scale,
                                  attn_mask=mask)
