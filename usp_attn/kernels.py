"""Autograd through the attention kernels, with each backend's own backward kernel.

When autograd records (grad mode on and an input requires grad), one kernel call becomes
:class:`_KernelAttention`: the forward asks the kernel for ``(out, lse)`` and keeps
``q, k, v, out, lse``; the backward hands them to the backend's ``backward`` (flash-style:
the probabilities are recomputed from ``lse``, nothing of size ``S_q x S_k`` is kept).
The LSE is differentiable too (:func:`block_backward`).
Without gradients nothing here runs: the layers call the kernels exactly as before.

A backend without a backward kernel (SageAttention 1/2/3) is an error as soon as gradients
are required, naming the backends that have one; it is never replaced silently.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from usp_attn.backends import BACKEND_CLASSES, AttentionBackend
from usp_attn.selector import AttentionBackendUnavailableError

__all__ = ["grad_required", "check_backward", "attend_with_grad", "block_backward", "BlockKernels"]


def grad_required(*tensors) -> bool:
    """Whether autograd will record an op on these tensors (grad mode on, one requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any(<generator>): this runs several times per layer call
        if t is not None and t.requires_grad:
            return True
    return False


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
        ctx.set_materialize_grads(False)  # an unused LSE has no gradient: no extra backward work
        return out, lse

    @staticmethod
    @once_differentiable  # the kernels and collectives below have no derivative: refuse a double backward
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        impl, causal, scale = ctx.kernel
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = block_backward(impl.backward, q, k, v, out, dout, lse, dlse, causal=causal, softmax_scale=scale,
                                    attn_mask=mask)
        return dq, dk, dv, None, None, None, None


def block_backward(backward, q, k, v, out, dout, lse, dlse=None, **kwargs):
    """One block's ``dq, dk, dv`` for the loss through its output AND the row's log-sum-exp.

    ``backward`` is an :meth:`AttentionBackend.backward` (flash-style: ``dS = P * (dO V^T - delta)``
    with ``delta = rowsum(dO * O)``). The LSE adds ``d lse_i / d s_ij = P_ij``, so the exact
    ``dS`` is ``P * (dO V^T - (delta - dlse))``. No backward kernel takes ``dlse``, but every
    one reads ``O`` only through ``delta``, so a second call with ``V = 0``, ``dO = e_0`` (the
    first head-dim unit vector) and ``O = -dlse * e_0`` gives ``dS = P * (0 + dlse)``: exactly
    the LSE's share of ``dq`` and ``dk`` (its ``dv`` is 0). It costs one more block backward,
    only when the LSE's gradient is not None. ``dlse`` is rounded to q's dtype on the way in.

    Shapes: q ``[B, S_q, H, D]``, k/v ``[B, S_k, H_kv, D]``, out/dout like q, lse/dlse
    ``[B, H, S_q]``.
    """
    dq, dk, dv = backward(q, k, v, out, dout, lse, **kwargs)
    if dlse is None:
        return dq, dk, dv
    unit = torch.zeros_like(q)
    unit[..., 0] = 1
    fake_out = torch.zeros_like(q)
    fake_out[..., 0] = -dlse.transpose(1, 2)
    lse_dq, lse_dk, _ = backward(q, k, torch.zeros_like(v), fake_out, unit, lse, **kwargs)
    return dq + lse_dq, dk + lse_dk, dv


def attend_with_grad(impl, q, k, v, *, mask, causal, scale, return_lse=False):
    """``impl.forward`` recorded by autograd; same arguments and results (``lse`` differentiable).

    Shapes: q ``[B, S_q, H, D]``, k/v ``[B, S_k, H_kv, D]``, mask in the normalised 4-D form or
    None; returns out ``[B, S_q, H, D]`` (and lse ``[B, H, S_q]`` float32, float64 for float64).
    """
    check_backward(impl)
    if mask is not None and mask.requires_grad:
        raise ValueError("attn_mask requires grad, but attention masks get no gradient here; pass attn_mask.detach()")
    out, lse = _KernelAttention.apply(q, k, v, mask, impl, causal, scale)
    return (out, lse) if return_lse else out


class BlockKernels:
    """Forward and backward of one key block for a :class:`~usp_attn.LocalAttention`, both
    with the kernel chosen for the layer call (an entry of ``LocalAttention.kernel_for``:
    ``(BackendSelection, AttentionBackend)``), so both directions run the same backend.
    ``masked_kernel``: the kernel of the blocks that carry a key mask, when the others carry
    none (replicated text keys masked, sharded keys not: the fast kernels take no mask)."""

    def __init__(self, local, kernel, masked_kernel=None) -> None:
        self.local, self.kernel, self.masked_kernel = local, kernel, masked_kernel or kernel

    @property
    def impl(self) -> AttentionBackend:
        return self.kernel[1]

    def attend(self, q, k, v, *, mask=None, causal=False, return_lse=False):
        kernel = self.kernel if mask is None else self.masked_kernel
        return self.local.attend(q, k, v, mask=mask, causal=causal, return_lse=return_lse, kernel=kernel)

    def backward(self, q, k, v, out, dout, lse, *, mask=None, causal=False, dlse=None):
        """One block's ``dq, dk, dv`` (see :meth:`AttentionBackend.backward`; ``dlse``: the
        gradient of the row's LSE, see :func:`block_backward`)."""
        impl = self.impl if mask is None else self.masked_kernel[1]
        return block_backward(impl.backward, q, k, v, out, dout, lse, dlse, causal=causal,
                              softmax_scale=self.local.softmax_scale, attn_mask=mask)
