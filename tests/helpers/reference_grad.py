"""fp64 autograd of full attention: the gradient reference for the layers' backward.

Same semantics as :func:`tests.helpers.reference.reference_attention` (``[B, S, H, D]``,
GQA by ``h // (H // H_kv)``, any mask form, top-left causal, rows with no visible key
give 0), but differentiable: the probabilities are a plain softmax in float64, and rows
with no visible key are computed from all-zero scores and then zeroed, so their
gradients are exactly 0 instead of NaN.
"""

from __future__ import annotations

from tests.helpers.reference_lse import attention_lse_fp64

__all__ = ["attention_fp64", "reference_grads"]


def attention_fp64(q, k, v, *, scale=None, causal=False, mask=None):
    """Differentiable fp64 attention: q ``[B, S_q, H, D]``, k/v ``[B, S_k, H_kv, D]`` (float64)."""
    return attention_lse_fp64(q, k, v, scale=scale, causal=causal, mask=mask)[0]


def reference_grads(q, k, v, dout, **kwargs):
    """``(out, dq, dk, dv)`` in float64 for the loss ``sum(out * dout)``."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention_fp64(q64, k64, v64, **kwargs)
    out.backward(dout.detach().double())
    return out.detach(), q64.grad, k64.grad, v64.grad
